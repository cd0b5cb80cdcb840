"""Serving: the HTTP app (OpenAI + EasyLM LMServer routes), the continuous-batching scheduler, the chat page."""

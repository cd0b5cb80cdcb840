"""Response bodies, declared for the OpenAPI document only (handlers build plain dicts): what clients and
schema-driven fuzzers (schemathesis) check the server's answers against. Every error is OpenAI's shape."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail


class PromptDetails(_Response):
    cached_tokens: int


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptDetails | None = None


class FunctionCallOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(_Response):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"]


class Completion(_Response):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Response):
    object: Literal["list"]
    data: list[ModelCard]


class Tokens(_Response):
    tokens: list[int] | list[dict[str, Any]]
    count: int
    max_model_len: int


class Detokenized(_Response):
    prompt: str
    content: str


class TokenizerInfo(_Response):
    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int
    vocab_size: int


class Health(_Response):
    status: Literal["ok"]


class LMGenerated(_Response):
    prefix_text: list[str]
    output_text: list[str]


class LMScored(_Response):
    text: list[str]
    log_likelihood: list[float]
    is_greedy: list[bool]


class LMChatted(_Response):
    response: str
    context: str
    temperature: float


ERRORS_WITH_BODY = (400, 401, 404, 413, 503)
# Before OpenAPI 3.2 (FastAPI writes 3.1) an event stream's `schema` describes one event, which clients and
# schemathesis read as {data, event, id, retry}: each event carries a JSON chunk (or [DONE]) in `data`.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}


def responses(model: type[BaseModel], *, body: bool = True, stream: bool | None = None) -> dict:
    """FastAPI `responses=` for a route answering `model` (also as server-sent events when it can stream)
    and OpenAI-shaped errors: those of a body (400, 413), a key (401), a model name (404), a full queue (503)."""
    ok: dict = {"model": model, "description": "success"}
    if stream if stream is not None else model in (ChatCompletion, Completion):
        ok["content"] = {"text/event-stream": {"schema": SSE_EVENT}}
    codes = ERRORS_WITH_BODY if body else (401,)
    return {200: ok, **{code: {"model": ErrorResponse, "description": "error"} for code in codes}}

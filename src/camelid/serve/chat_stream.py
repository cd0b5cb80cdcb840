"""Chat completion chunks as OpenAI streams them: a role chunk, content deltas, and, for a reply that calls
tools, `tool_calls` deltas (the first of each call with its id, name and empty arguments, the next carrying
pieces of the arguments: as they are written for a forced call, at the end for one the model chose) before
the final chunk with finish_reason "tool_calls"."""
from __future__ import annotations

from . import tools
from ..scheduler import Chunk, TokenInfo


def finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens: list[TokenInfo]) -> dict:
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": _bytes(t.text),
                         "top_logprobs": [{"token": s, "logprob": lp, "bytes": _bytes(s)} for _, s, lp in t.top]}
                        for t in tokens]}


def first_chunks(head: dict, n: int) -> list[dict]:
    return [head | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": None, "logprobs": None}]} for i in range(n)]


def chunk_maker(head: dict, n: int, top: int | None, plan: tools.ToolPlan):
    """make_chunk(i, event) -> chunk(s) for `_stream`; i None asks for the usage chunk's head."""
    # A forced call streams as it is written; with "auto", text that may be a call is held back until the
    # reply is complete.
    gates = [tools.Gate(plan) for _ in range(n)]
    calls_so_far = [tools.CallStream(plan.fmt) for _ in range(n)]
    whole, sent = [""] * n, [0] * n  # the reply so far, and how much of it went out as content

    def choice(i: int, delta: dict, reason: str | None = None, logprobs=None) -> dict:
        return head | {"choices": [{"index": i, "delta": delta, "finish_reason": reason, "logprobs": logprobs}]}

    def make_chunk(i, event):
        if i is None:
            return dict(head)
        if isinstance(event, Chunk):
            whole[i] += event.text
            if plan.mode == "forced":
                return [choice(i, {"tool_calls": [d]}) for d in calls_so_far[i].feed(whole[i])]
            text = gates[i].feed(event.text)
            sent[i] += len(text)
            if not text and not event.tokens:
                return None
            return choice(i, {"content": text}, logprobs=chat_logprobs(event.tokens) if top is not None else None)
        if plan.mode == "none":
            return choice(i, {}, finish(event.finish_reason))
        if plan.mode == "forced":
            out = [choice(i, {"tool_calls": [d]}) for d in calls_so_far[i].feed(whole[i])]
            called = bool(calls_so_far[i].calls())
            return out + [choice(i, {}, "tool_calls" if called else finish(event.finish_reason))]
        content, calls = tools.parse(whole[i], plan)
        if not calls:
            rest = whole[i][sent[i]:]  # held back for nothing: it goes out as content after all
            out = [choice(i, {"content": rest})] if rest else []
            return out + [choice(i, {}, finish(event.finish_reason))]
        out = []
        for k, call in enumerate(calls):
            fn = call["function"]
            out.append(choice(i, {"tool_calls": [{"index": k, "id": call["id"], "type": "function",
                                                  "function": {"name": fn["name"], "arguments": ""}}]}))
            out.append(choice(i, {"tool_calls": [{"index": k, "function": {"arguments": fn["arguments"]}}]}))
        return out + [choice(i, {}, "tool_calls")]

    return make_chunk

"""Request options shared by /v1/chat/completions and /v1/completions, checked before any work: the
combinations OpenAI refuses, `logit_bias` as token ids, and `response_format` compiled to one grammar
constraint per choice."""
from __future__ import annotations

import asyncio

from ..errors import CamelidError
from ..grammar import schema_of
from .runtime import ServedModel
from .schemas import APIError


def check_common(body) -> None:
    """What pydantic's per-field checks cannot see."""
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")


def logit_bias(served: ServedModel, bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias: token id strings -> bias in [-100, 100]."""
    if not bias:
        return None
    vocab = served.loaded.config.vocab_size
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not key.strip().lstrip("-").isdigit():
            raise APIError(400, f"logit_bias key {key!r} is not a token id (give ids as strings, e.g. \"42\")",
                           param="logit_bias")
        token = int(key)
        if not 0 <= token < vocab:
            raise APIError(400, f"logit_bias token id {token} is outside the vocabulary (0..{vocab - 1})",
                           param="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias value {value} for token {token} is outside [-100, 100]",
                           param="logit_bias")
        out[token] = float(value)
    return out


def response_schema(body) -> tuple[bool, dict | None]:
    """(constrained?, schema) of the request's response_format; None schema = any JSON object."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return False, None
    if fmt.type == "json_schema" and fmt.json_schema is None:
        raise APIError(400, "response_format of type json_schema needs json_schema: {name, schema}",
                       param="response_format")
    raw = {"type": fmt.type}
    if fmt.json_schema is not None:
        raw["json_schema"] = {"schema": fmt.json_schema.schema_}
    try:
        return True, schema_of(raw)
    except CamelidError as e:
        raise APIError(400, str(e), param="response_format") from None


async def constraints(served: ServedModel, schema: dict | None, count: int, lead: str = "") -> list:
    """`count` independent constraints (one per choice) to `schema` (after the text `lead`); a schema the
    engine cannot enforce is a 400."""
    await asyncio.to_thread(served.grammar.ll_tokenizer)  # the first use reads the vocabulary: off the event loop
    try:
        return [served.grammar.json_schema(schema, lead) for _ in range(count)]
    except CamelidError as e:
        raise APIError(400, str(e), param="response_format") from None

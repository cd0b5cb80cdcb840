"""Operational routes: /health (public, as llama.cpp's and vLLM's), /metrics (Prometheus), and the tokenizer
routes clients use without generating: /tokenize, /detokenize (vLLM's and llama.cpp's shapes at once) and
/tokenizer_info (what lm-evaluation-harness's remote tokenizer reads: bos/eos/pad token strings and the chat
template)."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from . import tools
from .openai_api import pick_model
from .runtime import ServedModel
from .responses import Detokenized, Health, TokenizerInfo, Tokens, responses
from .schemas import APIError, DetokenizeRequest, TokenizeRequest

router = APIRouter()


@router.get("/health", responses={200: {"model": Health, "description": "the server is up"}})
async def health(request: Request) -> dict:
    """Up and serving; each model's busy rows and queue (a load balancer may weigh by them)."""
    models = {m.id: {"rows_busy": m.scheduler.load[0], "queue": m.scheduler.load[1], "rows": m.scheduler.max_batch}
              for m in request.app.state.models.values()}
    return {"status": "ok", "models": models}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)


def _tokenized(served: ServedModel, body: TokenizeRequest) -> list[int]:
    """Token ids of the request's messages (through the chat template) or text."""
    tok = served.tokenizer
    if body.messages is not None:
        if served.template is None:
            raise APIError(400, f"model {served.id!r} has no chat template", param="messages")
        offered = [t.model_dump(exclude_none=True, by_alias=True) for t in body.tools or []]
        try:  # as /v1/chat/completions renders them, tools and calls in the template's own format
            ids = served.template.with_tools(offered).prompt_ids(
                tools.conversation(body), tok, add_generation_prompt=body.add_generation_prompt)
        except Exception as e:
            raise APIError(400, f"the {served.template.name} template cannot render these messages: {e}",
                           param="messages") from None
        return ids
    text = body.prompt if body.prompt is not None else body.content
    special = body.add_special_tokens if body.add_special_tokens is not None else body.add_special
    # vLLM adds the tokenizer's special tokens unless told not to; llama.cpp only when asked.
    add = special if special is not None else body.prompt is not None
    return tok.encode_prompt(text) if add else tok.encode(text)


@router.post("/tokenize", responses=responses(Tokens, stream=False))
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    served = pick_model(request, body.model)
    given = [f for f in ("prompt", "content", "messages") if getattr(body, f) is not None]
    if len(given) != 1:
        raise APIError(400, "give exactly one of prompt (vLLM), content (llama.cpp) or messages", param="prompt")
    tok = served.tokenizer
    # Rendering, tokenizing and decoding each piece of a long text: in a worker thread, off the event loop.
    ids = await asyncio.to_thread(_tokenized, served, body)
    tokens = await asyncio.to_thread(lambda: [{"id": i, "piece": tok.decode([i])} for i in ids]) \
        if body.with_pieces else ids
    return {"tokens": tokens, "count": len(ids), "max_model_len": served.context}


@router.post("/detokenize", responses=responses(Detokenized, stream=False))
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    served = pick_model(request, body.model)
    vocab = served.loaded.config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < min(vocab, served.tokenizer.vocab_size)]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
    text = await asyncio.to_thread(served.tokenizer.decode, body.tokens)
    return {"prompt": text, "content": text}  # vLLM's and llama.cpp's names


@router.get("/tokenizer_info", responses=responses(TokenizerInfo, body=False))
async def tokenizer_info(request: Request) -> dict:
    served = next(iter(request.app.state.models.values()))
    tok = served.tokenizer
    pad = tok.id_to_token(tok.pad_id) if tok.pad_id is not None else None
    template = tok.chat_template or getattr(served.template, "source", None)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "pad_token": pad, "chat_template": template, "model_max_length": served.context,
            "vocab_size": tok.vocab_size, "add_bos_token": tok.add_bos}

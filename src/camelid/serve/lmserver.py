"""EasyLM's LMServer API with EasyLM's JSON: /generate, /chat, /loglikelihood, /loglikelihood-rolling,
/greedy-until, /ready. Requests go to the first served model (an LMServer serves one).

Scoring follows EasyLM: the input is [BOS] + (prefix + text)[:-1], prefix and text tokenized apart,
and only the text's tokens count. Rolling scoring uses non-overlapping windows of the context length,
the last one aligned to the end of the text.
"""
from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Request

from .responses import LMChatted, LMGenerated, LMScored, responses
from .runtime import JobGroup, ServedModel, new_id, sampling_params
from .schemas import (APIError, LMChatRequest, LMGenerateRequest, LMGreedyUntilRequest, LMLoglikelihoodRequest,
                      LMRollingRequest)

router = APIRouter()
log = logging.getLogger("camelid.serve")


def _served(request: Request) -> ServedModel:
    return next(iter(request.app.state.models.values()))


async def _generate(request: Request, served: ServedModel, prompts: list[str], temperature: float,
                    max_tokens: int, stops: list[list[str]] | None = None) -> list[str]:
    """Generate for all prompts (decoded together, as many at once as there are rows), each up to `max_tokens`."""
    # Tokenizing a batch of prompts is CPU work: in a worker thread, so other clients are answered meanwhile.
    encoded = await asyncio.to_thread(lambda: [served.encode(p) for p in prompts])
    top_k = request.app.state.settings.lm_top_k if temperature > 0 else None
    group = JobGroup(served, new_id("lm"))
    for i, ids in enumerate(encoded):
        served.check_prompt(len(ids))
        params = sampling_params(temperature, None, served.budget(len(ids), max_tokens, explicit=False), None,
                                 top_k=top_k)
        group.add(ids, params, stop_strings=stops[i] if stops else [])
    return [text for text, _, _ in await group.results(request, in_parts=True)]


def _log_scoring(kind: str, served: ServedModel, tokens: int, start: float) -> None:
    log.info("%s model=%s prompt_tokens=%d completion_tokens=0 time=%.2fs ok", new_id(kind), served.id,
             tokens, time.perf_counter() - start)


async def _score(served: ServedModel, ids: list[int]) -> tuple[list[float], list[bool]]:
    logprobs, greedy, _ = await served.score(ids)
    return logprobs, greedy


@router.get("/ready", responses={200: {"description": "ready", "content": {"application/json": {"schema": {"type": "string"}}}}})
async def ready() -> str:
    return "Ready!\n"


@router.post("/generate", responses=responses(LMGenerated, stream=False))
async def generate(body: LMGenerateRequest, request: Request) -> dict:
    served, settings = _served(request), request.app.state.settings
    prefix_text = body.prefix_text
    temperature = settings.default_temperature if body.temperature is None else body.temperature
    output = await _generate(request, served, prefix_text, temperature, settings.lm_max_tokens)
    return {"prefix_text": prefix_text, "output_text": output, "temperature": temperature}


@router.post("/greedy-until", responses=responses(LMGenerated, stream=False))
async def greedy_until(body: LMGreedyUntilRequest, request: Request) -> dict:
    served, settings = _served(request), request.app.state.settings
    prefix_text, until = body.prefix_text, body.until
    if len(until) != len(prefix_text):
        raise APIError(400, f"'until' has {len(until)} entries but 'prefix_text' has {len(prefix_text)}; "
                            "give one stop string (or list of them) per prefix", param="until")
    stops = [[u] if isinstance(u, str) else list(u) for u in until]
    max_length = settings.greedy_until_max_length
    output = await _generate(request, served, prefix_text, 0.0, max_length, stops)
    return {"prefix_text": prefix_text, "until": until, "max_length": max_length, "output_text": output}


@router.post("/chat", responses=responses(LMChatted, stream=False))
async def chat(body: LMChatRequest, request: Request) -> dict:
    served, settings = _served(request), request.app.state.settings
    affix = served.lm_chat
    temperature = settings.default_temperature if body.temperature is None else body.temperature
    context = body.context + affix.user_prefix + body.prompt + affix.user_suffix + affix.lm_prefix
    [response] = await _generate(request, served, [affix.prepend_text + context], temperature,
                                 settings.lm_max_tokens)
    return {"response": response, "context": context + response + affix.lm_suffix, "temperature": temperature}


def _scoring_ids(served: ServedModel, prefix: str, text: str) -> tuple[list[int], int]:
    """[BOS] + prefix + text, and how many of the last tokens are the text's scored tokens."""
    tok = served.tokenizer
    head = [tok.bos_id] if tok.bos_id is not None else []
    prefix_ids, text_ids = tok.encode(prefix), tok.encode(text)
    ids = head + prefix_ids + text_ids
    # Without BOS or prefix the first text token has nothing to be predicted from: it is not scored.
    return ids, min(len(text_ids), len(ids) - 1)


@router.post("/loglikelihood", responses=responses(LMScored, stream=False))
async def loglikelihood(body: LMLoglikelihoodRequest, request: Request) -> dict:
    served = _served(request)
    text = body.text
    prefix_text = body.prefix_text if body.prefix_text is not None else ["" for _ in text]
    if len(prefix_text) != len(text):
        raise APIError(400, f"'prefix_text' has {len(prefix_text)} entries but 'text' has {len(text)}",
                       param="prefix_text")
    log_likelihood, is_greedy, start, tokens = [], [], time.perf_counter(), 0
    scoring = await asyncio.to_thread(lambda: [_scoring_ids(served, p, t) for p, t in zip(prefix_text, text)])
    for ids, n_scored in scoring:
        if len(ids) - 1 > served.context:
            raise APIError(400, f"prefix + text is {len(ids)} tokens but the context holds {served.context}; "
                                "use /loglikelihood-rolling for long texts", param="text",
                           code="context_length_exceeded")
        if n_scored <= 0:
            log_likelihood.append(0.0)
            is_greedy.append(True)
            continue
        logprobs, greedy = await _score(served, ids)
        tokens += len(ids)
        log_likelihood.append(float(sum(logprobs[-n_scored:])))
        is_greedy.append(bool(all(greedy[-n_scored:])))
    _log_scoring("loglikelihood", served, tokens, start)
    return {"prefix_text": body.prefix_text, "text": text, "log_likelihood": log_likelihood, "is_greedy": is_greedy}


@router.post("/loglikelihood-rolling", responses=responses(LMScored, stream=False))
async def loglikelihood_rolling(body: LMRollingRequest, request: Request) -> dict:
    served = _served(request)
    text = body.text
    tok, window = served.tokenizer, served.context
    log_likelihood, is_greedy, began, tokens = [], [], time.perf_counter(), 0
    head = [tok.bos_id] if tok.bos_id is not None else []
    encoded = await asyncio.to_thread(lambda: [head + tok.encode(t) for t in text])
    for full in encoded:
        tokens += len(full)
        total, greedy_all = 0.0, True
        scored = 0  # targets full[1..scored] are done
        while scored < len(full) - 1:
            first = scored + 1
            end = min(first + window, len(full))  # targets full[first:end], at most `window` of them
            start = max(0, end - 1 - window)  # the forward reads full[start:end-1], at most `window` tokens
            logprobs, greedy = await _score(served, full[start:end])
            n = end - first
            total += sum(logprobs[-n:])
            greedy_all = greedy_all and all(greedy[-n:])
            scored = end - 1
        log_likelihood.append(float(total))
        is_greedy.append(bool(greedy_all))
    _log_scoring("rolling", served, tokens, began)
    return {"text": text, "log_likelihood": log_likelihood, "is_greedy": is_greedy}

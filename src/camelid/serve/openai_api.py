"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions (streamed or not).

Streams follow OpenAI's server-sent events: for chat a role chunk, content deltas, a final chunk per
choice with `finish_reason`, an optional usage chunk, then `data: [DONE]`. The n choices of a request
run as n jobs decoded together, and their chunks are interleaved as they come.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from . import chat_stream, tools
from .chat_stream import chat_logprobs, finish
from .options import check_common, constraints, logit_bias, response_schema
from .responses import ChatCompletion, Completion, ModelList, responses
from .runtime import JobGroup, ServedModel, new_id, sampling_params
from ..scheduler import Done, TokenInfo
from .schemas import APIError, ChatCompletionRequest, CompletionRequest

router = APIRouter()


def pick_model(request: Request, name: str | None) -> ServedModel:
    models: dict[str, ServedModel] = request.app.state.models
    if not name:  # no model named: the first one served
        return next(iter(models.values()))
    if name not in models:
        raise APIError(404, f"the model {name!r} does not exist; this server has: {', '.join(models)}",
                       param="model", code="model_not_found")
    return models[name]


@router.get("/v1/models", responses=responses(ModelList, body=False))
async def list_models(request: Request) -> dict:
    data = []
    for m in request.app.state.models.values():
        # `camelid` is our extension: the chat page shows the template and context.
        data.append({"id": m.id, "object": "model", "created": int(m.loaded.source.stat().st_mtime),
                     "owned_by": "camelid", "camelid": {"template": m.template.name if m.template else None,
                                                        "context": m.context,
                                                        "max_batch": m.scheduler.max_batch}})
    return {"object": "list", "data": data}


def _completion_logprobs(tokens: list[TokenInfo], offset: int) -> dict:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    # The first prompt token (echo) has nothing before it to be predicted from: null, as OpenAI gives. The
    # token itself is always among its top_logprobs (up to logprobs + 1 entries), as OpenAI and vLLM answer.
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else {s: lp for _, s, lp in t.top} | {t.text: t.logprob}
                             for t in tokens],
            "text_offset": offsets}


def _prompt_infos(tok, ids: list[int], scored: tuple) -> list[TokenInfo]:
    """The prompt's own tokens with their log-probabilities and top alternatives, decoded."""
    logprobs, _, tops = scored
    infos = [TokenInfo(ids[0], tok.decode([ids[0]]), None)]
    for j, token in enumerate(ids[1:]):
        best = [(i, tok.decode([i]), v) for i, v in tops[j]] if tops else []
        infos.append(TokenInfo(token, tok.decode([token]), logprobs[j], best))
    return infos


async def _prompt_logprobs(served: ServedModel, ids: list[int], top: int) -> list[TokenInfo]:
    """The prompt's own tokens with their log-probabilities, for echo + logprobs."""
    scored = await served.score(ids, top) if len(ids) > 1 else ([], [], [])
    # Decoding every position's top tokens is a Python loop over the whole prompt: off the event loop.
    return await asyncio.to_thread(_prompt_infos, served.tokenizer, ids, scored)


def _sse(obj: object) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(group: JobGroup) -> dict:
    return {"prompt_tokens": group.prompt_tokens, "completion_tokens": group.completion_tokens,
            "total_tokens": group.prompt_tokens + group.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": group.cached_tokens}}


async def _stream(group: JobGroup, body, make_chunk, first_chunks: list[dict]) -> AsyncIterator[str]:
    """SSE text of a group; always cancels its jobs at the end (a client that left frees its rows)."""
    status = "ok"
    try:
        for chunk in first_chunks:
            yield _sse(chunk)
        async for i, event in group.merged():
            chunk = make_chunk(i, event)
            for c in chunk if isinstance(chunk, list) else [chunk] if chunk is not None else []:
                yield _sse(c)
        if body.stream_options and body.stream_options.include_usage:
            yield _sse(make_chunk(None, None) | {"choices": [], "usage": _usage(group)})
        yield "data: [DONE]\n\n"
    except APIError as e:
        status = "error"
        yield _sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
    except BaseException:
        status = "client gone"
        raise
    finally:
        group.close(status)


def _streaming_response(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _render_chat(served: ServedModel, template, body, messages: list[dict]) -> list[int]:
    """Token ids of the conversation. One ending with an assistant message is continued (transformers'
    continue_final_message, vLLM's default) unless the client asks for a generation prompt."""
    ends_with_reply = messages[-1]["role"] == "assistant"
    cont = body.continue_final_message if body.continue_final_message is not None else \
        (ends_with_reply and not body.add_generation_prompt)
    add_gen = body.add_generation_prompt if body.add_generation_prompt is not None else not cont
    if cont and add_gen:
        raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                       param="continue_final_message")
    if cont and not ends_with_reply:
        raise APIError(400, "continue_final_message needs the conversation to end with an assistant message",
                       param="continue_final_message")
    if add_gen and ends_with_reply:
        raise APIError(400, "add_generation_prompt needs the conversation to end with a user or system message "
                            "(leave it out to continue the final assistant message)", param="add_generation_prompt")
    try:
        ids = template.prompt_ids(messages, served.tokenizer, add_generation_prompt=add_gen,
                                  continue_final_message=cont)
    except Exception as e:  # a template can refuse a conversation (roles out of order, ...)
        raise APIError(400, f"the {template.name} template cannot render these messages: {e}",
                       param="messages") from None
    return ids


def _chat_message(text: str, plan: tools.ToolPlan) -> tuple[dict, bool]:
    """The assistant message of a finished reply, and whether it is a tool call."""
    if plan.mode == "none":
        return {"role": "assistant", "content": text}, False
    content, calls = tools.parse(text, plan)
    if not calls:
        return {"role": "assistant", "content": text}, False
    return {"role": "assistant", "content": content or None, "tool_calls": calls}, True


def _add_choices(group: JobGroup, body, ids: list[int], max_new: int, *, stops: list[str], logprobs: int | None,
                 bias: dict[int, float] | None, cons: list) -> None:
    """The n choices of one prompt as n jobs; seeds (and constraints) count on across a request's prompts."""
    for _ in range(body.n):
        k = len(group.jobs)
        seed = None if body.seed is None else body.seed + k
        group.add(ids, sampling_params(body.temperature, body.top_p, max_new, seed, body.top_k,
                                       body.repetition_penalty),
                  stop_strings=stops, logprobs=logprobs, presence_penalty=body.presence_penalty,
                  frequency_penalty=body.frequency_penalty, ignore_eos=body.ignore_eos, bias=bias,
                  constraint=cons[k])


def _head(group: JobGroup, served: ServedModel, kind: str) -> dict:
    """The fields every chunk or body of a reply starts with."""
    return {"id": group.request_id, "object": kind, "created": int(time.time()), "model": served.id,
            "system_fingerprint": None}


def _chat_prompt(served: ServedModel, body: ChatCompletionRequest, plan: tools.ToolPlan) -> list[int]:
    """Token ids of the request's conversation (tools, default system prompt, a forced call's opening)."""
    # The tools are written in the template's own format (a copy of the template carries this request's).
    template = served.template.with_tools(tools.tool_list(body, plan))
    ids = _render_chat(served, template, body, tools.conversation(body))
    if plan.prefix:
        ids += served.tokenizer.encode(plan.prefix)
    served.check_prompt(len(ids))
    return ids


def _chat_choices(results: list[tuple[str, list, str]], plan: tools.ToolPlan, top: int | None) -> list[dict]:
    choices = []
    for i, (text, tokens, reason) in enumerate(results):
        message, called = _chat_message(text, plan)
        choices.append({"index": i, "message": message,
                        "logprobs": chat_logprobs(tokens) if top is not None else None,
                        "finish_reason": "tool_calls" if called else finish(reason)})
    return choices


@router.post("/v1/chat/completions", responses=responses(ChatCompletion))
async def chat_completions(body: ChatCompletionRequest, request: Request):
    served = pick_model(request, body.model)
    check_common(body)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if served.template is None:
        raise APIError(400, f"model {served.id!r} has no chat template: use /v1/completions, or restart the server "
                            "with --template", param="model")
    plan = tools.plan(body, served.template)
    constrained, schema = response_schema(body)
    if constrained and plan.mode == "forced":
        raise APIError(400, "response_format cannot be combined with a forced tool_choice", param="response_format")
    # Rendering and tokenizing a long conversation takes a while: in a worker thread, so that other
    # clients (and /health) are answered meanwhile.
    ids = await asyncio.to_thread(_chat_prompt, served, body, plan)
    max_new = served.budget(len(ids), body.max_completion_tokens or body.max_tokens)
    bias = logit_bias(served, body.logit_bias)
    if plan.mode == "forced":
        constrained, schema = True, plan.schema
    cons = await constraints(served, schema, body.n, plan.lead) if constrained else [None] * body.n
    top = (body.top_logprobs or 0) if body.logprobs else None
    group = JobGroup(served, new_id("chatcmpl"))
    group.share = body.n
    _add_choices(group, body, ids, max_new, stops=body.stop_list() + list(served.template.stop_strings),
                 logprobs=top, bias=bias, cons=cons)
    group.submit()
    head = _head(group, served, "chat.completion.chunk")
    if body.stream:
        return _streaming_response(_stream(group, body, chat_stream.chunk_maker(head, body.n, top, plan),
                                           chat_stream.first_chunks(head, body.n)))
    results = await group.results(request)
    choices = await asyncio.to_thread(_chat_choices, results, plan, top)
    return head | {"object": "chat.completion", "choices": choices, "usage": _usage(group)}


def _prompts(served: ServedModel, prompt) -> list[tuple[list[int], str]]:
    """Token ids and text of each prompt of a completion request (a string, strings, ids or lists of ids)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is an empty list", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((served.encode(p), p))
        else:
            bad = [t for t in p if not 0 <= t < served.loaded.config.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{served.loaded.config.vocab_size - 1})",
                               param="prompt")
            out.append((list(p), served.tokenizer.decode(p)))
    return out


def _joined_logprobs(lead: list[TokenInfo], tokens: list[TokenInfo], offset: int) -> dict:
    """Completion logprobs of `tokens` at text offsets from `offset`, after the echoed prompt's `lead` (at 0)."""
    lp = _completion_logprobs(tokens, offset)
    if lead:
        head_lp = _completion_logprobs(lead, 0)
        lp = {k: head_lp[k] + lp[k] for k in lp}
    return lp


def _completion_chunks(head: dict, logprobs: int | None, echo: list[str], lead: list[list[TokenInfo]]):
    """make_chunk(i, event) for `_stream`: a choice's first chunk carries its echoed prompt (text and tokens)."""
    offsets = [len(t) for t in echo]
    started = [False] * len(echo)

    def make_chunk(i, event):
        if i is None:
            return dict(head)
        first, started[i] = not started[i], True
        if isinstance(event, Done):
            choice = {"index": i, "text": echo[i] if first else "",
                      "logprobs": _completion_logprobs(lead[i], 0) if first and lead[i] else None,
                      "finish_reason": finish(event.finish_reason)}
            return head | {"choices": [choice]}
        text = echo[i] + event.text if first else event.text
        if not text and not event.tokens and not (first and lead[i]):
            return None
        lp = None
        if logprobs is not None:
            lp = _joined_logprobs(lead[i] if first else [], event.tokens, offsets[i])
        offsets[i] += len(event.text)
        return head | {"choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": None}]}

    return make_chunk


def _completion_choices(results: list[tuple[str, list, str]], logprobs: int | None, echo: list[str],
                        lead: list[list[TokenInfo]]) -> list[dict]:
    return [{"index": i, "text": echo[i] + text,
             "logprobs": _joined_logprobs(lead[i], tokens, len(echo[i])) if logprobs is not None else None,
             "finish_reason": finish(reason)} for i, (text, tokens, reason) in enumerate(results)]


async def _echoed(served: ServedModel, body: CompletionRequest, group: JobGroup,
                  prompts: list[tuple[list[int], str]]) -> tuple[list[str], list[list[TokenInfo]]]:
    """Per job: the prompt text echoed before its reply, and (echo + logprobs) the prompt's scored tokens."""
    echo = [text if body.echo else "" for _, text in prompts for _ in range(body.n)]
    lead: list[list[TokenInfo]] = [[] for _ in echo]
    if body.echo and body.logprobs is not None:
        group.prompt_computed = True
        for k, (ids, _) in enumerate(prompts):
            infos = await _prompt_logprobs(served, ids, body.logprobs)
            lead[k * body.n:(k + 1) * body.n] = [infos] * body.n
    return echo, lead


@router.post("/v1/completions", responses=responses(Completion))
async def completions(body: CompletionRequest, request: Request):
    served = pick_model(request, body.model)
    check_common(body)
    # Tokenizing (up to 16 prompts, each as long as the body limit allows) runs in a worker thread.
    prompts = await asyncio.to_thread(_prompts, served, body.prompt)
    if len(prompts) * body.n > 16:
        raise APIError(400, f"{len(prompts)} prompts x n={body.n} is more than 16 completions in one request",
                       param="n")
    bias = logit_bias(served, body.logit_bias)
    constrained, schema = response_schema(body)
    count = len(prompts) * body.n
    cons = await constraints(served, schema, count) if constrained else [None] * count
    group = JobGroup(served, new_id("cmpl"))
    group.share = body.n
    explicit = "max_tokens" in body.model_fields_set
    for ids, _ in prompts:
        served.check_prompt(len(ids))
        _add_choices(group, body, ids, served.budget(len(ids), body.max_tokens, explicit=explicit),
                     stops=body.stop_list(), logprobs=body.logprobs, bias=bias, cons=cons)
    echo, lead = await _echoed(served, body, group, prompts)
    group.submit()
    head = _head(group, served, "text_completion")
    if body.stream:
        return _streaming_response(_stream(group, body, _completion_chunks(head, body.logprobs, echo, lead), []))
    results = await group.results(request)
    choices = await asyncio.to_thread(_completion_choices, results, body.logprobs, echo, lead)
    return head | {"choices": choices, "usage": _usage(group)}

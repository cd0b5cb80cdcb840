"""A served model (weights, template, scheduler) and the bridge from the scheduler thread to asyncio.

Each job's events cross threads with `loop.call_soon_threadsafe` into an asyncio queue; handlers read
those queues. Whatever way a handler ends (finished, client gone, error), it cancels its jobs, so a
disconnected client's row is freed before the next decode step.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request

from ..engine import LoadedModel
from ..generate import SamplingParams
from .scheduler import Chunk, Done, Failed, Job, QueueFull, Scheduler
from .schemas import APIError

log = logging.getLogger("camelid.serve")


@dataclass
class LMServerChat:
    """EasyLM's chat affixes: turn = context + user_prefix + prompt + user_suffix + lm_prefix."""
    prepend_text: str = ""
    user_prefix: str = ""
    user_suffix: str = ""
    lm_prefix: str = ""
    lm_suffix: str = ""


@dataclass
class ServedModel:
    id: str
    loaded: LoadedModel
    template: object  # chat.Template
    scheduler: Scheduler
    context: int
    stop_ids: set[int]
    lm_chat: LMServerChat = field(default_factory=LMServerChat)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def check_prompt(self, n_tokens: int) -> None:
        if n_tokens == 0:
            raise APIError(400, "the prompt is empty: give at least one token", param="prompt")
        if n_tokens >= self.context:
            raise APIError(400, f"the prompt has {n_tokens} tokens but the context of model {self.id!r} holds "
                                f"{self.context} (including the reply); shorten the prompt",
                           param="messages", code="context_length_exceeded")

    async def score(self, ids: list[int], top: int = 0
                    ) -> tuple[list[float], list[bool], list[list[tuple[int, float]]]]:
        """Log-probabilities of ids[1:], greedy flags, and the `top` best (id, logprob) at each position."""
        try:
            future = self.scheduler.score(ids, top)
        except QueueFull as e:
            raise APIError(503, f"the server is busy ({e}); retry shortly", type="server_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        return await asyncio.wrap_future(future)

    def budget(self, n_prompt: int, max_tokens: int | None) -> int:
        """max_tokens capped by what is left of the context (all of it when the client gave no limit)."""
        room = self.context - n_prompt
        return room if max_tokens is None else min(max_tokens, room)


def sampling_params(temperature: float, top_p: float | None, max_new: int, seed: int | None,
                    top_k: int | None = None, repetition_penalty: float = 1.0) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k,
                          repetition_penalty=repetition_penalty, seed=seed)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class JobGroup:
    """The jobs of one HTTP request (n choices), their event queues, and the request log line."""

    def __init__(self, served: ServedModel, request_id: str):
        self.served, self.request_id = served, request_id
        self.loop = asyncio.get_running_loop()
        self.jobs: list[Job] = []
        self.queues: list[asyncio.Queue] = []
        self.start = time.perf_counter()
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0

    def add(self, prompt: list[int], params: SamplingParams, *, stop_strings: list[str] = (), logprobs: int | None = None,
            presence_penalty: float = 0.0, frequency_penalty: float = 0.0, ignore_eos: bool = False) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        loop = self.loop

        def emit(event: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        self.jobs.append(Job(list(prompt), params, emit, stop_ids=set() if ignore_eos else set(self.served.stop_ids),
                             stop_strings=list(stop_strings), logprobs=logprobs,
                             presence_penalty=presence_penalty, frequency_penalty=frequency_penalty))
        self.queues.append(queue)

    def submit(self) -> None:
        try:
            self.served.scheduler.submit_many(self.jobs)
        except QueueFull as e:
            raise APIError(503, f"the server is busy ({e}); retry shortly", type="server_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()
        self.served.scheduler.wake()

    async def events(self, index: int, request: Request | None = None) -> AsyncIterator[object]:
        """Events of job `index` until Done; raises APIError on Failed. With `request`, stops if the client leaves."""
        queue = self.queues[index]
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.cancel()
                    raise ClientGone() from None
                continue
            if isinstance(event, Failed):
                raise APIError(500, event.message, type="server_error")
            if isinstance(event, Done):
                self._count(event)
            yield event
            if isinstance(event, Done):
                return

    async def merged(self) -> AsyncIterator[tuple[int, object]]:
        """Events of all jobs as they come, tagged with the job index (for streaming n > 1)."""
        getters = {asyncio.ensure_future(self._next(i)): i for i in range(len(self.jobs))}
        try:
            while getters:
                done, _ = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    i = getters.pop(fut)
                    event = fut.result()
                    if isinstance(event, Failed):
                        raise APIError(500, event.message, type="server_error")
                    if isinstance(event, Done):
                        self._count(event)
                    else:
                        getters[asyncio.ensure_future(self._next(i))] = i
                    yield i, event
        finally:
            for fut in getters:
                fut.cancel()

    def _count(self, done: Done) -> None:
        # The n choices share one prompt: it counts once, as in OpenAI's usage.
        self.prompt_tokens = max(self.prompt_tokens, done.prompt_tokens)
        self.cached_tokens = max(self.cached_tokens, done.cached_tokens)
        self.completion_tokens += done.completion_tokens

    async def _next(self, i: int) -> object:
        return await self.queues[i].get()

    async def collect(self, index: int, request: Request | None = None) -> tuple[str, list, str]:
        """Whole text, token infos and finish reason of job `index`."""
        text, tokens, reason = [], [], "stop"
        async for event in self.events(index, request):
            if isinstance(event, Chunk):
                text.append(event.text)
                tokens.extend(event.tokens)
            elif isinstance(event, Done):
                reason = event.finish_reason
        return "".join(text), tokens, reason

    def log(self, status: str = "ok") -> None:
        if self.prompt_tokens == 0 and self.jobs:  # a client that left early: count what the jobs got to
            self.prompt_tokens = max(len(job.prompt) for job in self.jobs)
            self.completion_tokens = sum(len(job.generated) for job in self.jobs)
        log.info("%s model=%s prompt_tokens=%d cached_tokens=%d completion_tokens=%d time=%.2fs %s", self.request_id,
                 self.served.id, self.prompt_tokens, self.cached_tokens, self.completion_tokens,
                 time.perf_counter() - self.start, status)


class ClientGone(Exception):
    """The client disconnected before its reply was complete."""

"""A served model (weights, template, scheduler) and the bridge from the scheduler thread to asyncio.

Each job's events cross threads with `loop.call_soon_threadsafe` into an asyncio queue; handlers read
those queues. Whatever way a handler ends (finished, client gone, error), it cancels its jobs, so a
disconnected client's row is freed before the next decode step. A non-streamed request watches its
connection while it waits (a task blocked on the ASGI `receive`, which answers `http.disconnect` the
moment the client leaves), so a client that times out frees its row within one decode step too.
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
from ..grammar import GrammarCompiler
from ..sampling import SamplingParams
from ..scheduler import Chunk, Done, Failed, Job, QueueFull, Scheduler
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
    metrics: object = None  # metrics.Metrics of the app serving it
    _grammar: GrammarCompiler | None = None

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def grammar(self) -> GrammarCompiler:
        """Compiles response formats and forced tool calls; built on first use (it reads the whole vocabulary)."""
        if self._grammar is None:
            self._grammar = GrammarCompiler(self.tokenizer, self.loaded.config.vocab_size, self.stop_ids)
        return self._grammar

    def encode(self, text: str) -> list[int]:
        """Token ids of a plain-text prompt (BOS first where the tokenizer adds one). An empty text, which
        OpenAI accepts, starts from a document boundary: BOS, else EOS."""
        tok = self.tokenizer
        ids = tok.encode_prompt(text)
        if not ids:
            start = tok.bos_id if tok.bos_id is not None else tok.eos_id
            ids = [start] if start is not None else []
        return ids

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
            raise busy(e) from None
        return await asyncio.wrap_future(future)

    def budget(self, n_prompt: int, max_tokens: int | None, *, explicit: bool = True) -> int:
        """New tokens a request may have: all the context leaves when the client gave no limit; a limit the
        client gave that does not fit is an error (as vLLM answers), a default one is capped."""
        room = self.context - n_prompt
        if max_tokens is None:
            return room
        if explicit and max_tokens > room:
            raise APIError(400, f"the context of model {self.id!r} holds {self.context} tokens, but {n_prompt} of "
                                f"prompt + max_tokens {max_tokens} need {n_prompt + max_tokens}; lower max_tokens "
                                "or shorten the prompt", param="max_tokens", code="context_length_exceeded")
        return min(max_tokens, room)


def sampling_params(temperature: float, top_p: float | None, max_new: int, seed: int | None,
                    top_k: int | None = None, repetition_penalty: float = 1.0) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k,
                          repetition_penalty=repetition_penalty, seed=seed)


def busy(e: QueueFull) -> APIError:
    return APIError(503, f"the server is busy ({e}); retry shortly", type="server_error", code="queue_full",
                    headers={"Retry-After": "1"})


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


_GONE = object()  # put into a group's queues when its client disconnects


class JobGroup:
    """The jobs of one HTTP request (n choices), their event queues, and the request log line."""

    def __init__(self, served: ServedModel, request_id: str):
        self.served, self.request_id = served, request_id
        self.loop = asyncio.get_running_loop()
        self.jobs: list[Job] = []
        self.queues: list[asyncio.Queue] = []
        self.watcher: asyncio.Future | None = None
        self.start = time.perf_counter()
        self.completion_tokens = 0
        self.share = 1  # jobs per prompt (n choices of each prompt are consecutive jobs)
        self.prompt_computed = False  # the request itself computed its prompts first (echo + logprobs)
        self._prompts: dict[int, tuple[int, int]] = {}  # prompt index -> (tokens, cached tokens)
        self._last: dict[int, float] = {}  # job index -> when its last token was sampled

    def add(self, prompt: list[int], params: SamplingParams, *, stop_strings: list[str] = (), logprobs: int | None = None,
            presence_penalty: float = 0.0, frequency_penalty: float = 0.0, ignore_eos: bool = False,
            bias: dict[int, float] | None = None, constraint: object = None) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        loop = self.loop

        def emit(event: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        self.jobs.append(Job(list(prompt), params, emit, stop_ids=set() if ignore_eos else set(self.served.stop_ids),
                             stop_strings=list(stop_strings), logprobs=logprobs,
                             presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                             bias=bias, constraint=constraint))
        self.queues.append(queue)

    def submit(self) -> None:
        try:
            self.served.scheduler.submit_many(self.jobs)
        except QueueFull as e:
            raise busy(e) from None

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()
        self.served.scheduler.wake()
        if self.watcher is not None and self.watcher is not asyncio.current_task():
            self.watcher.cancel()

    def watch(self, request: Request) -> None:
        """Cancel the jobs the moment the client disconnects (once per group)."""
        if self.watcher is not None:
            return

        async def wait_for_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.cancel()
            for queue in self.queues:
                queue.put_nowait(_GONE)

        self.watcher = asyncio.ensure_future(wait_for_disconnect())

    async def events(self, index: int, request: Request | None = None) -> AsyncIterator[object]:
        """Events of job `index` until Done; raises APIError on Failed. With `request`, stops if the client leaves."""
        if request is not None:
            self.watch(request)
        queue = self.queues[index]
        while True:
            event = await queue.get()
            if event is _GONE:
                raise ClientGone()
            if isinstance(event, Failed):
                raise APIError(500, event.message, type="server_error")
            if isinstance(event, Done):
                self._count(index, event)
            self._observe(index, event)
            yield event
            if isinstance(event, Done):
                return

    async def collect_all(self, request: Request) -> list[tuple[str, list, str]]:
        """Every job's (text, tokens, finish reason), fed to the scheduler in parts that fit its rows: a batch
        larger than rows + queue (LMServer's /generate of 100 prompts) runs to the end instead of being refused.
        Only a server too busy to take even the first part answers 503."""
        scheduler, n = self.served.scheduler, len(self.jobs)
        results: list = [None] * n
        in_flight: set[asyncio.Future] = set()
        self.watch(request)

        async def run(i: int) -> None:
            results[i] = await self.collect(i, request)

        nxt = 0
        try:
            while nxt < n or in_flight:
                while nxt < n and len(in_flight) < scheduler.max_batch:
                    try:
                        scheduler.submit_many([self.jobs[nxt]])
                    except QueueFull as e:
                        if not in_flight:
                            raise busy(e) from None
                        break  # others are ahead: wait for one of ours to finish
                    in_flight.add(asyncio.ensure_future(run(nxt)))
                    nxt += 1
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        finally:
            for task in in_flight:
                task.cancel()
        return results

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
                    self._observe(i, event)
                    if isinstance(event, Done):
                        self._count(i, event)
                    else:
                        getters[asyncio.ensure_future(self._next(i))] = i
                    yield i, event
        finally:
            for fut in getters:
                fut.cancel()

    def _observe(self, index: int, event: object) -> None:
        """Time to first token and inter-token latency, from the scheduler's timestamps."""
        metrics = self.served.metrics
        if metrics is None or not isinstance(event, Chunk) or not (event.text or event.tokens):
            return
        last = self._last.get(index)
        if last is None:
            metrics.ttft.labels(self.served.id).observe(max(0.0, event.time - self.start))
        else:
            metrics.itl.labels(self.served.id).observe(max(0.0, event.time - last))
        self._last[index] = event.time

    def _count(self, index: int, done: Done) -> None:
        # The n choices of one prompt share it: it counts once, as in OpenAI's usage; the prompts of a
        # completions list count each.
        tokens, cached = self._prompts.get(index // self.share, (0, 0))
        self._prompts[index // self.share] = (max(tokens, done.prompt_tokens), max(cached, done.cached_tokens))
        self.completion_tokens += done.completion_tokens

    @property
    def prompt_tokens(self) -> int:
        return sum(t for t, _ in self._prompts.values())

    @property
    def cached_tokens(self) -> int:
        # A prompt this request scored itself (echo + logprobs) was computed, not found in the cache.
        return 0 if self.prompt_computed else sum(c for _, c in self._prompts.values())

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

    async def results(self, request: Request, *, in_parts: bool = False) -> list[tuple[str, list, str]]:
        """Every job's (text, token infos, finish reason): how a non-streamed request waits for its reply.
        in_parts: the jobs are not submitted yet and go in as rows free up (`collect_all`). However it
        ends, the jobs are cancelled (a client that left frees its rows) and the request is logged once."""
        status = "ok"
        try:
            if in_parts:
                return await self.collect_all(request)
            return [await self.collect(i, request) for i in range(len(self.jobs))]
        except ClientGone:
            status = "client gone"
            raise
        except APIError:
            status = "error"
            raise
        except BaseException:
            status = "cancelled"
            raise
        finally:
            self.close(status)

    def close(self, status: str) -> None:
        """The end of a request, whatever it was: its jobs cancelled, its log line written."""
        self.cancel()
        self.log(status)

    def log(self, status: str = "ok") -> None:
        if not self._prompts and self.jobs:  # a client that left early: count what the jobs got to
            for i, job in enumerate(self.jobs):
                self._count(i, Done("cancelled", len(job.prompt), len(job.generated)))
        if self.served.metrics is not None:
            self.served.metrics.prompt_tokens.labels(self.served.id).inc(self.prompt_tokens)
            self.served.metrics.generation_tokens.labels(self.served.id).inc(self.completion_tokens)
        log.info("%s model=%s prompt_tokens=%d cached_tokens=%d completion_tokens=%d time=%.2fs %s", self.request_id,
                 self.served.id, self.prompt_tokens, self.cached_tokens, self.completion_tokens,
                 time.perf_counter() - self.start, status)


class ClientGone(Exception):
    """The client disconnected before its reply was complete."""

"""Continuous batching: one thread owns the model and decodes every active request in one batched forward.

Each request lives in a row of the model's static KV cache. Between decode steps the loop drops
requests that finished or were cancelled (a client that disconnected or pressed stop), prefills
waiting requests into the freed rows, and runs scoring jobs (`/loglikelihood`). A free row keeps the
tokens it last held, so a new request that starts with them (the next turn of a conversation, a
shared system prompt) prefills only the part that differs: a prefix cache at row granularity.

Results go back through a per-request callback; the HTTP layer turns it into an asyncio queue.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from .engine import LoadedModel
from .generate import StopStringFilter
from .kernels.blocks import PREFILL_ROWS
from .sampling import SamplingParams, choose, make_generator
from .prefix_cache import common_prefix, forward_row

log = logging.getLogger("camelid.serve")


class QueueFull(Exception):
    """More requests are waiting than the queue limit allows; the client should retry later."""


@dataclass
class TokenInfo:
    id: int
    text: str
    logprob: float | None  # None for the first prompt token echoed (nothing predicts it)
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class Chunk:
    """New text of a request (may be empty while a possible stop string is held back) and the tokens behind it."""
    text: str
    tokens: list[TokenInfo]
    time: float = field(default_factory=time.perf_counter)  # when the token was sampled (for latency metrics)


@dataclass
class Done:
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache


@dataclass
class Failed:
    message: str


@dataclass
class Job:
    """One sequence to generate. `emit` is called from the scheduler thread with Chunk, then Done or Failed."""
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[object], None]
    stop_ids: set[int] = field(default_factory=set)
    stop_strings: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k: the chosen token's log-prob plus the k most likely
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    bias: dict[int, float] | None = None  # OpenAI's logit_bias
    constraint: object = None  # grammar.Constraint: structured output, enforced per row with a bitmask
    cancelled: bool = False
    # State owned by the scheduler thread.
    row: int = -1
    reused: int = 0
    generated: list[int] = field(default_factory=list)
    pending: int | None = None  # last sampled token, not yet fed to the model
    generator: torch.Generator | None = None
    decoder: object = None
    filter: StopStringFilter | None = None

    def cancel(self) -> None:
        # A plain flag: the loop notices it between steps, so no lock is needed.
        self.cancelled = True


@dataclass
class ScoreJob:
    """Log-probabilities of ids[1:] each given the tokens before it, whether each is the argmax, and
    (when `top` > 0) the `top` most likely tokens at each position as (id, logprob) pairs."""
    ids: list[int]
    future: Future
    top: int = 0


class Scheduler:
    def __init__(self, loaded: LoadedModel, *, max_batch: int = 8, context: int = 2048, max_queue: int = 64,
                 prefix_cache: bool = True):
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.max_batch, self.context, self.max_queue = max_batch, context, max_queue
        self.prefix_cache = prefix_cache
        self.device = self.model.model.embed_tokens.weight.device
        self.model.setup_cache(max_batch, context)
        # Tokens whose K/V each row holds: the model's own record (prefix_cache.py reads the same one).
        self.row_tokens: list[list[int]] = self.model.cache_tokens
        self.free_rows = set(range(max_batch))
        self.waiting: deque[Job] = deque()
        self.scores: deque[ScoreJob] = deque()
        self.active: list[Job] = []
        self.cond = threading.Condition()
        self.stopped = False
        self.steps = 0
        self.reused_tokens = 0  # prompt tokens served from the prefix cache, for logs and tests
        self.thread = threading.Thread(target=self._loop, name="camelid-scheduler", daemon=True)

    # --- called from other threads -------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        self.submit_many([job])

    def submit_many(self, jobs: list[Job]) -> None:
        """All or none: the n choices of one request enter the queue together."""
        with self.cond:
            # Jobs that find a free row do not wait; only the rest count against the queue limit.
            # Cancelled jobs (clients gone) are about to leave, so they hold neither a row nor a place.
            waiting = sum(not j.cancelled for j in self.waiting)
            busy = sum(not j.cancelled for j in list(self.active))
            if waiting + len(jobs) > self.max_queue + self.max_batch - busy:
                raise QueueFull(f"{waiting} requests are already waiting")
            self.waiting.extend(jobs)
            self.cond.notify()

    def score(self, ids: list[int], top: int = 0) -> Future:
        future: Future = Future()
        with self.cond:
            if len(self.waiting) + len(self.scores) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.scores.append(ScoreJob(list(ids), future, top))
            self.cond.notify()
        return future

    def wake(self) -> None:
        """Let the loop notice a cancellation at once, even while it is idle-waiting."""
        with self.cond:
            self.cond.notify()

    @property
    def load(self) -> tuple[int, int]:
        return len(self.active), len(self.waiting)

    # --- the scheduler thread ------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cond:
                while not self.stopped and not self.waiting and not self.scores and not self.active:
                    self.cond.wait()
                if self.stopped:
                    break
            try:
                self._iteration()
            except Exception as e:  # a bug must fail the requests in flight, not kill the server
                log.exception("scheduler step failed")
                for job in list(self.active):
                    job.emit(Failed(f"internal error in the generation loop: {e}"))
                    self.row_tokens[job.row] = []  # its cache row may be half written
                    self._release(job)
        for job in self.active + list(self.waiting):
            job.emit(Failed("the server is shutting down"))

    def _iteration(self) -> None:
        for job in [j for j in self.active if j.cancelled]:
            self._finish(job, "cancelled")
        while self.free_rows:
            with self.cond:
                job = self.waiting.popleft() if self.waiting else None
            if job is None:
                break
            if job.cancelled:
                job.emit(Done("cancelled", len(job.prompt), 0))
                continue
            self._prefill(job)
        if self.scores and self.free_rows:
            with self.cond:
                task = self.scores.popleft()
            self._score(task)
        if self.active:
            self._decode_step()

    def _pick_row(self, prompt: list[int]) -> tuple[int, int]:
        """The free row sharing the longest prefix with `prompt`, and how many tokens can be reused."""
        best, best_len = None, -1
        for row in self.free_rows:
            cached = self.row_tokens[row]
            n = common_prefix(cached, prompt) if self.prefix_cache else 0
            # Among equal matches take the emptiest row, keeping longer cached prefixes for later requests.
            if n > best_len or (n == best_len and len(cached) < len(self.row_tokens[best])):
                best, best_len = row, n
        self.free_rows.discard(best)
        # At least the last prompt token is computed again: its logits choose the first new token. Native
        # models may compute a call of PREFILL_ROWS tokens or more another way than fewer (bfloat16 weight tiles
        # where the build has no int8 tile kernel, oneDNN for float matrices; kernels/blocks.py), so the tail
        # recomputed is never shorter than that when the prompt is not: a repeated prompt then gets the
        # arithmetic, and the greedy reply, of its first full prefill.
        return best, max(0, min(best_len, len(prompt) - 1, len(prompt) - PREFILL_ROWS))

    def _prefill(self, job: Job) -> None:
        row, reuse = self._pick_row(job.prompt)
        job.row, job.reused = row, reuse
        self.reused_tokens += reuse
        try:
            # Any integer seed is accepted; torch takes 64 bits.
            seed = job.params.seed if job.params.seed is not None else int.from_bytes(os.urandom(8), "little")
            job.generator = make_generator(seed, self.device)
            job.decoder = self.tokenizer.stream()
            job.filter = StopStringFilter(job.stop_strings)
            logits = forward_row(self.model, row, job.prompt[reuse:], reuse, last=1)[-1]
        except Exception as e:
            log.exception("prefill failed")
            self.row_tokens[row] = []
            self.free_rows.add(row)
            job.emit(Failed(f"internal error while reading the prompt: {e}"))
            return
        self.active.append(job)
        if job.params.max_new_tokens == 0:
            self._finish(job, "length")
            return
        self._advance(job, logits)

    def _decode_step(self) -> None:
        jobs = self.active
        tokens = torch.tensor([[j.pending] for j in jobs], dtype=torch.long, device=self.device)
        positions = torch.tensor([[len(j.prompt) + len(j.generated) - 1] for j in jobs], device=self.device)
        rows = torch.tensor([j.row for j in jobs], device=self.device)
        logits = self.model(tokens, positions, rows=rows)[:, 0]
        self.steps += 1
        for i, job in enumerate(list(jobs)):
            self.row_tokens[job.row].append(job.pending)
            if job.cancelled:
                self._finish(job, "cancelled")
                continue
            try:
                self._advance(job, logits[i])
            except Exception as e:  # one request's odd parameters must not fail the others
                log.exception("sampling failed")
                job.emit(Failed(f"internal error while sampling: {e}"))
                self._release(job)

    def _advance(self, job: Job, logits: torch.Tensor) -> None:
        """Sample the next token of `job` from its logits, emit it, and finish the job if it is done."""
        params = job.params
        raw = logits.float()
        penalty = None
        if job.generated and (job.presence_penalty or job.frequency_penalty):
            counts = torch.bincount(torch.tensor(job.generated, device=raw.device), minlength=raw.numel()).float()
            penalty = job.frequency_penalty * counts + job.presence_penalty * (counts > 0).float()
        history = None
        if params.repetition_penalty != 1.0:
            history = torch.tensor(job.prompt + job.generated, dtype=torch.long, device=raw.device)
        # Only a constrained row pays for its mask: the others in the batch sample as before.
        mask = job.constraint.mask() if job.constraint is not None else None
        token = choose(raw, params, history=history, generator=job.generator, bias=job.bias, mask=mask,
                       counts_penalty=penalty)
        if job.constraint is not None:
            job.constraint.accept(token)
        if token in job.stop_ids:
            self._finish(job, "stop")
            return
        job.generated.append(token)
        info = None
        if job.logprobs is not None:
            logp = torch.log_softmax(raw, dim=-1)
            top = []
            if job.logprobs > 0:
                values, ids = torch.topk(logp, job.logprobs)
                top = [(int(i), self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]
            info = TokenInfo(token, self.tokenizer.decode([token]), float(logp[token]), top)
        held = len(job.filter.pending)
        text = job.filter.feed(job.decoder.push(token))
        if job.filter.stopped and len(text) <= held:
            info = None  # the token starts the stop string: its text is left out, so is its logprob
        job.emit(Chunk(text, [info] if info else []))
        if job.filter.stopped:
            self._finish(job, "stop", flush=False)
        elif job.constraint is not None and job.constraint.finished:
            self._finish(job, "stop")  # the value is complete: nothing else may follow it
        elif len(job.generated) >= params.max_new_tokens:
            self._finish(job, "length")
        else:
            job.pending = token

    def _finish(self, job: Job, reason: str, flush: bool = True) -> None:
        if flush and reason != "cancelled":
            tail = job.filter.feed(job.decoder.flush()) + job.filter.flush()
            if tail:
                job.emit(Chunk(tail, []))
        job.emit(Done(reason, len(job.prompt), len(job.generated), job.reused))
        self._release(job)

    def _release(self, job: Job) -> None:
        if job in self.active:
            self.active.remove(job)
        if job.row >= 0:
            self.free_rows.add(job.row)

    def _score(self, task: ScoreJob) -> None:
        ids = task.ids
        row = min(self.free_rows, key=lambda r: len(self.row_tokens[r]))
        self.free_rows.discard(row)
        try:
            logits = forward_row(self.model, row, ids[:-1], 0)
            # Chunks keep the fp32 log-softmax of a long text over a 49k vocabulary small.
            logprobs, greedy, tops = [], [], []
            targets = torch.tensor(ids[1:], dtype=torch.long, device=logits.device)
            for s in range(0, len(targets), 256):
                part = torch.log_softmax(logits[s:s + 256].float(), dim=-1)
                t = targets[s:s + 256]
                logprobs += part.gather(1, t[:, None])[:, 0].tolist()
                greedy += (part.argmax(-1) == t).tolist()
                if task.top > 0:
                    values, best = torch.topk(part, task.top, dim=-1)
                    tops += [list(zip(b, v)) for b, v in zip(best.tolist(), values.tolist())]
            task.future.set_result((logprobs, greedy, tops))
        except Exception as e:
            task.future.set_exception(e)
        finally:
            self.free_rows.add(row)


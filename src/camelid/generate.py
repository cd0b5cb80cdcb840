"""Generation: prefill the prompt into the KV cache, then one-token decode steps, yielding tokens as they come.

`generate()` is the single token iterator that the CLI, chat, and later the server stream from.
Stop strings are handled on text by `StopStringFilter`, which holds back text until it can no longer
be the start of a stop string.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import torch

from .errors import CamelidError
from .model import Llama

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise CamelidError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise CamelidError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise CamelidError(f"top_k must be >= 1, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise CamelidError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 0:
            raise CamelidError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


def process_logits(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None) -> torch.Tensor:
    """Repetition penalty, temperature, top-k and top-p on fp32 logits of shape (vocab,); removed tokens get -inf."""
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = logits[history]
        logits[history] = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the most likely one always stays.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None,
           generator: torch.Generator | None) -> int:
    """One token from logits of shape (vocab,): argmax when greedy, else a draw from the filtered distribution."""
    logits = process_logits(logits, params, history)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


class Generation:
    """Iterator over new token ids. After it ends, `finish_reason` is "stop" (a stop token) or "length".

    reuse_prefix: keep the model's cache between generations and compute only the prompt tokens after
    the longest prefix it already holds (chat turns); `reused`/`computed` count the prompt tokens.
    compile: decode with the compiled fixed-shape step (`torch.compile`, built once per model).
    """

    def __init__(self, model: Llama, prompt_ids: Sequence[int], params: SamplingParams,
                 stop_ids: Iterable[int] = (), context: int | None = None, *, reuse_prefix: bool = False,
                 compile: bool = False):
        self.model, self.params = model, params
        self.prompt = list(prompt_ids)
        self.stop_ids = set(stop_ids)
        self.context = min(context or model.config.max_position_embeddings, model.config.max_position_embeddings)
        if not self.prompt:
            raise CamelidError("the prompt is empty: give at least one token")
        if len(self.prompt) >= self.context:
            raise CamelidError(f"the prompt has {len(self.prompt)} tokens but the context holds {self.context}; "
                               "shorten the prompt or use a larger --context")
        self.reuse_prefix, self.compile = reuse_prefix, compile
        self.finish_reason: str | None = None
        self.prompt_seconds = 0.0
        self.reused = self.computed = 0
        self._tokens = self._run()

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> int:
        return next(self._tokens)

    @torch.inference_mode()
    def _run(self) -> Iterator[int]:
        import time

        from .prefix_cache import KVSession

        model, params = self.model, self.params
        n_prompt = len(self.prompt)
        budget = min(params.max_new_tokens, self.context - n_prompt)
        # The compiled step is specialised to the cache size: grow it in large steps so it rarely recompiles.
        session = KVSession(model, self.context, compiled=self.compile, cache_step=1024 if self.compile else 256)
        device = session.device
        generator = make_generator(params.seed, device)
        history = torch.tensor(self.prompt, dtype=torch.long, device=device)
        start = time.perf_counter()
        logits = session.prefill(self.prompt, reuse=self.reuse_prefix, reserve=n_prompt + budget)
        self.prompt_seconds = time.perf_counter() - start
        self.reused, self.computed = session.reused, session.computed
        for _ in range(budget):
            token = sample(logits, params, history if params.repetition_penalty != 1.0 else None, generator)
            if token in self.stop_ids:
                self.finish_reason = "stop"
                return
            yield token
            history = torch.cat([history, torch.tensor([token], device=device)])
            if len(history) >= n_prompt + budget:
                break
            logits = session.step(token)
        self.finish_reason = "length"


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A seeded generator on the device the sampling runs on (None: torch's global one)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed % (1 << 63))


class StopStringFilter:
    """Passes text through, holding back any tail that could still grow into a stop string."""

    def __init__(self, stop_strings: Iterable[str] = ()):
        self.stops = [s for s in stop_strings if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut = min(h[0] for h in hits)
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def generate_text(model: Llama, tokenizer: "Tokenizer", prompt_ids: Sequence[int], params: SamplingParams, *,
                  stop_ids: Iterable[int] = (), stop_strings: Iterable[str] = (),
                  context: int | None = None, reuse_prefix: bool = False, compile: bool = False,
                  draft: Llama | None = None, draft_tokens: int = 4) -> Iterator[str]:
    """Stream the completion as text chunks; stops on a stop id or stop string (which is not emitted).

    With `draft`, speculative decoding (speculative.py): the same output distribution, fewer target steps.
    """
    if draft is not None:
        from .speculative import SpeculativeGeneration
        gen = SpeculativeGeneration(model, draft, prompt_ids, params, stop_ids, context, k=draft_tokens,
                                    reuse_prefix=reuse_prefix)
    else:
        gen = Generation(model, prompt_ids, params, stop_ids, context, reuse_prefix=reuse_prefix, compile=compile)
    return stream_text(gen, tokenizer, stop_strings)


def stream_text(gen: Iterable[int], tokenizer: "Tokenizer", stop_strings: Iterable[str] = ()) -> Iterator[str]:
    """Text chunks of a token iterator (a Generation), cut at the first stop string."""
    decoder = tokenizer.stream()
    stops = StopStringFilter(stop_strings)
    for token in gen:
        chunk = stops.feed(decoder.push(token))
        if chunk:
            yield chunk
        if stops.stopped:
            gen.finish_reason = "stop"  # type: ignore[attr-defined]
            return
    tail = stops.feed(decoder.flush())
    tail += stops.flush()
    if tail:
        yield tail

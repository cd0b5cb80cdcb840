"""Generation: prefill the prompt into the KV cache, then one-token decode steps, yielding tokens as they come.

`generate()` is the single token iterator that the CLI, chat, and later the server stream from.
Stop strings are handled on text by `StopStringFilter`, which holds back text until it can no longer
be the start of a stop string.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import torch

from .errors import CamelidError
from .model import Llama
from .sampling import SamplingParams, make_generator, process_logits, sample  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


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
                  context: int | None = None, reuse_prefix: bool = False, compile: bool = False) -> Iterator[str]:
    """Stream the completion as text chunks; stops on a stop id or stop string (which is not emitted).
    (Speculative decoding streams through `stream_text` with a speculative.SpeculativeGeneration.)"""
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

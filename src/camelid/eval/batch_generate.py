"""Many prompts generated together through the scheduler's continuous batching (no HTTP)."""
from __future__ import annotations

import threading
from typing import Callable, Sequence

from ..engine import LoadedModel
from ..generate import SamplingParams


def generate_batch(loaded: LoadedModel, prompts: Sequence[list[int]], params: SamplingParams | Sequence[SamplingParams],
                   *, stop_ids: set[int], stop_strings: Sequence[Sequence[str]] | Sequence[str] = (), batch: int = 8,
                   context: int | None = None, progress: Callable[[int], None] | None = None) -> list[str]:
    """The completion text of each prompt (stop strings and stop tokens cut off), in prompt order.

    `params` and `stop_strings` are one for all prompts or one per prompt. The KV cache is sized to these
    prompts (batch x longest prompt + new tokens), not to the model's whole context, and freed after.
    """
    from ..scheduler import Done, Failed, Job, Scheduler
    if not prompts:
        return []
    n = len(prompts)
    per_params = list(params) if isinstance(params, (list, tuple)) else [params] * n
    per_stops = list(stop_strings) if stop_strings and not isinstance(stop_strings[0], str) else [list(stop_strings)] * n
    outputs: list[list[str]] = [[] for _ in range(n)]
    finished = [threading.Event() for _ in range(n)]
    errors: list[str] = []
    jobs = []
    for i, prompt in enumerate(prompts):
        def emit(event, i=i):
            if isinstance(event, (Done, Failed)):
                if isinstance(event, Failed):
                    errors.append(event.message)
                finished[i].set()
            elif event.text:
                outputs[i].append(event.text)
        jobs.append(Job(list(prompt), per_params[i], emit, stop_ids=set(stop_ids), stop_strings=list(per_stops[i])))
    limit = context or loaded.config.max_position_embeddings
    needed = min(limit, max(len(j.prompt) + j.params.max_new_tokens for j in jobs) + 1)
    scheduler = Scheduler(loaded, max_batch=min(batch, n), context=needed, max_queue=n)
    scheduler.start()
    try:
        scheduler.submit_many(jobs)
        for event in finished:
            event.wait()
            if progress is not None:
                progress(1)
    finally:
        scheduler.stop()
        loaded.model.clear_cache()
    if errors:
        raise RuntimeError(errors[0])
    return ["".join(parts) for parts in outputs]

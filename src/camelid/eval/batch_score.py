"""Log-likelihoods of many (context, continuation) token pairs in few forward passes.

Pairs that share a context (a multiple-choice item's answers) form a group: the context is run once,
its keys/values are copied to one cache row per continuation, and all continuations of a batch run
together in a second forward. A one-token continuation needs no second forward at all: the context's
last logits score it. lm-eval scores the same pairs as `[context + continuation][:-1]` per request.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..model import Llama

CACHE_STEP = 64  # cache lengths are rounded up to this, so consecutive batches mostly reuse one allocation


@dataclass
class Pair:
    context: tuple[int, ...]
    continuation: list[int]


def _groups(pairs: Sequence[Pair]) -> list[tuple[tuple[int, ...], list[int]]]:
    """(context, indices of its pairs), longest first (a long batch first shows memory problems at once)."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(pairs):
        by_context.setdefault(p.context, []).append(i)
    return sorted(by_context.items(), key=lambda g: -(len(g[0]) + max(len(pairs[i].continuation) for i in g[1])))


def _batches(groups, pairs: Sequence[Pair], rows: int, tokens: int):
    """Groups packed into batches of at most `rows` continuations and about `tokens` cache positions;
    a group larger than a batch is split (its context then runs once per part)."""
    batch, n_rows, longest = [], 0, 0
    for context, members in groups:
        for s in range(0, len(members), rows):
            part = members[s:s + rows]
            length = len(context) + max(len(pairs[i].continuation) for i in part)
            if batch and (n_rows + len(part) > rows or (n_rows + len(part)) * max(longest, length) > tokens):
                yield batch
                batch, n_rows, longest = [], 0, 0
            batch.append((context, part))
            n_rows += len(part)
            longest = max(longest, length)
    if batch:
        yield batch


def _ensure_cache(model: Llama, rows: int, length: int) -> None:
    length = -(-length // CACHE_STEP) * CACHE_STEP
    if model.cache_batch != rows or model.max_seq < length:
        model.setup_cache(rows, length)


@torch.inference_mode()
def _score_batch(model: Llama, batch, pairs: Sequence[Pair]) -> dict[int, tuple[float, bool]]:
    device = model.model.embed_tokens.weight.device
    n_rows = sum(len(part) for _, part in batch)
    cmax = max(len(c) for c, _ in batch)
    lmax = max(len(pairs[i].continuation) for _, part in batch for i in part) - 1
    _ensure_cache(model, n_rows, cmax + max(lmax, 1))
    # 1. Each context once, into the first row of its group (right-padded; padding keys sit past the
    #    context and are overwritten by the continuation or hidden by the causal mask).
    firsts, starts, r = [], [], 0
    for _, part in batch:
        firsts.append(r)
        starts += [r] * len(part)
        r += len(part)
    tokens = torch.zeros(len(batch), cmax, dtype=torch.long)
    only = torch.zeros(len(batch), cmax, dtype=torch.bool)
    for g, (context, _) in enumerate(batch):
        tokens[g, :len(context)] = torch.tensor(context)
        only[g, len(context) - 1] = True
    positions = torch.arange(cmax).expand(len(batch), cmax)
    last = F.log_softmax(model(tokens.to(device), positions.to(device), rows=torch.tensor(firsts, device=device),
                               only=only.to(device)).float(), dim=-1)
    for layer in model.model.layers:  # share the context: copy its keys/values to the group's other rows
        cache = layer.self_attn.cache
        src = torch.tensor(starts, device=device)
        cache.k[:n_rows, :, :cmax] = cache.k[src, :, :cmax]
        cache.v[:n_rows, :, :cmax] = cache.v[src, :, :cmax]
    # 2. All continuations (but their last token) together, each after its own context.
    rest = None
    order = [(g, i) for g, (_, part) in enumerate(batch) for i in part]
    if lmax > 0:
        tokens = torch.zeros(n_rows, lmax, dtype=torch.long)
        only = torch.zeros(n_rows, lmax, dtype=torch.bool)
        positions = torch.zeros(n_rows, lmax, dtype=torch.long)
        for row, (g, i) in enumerate(order):
            feed = pairs[i].continuation[:-1]
            tokens[row, :len(feed)] = torch.tensor(feed, dtype=torch.long)
            only[row, :len(feed)] = True
            positions[row] = len(batch[g][0]) + torch.arange(lmax)
        rest = F.log_softmax(model(tokens.to(device), positions.to(device), rows=torch.arange(n_rows, device=device),
                                   only=only.to(device)).float(), dim=-1)
    out, offset = {}, 0
    for g, i in order:
        cont = pairs[i].continuation
        logp = last[g:g + 1] if len(cont) == 1 else torch.cat([last[g:g + 1], rest[offset:offset + len(cont) - 1]])
        offset += len(cont) - 1
        target = torch.tensor(cont, device=logp.device)
        out[i] = (float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
    return out


def score_pairs(model: Llama, pairs: Sequence[Pair], *, rows: int = 32, tokens: int = 16384,
                progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, whether every continuation token is the argmax) per pair."""
    if any(not p.context or not p.continuation for p in pairs):
        raise ValueError("every pair needs at least one context token and one continuation token")
    results: dict[int, tuple[float, bool]] = {}
    for batch in _batches(_groups(pairs), pairs, rows, tokens):
        results.update(_score_batch(model, batch, pairs))
        if progress is not None:
            progress(sum(len(part) for _, part in batch))
    return [results[i] for i in range(len(pairs))]

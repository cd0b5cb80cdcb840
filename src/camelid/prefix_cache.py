"""Prefix cache: a model's static KV cache remembers which tokens it holds, so the next request that
starts with the same tokens (the next turn of a chat, a shared system prompt, a re-run prompt)
computes only the tokens after the longest common prefix.

`KVSession` drives cache row 0 of one model for single-sequence generation (generate, chat,
speculative decoding). The scheduler keeps the same record for every row of its batch
(`Llama.cache_tokens`) and picks the free row with the longest match (scheduler.py).
Keys/values beyond the recorded tokens may be stale; every forward masks them out by position.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .model import Llama

CACHE_STEP = 256  # cache sizes are rounded up to this, so a growing chat rarely reallocates


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: long shared prompts are the common case.
    while i + 64 <= n and list(a[i:i + 64]) == list(b[i:i + 64]):
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i


def forward_row(model: Llama, row: int, ids: Sequence[int], start: int, last: int | None = None) -> Tensor:
    """Run `ids` into cache row `row` from position `start` and record them as the row's tokens (what it
    held after `start` is forgotten). Logits (len(ids), vocab), or only those of the `last` positions: a
    prompt needs just its final token's, and the vocabulary projection of every other position would cost
    a 128-token prefill about a third of its time on a small model.

    The one forward of a single sequence, shared by `KVSession` (row 0) and the scheduler (any row); the
    caller sets the grad mode (the scheduler's thread runs without grad, KVSession in inference mode)."""
    device = model.model.embed_tokens.weight.device
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)
    positions = torch.arange(start, start + len(ids), device=device)
    # A one-row cache is written and read as a view; indexing rows would copy its keys/values each call.
    rows = None if model.cache_batch == 1 else torch.tensor([row], device=device)
    if last is None or last >= len(ids):
        logits = model(tokens, positions, rows=rows)[0]
    else:
        only = torch.zeros(tokens.shape, dtype=torch.bool, device=device)
        only[0, len(ids) - last:] = True
        logits = model(tokens, positions, rows=rows, only=only)
    held = model.cache_tokens[row]
    del held[start:]
    held.extend(int(t) for t in ids)
    return logits


class KVSession:
    """The sequence of tokens whose keys/values fill row 0 of `model`'s static cache.

    `prefill(prompt)` reuses the longest prefix the cache already holds; `extend(ids)` appends tokens
    with one forward (prefill, or a speculative verification); `step(token)` is the one-token decode
    (optionally the compiled fixed-shape step); `truncate(n)` forgets everything after n tokens.
    """

    def __init__(self, model: Llama, context: int, *, compiled: bool = False, cache_step: int = CACHE_STEP):
        self.model, self.context, self.compiled, self.cache_step = model, context, compiled, cache_step
        self.device = model.model.embed_tokens.weight.device
        self.reused = 0  # prompt tokens served from the cache by the last prefill
        self.computed = 0  # prompt tokens the last prefill ran through the model

    @property
    def tokens(self) -> list[int]:
        if self.model.cache_batch != 1:
            return []
        return self.model.cache_tokens[0]

    def reserve(self, needed: int) -> None:
        """Make room for `needed` tokens in a one-row cache, keeping what it holds when it grows."""
        model = self.model
        if model.cache_batch == 1 and model.max_seq >= needed:
            return
        size = min(self.context, max(self.cache_step, -(-needed // self.cache_step) * self.cache_step))
        old = [layer.self_attn.cache for layer in model.model.layers] if model.cache_batch == 1 else None
        kept = list(self.tokens)
        model.setup_cache(1, max(size, needed))
        if old is not None and old[0] is not None:
            n = min(len(kept), old[0].k.shape[2])
            for layer, cache in zip(model.model.layers, old):
                layer.self_attn.cache.k[:, :, :n] = cache.k[:, :, :n]
                layer.self_attn.cache.v[:, :, :n] = cache.v[:, :, :n]
            model.cache_tokens[0] = kept[:n]

    def truncate(self, n: int) -> None:
        del self.tokens[n:]

    @torch.inference_mode()
    def extend(self, ids: Sequence[int], last: int | None = None) -> Tensor:
        """Run `ids` after the tokens held; logits (len(ids), vocab), one row per new token, or only the
        `last` rows."""
        start = len(self.tokens)
        self.reserve(start + len(ids))
        return forward_row(self.model, 0, ids, start, last)

    @torch.inference_mode()
    def step(self, token: int) -> Tensor:
        """Logits (vocab,) after feeding one token: the decode step, compiled when asked."""
        if not self.compiled:
            return self.extend([token])[0]
        position = len(self.tokens)
        self.reserve(position + 1)
        logits = self.model.decode_step(torch.tensor([[token]], dtype=torch.long, device=self.device),
                                        torch.tensor([position], device=self.device), compiled=True)[0]
        self.model.cache_tokens[0].append(int(token))
        return logits

    def prefill(self, prompt: Sequence[int], *, reuse: bool = True, reserve: int = 0) -> Tensor:
        """Logits (vocab,) of the prompt's last token, computing only what the cache does not hold.

        At least the last prompt token is computed again: its logits choose the first new token.
        `reserve` sizes the cache for that many tokens in all (prompt + reply) up front.
        """
        prompt = list(prompt)
        keep = min(common_prefix(self.tokens, prompt), len(prompt) - 1) if reuse else 0
        self.truncate(keep)
        self.reserve(max(reserve, len(prompt)))
        self.truncate(keep)  # a reallocation without contents left nothing to keep
        keep = len(self.tokens)
        self.reused, self.computed = keep, len(prompt) - keep
        return self.extend(prompt[keep:], last=1)[-1]

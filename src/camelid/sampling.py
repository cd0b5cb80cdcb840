"""Logits processing and the one token chooser, shared by `generate` (one sequence) and the server's
scheduler (a row of a continuous batch).

Order of processing, as in vLLM and llama.cpp: penalties on the raw logits, `logit_bias`, the grammar's
vocabulary bitmask (structured output), then temperature, top-k and top-p. A row whose every token is
masked or whose logits are not finite never reaches `torch.multinomial` (which would raise or pick an
arbitrary token): `choose` falls back to the best allowed token.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .errors import CamelidError


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
    """One token from logits of shape (vocab,): argmax when greedy, else a draw from the filtered distribution
    (through `choose`, so `generate` and the server share the guard against non-finite probabilities)."""
    return choose(logits, params, history=history, generator=generator)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A seeded generator on the device the sampling runs on (None: torch's global one)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed % (1 << 63))


def apply_bias(logits: torch.Tensor, bias: dict[int, float] | None) -> torch.Tensor:
    """OpenAI's `logit_bias`: values added to the logits of the given token ids (in place, on a copy made by
    the caller). -100 bans a token, +100 all but forces it."""
    if bias:
        ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
        logits[ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


_SHIFTS = torch.arange(32, dtype=torch.int32)


def bitmask_allows(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """The bool vector (vocab,) of a packed int32 bitmask (bit j of word i = token 32*i + j), the layout
    llguidance and xgrammar fill. Ids past the mask (padding rows of the embedding) are not allowed."""
    if mask.device.type == "cpu":
        # numpy unpacks the bits in one pass, without torch's thread pool (which costs more than the work here).
        bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[:vocab].astype(bool)
        allowed = torch.from_numpy(bits)
    else:
        allowed = (((mask.unsqueeze(-1) >> _SHIFTS.to(mask.device)) & 1).reshape(-1)[:vocab]).bool()
    if allowed.numel() < vocab:
        allowed = torch.cat([allowed, allowed.new_zeros(vocab - allowed.numel())])
    return allowed


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Tokens the grammar forbids get -inf (in place)."""
    if mask is None:
        return logits
    allowed = bitmask_allows(mask, logits.numel())
    if logits.device.type == "cpu" and logits.is_contiguous() and logits.dtype == torch.float32:
        logits.numpy()[~allowed.numpy()] = -np.inf
    else:
        logits.masked_fill_(~allowed.to(logits.device), float("-inf"))
    return logits


def choose(logits: torch.Tensor, params: SamplingParams, *, history: torch.Tensor | None = None,
           generator: torch.Generator | None = None, bias: dict[int, float] | None = None,
           mask: torch.Tensor | None = None, counts_penalty: torch.Tensor | None = None) -> int:
    """The next token from raw logits (vocab,): penalties (`counts_penalty` already computed from presence/
    frequency), bias, grammar mask, then greedy or a draw. Non-finite probabilities fall back to the best
    allowed token rather than an error or a banned token."""
    adjusted = logits.float().clone()
    if counts_penalty is not None:
        adjusted -= counts_penalty
    apply_bias(adjusted, bias)
    apply_bitmask(adjusted, mask)
    processed = process_logits(adjusted, params, history)
    if params.temperature > 0:
        probs = torch.softmax(processed, dim=-1)
        if torch.isfinite(probs).all() and float(probs.sum()) > 0:
            return int(torch.multinomial(probs, 1, generator=generator))
    # Greedy, or a temperature so small (or a mask so tight) that the softmax is not a distribution: the best
    # token by the unscaled logits among those top-k/top-p kept (logits / 1e-40 are all +-inf, so no order).
    if params.temperature > 0:
        kept = ~(torch.isneginf(processed) | torch.isnan(processed))
        processed = torch.where(kept, process_logits(adjusted, replace(params, temperature=0.0), history),
                                torch.full_like(processed, float("-inf")))
    finite = torch.where(torch.isnan(processed), torch.full_like(processed, float("-inf")), processed)
    if mask is not None and not torch.isfinite(finite).any():
        finite = torch.where(bitmask_allows(mask, finite.numel()).to(finite.device), logits.float(),
                             torch.full_like(finite, float("-inf")))
    return int(torch.argmax(finite))

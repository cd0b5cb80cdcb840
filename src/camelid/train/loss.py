"""The loss of packed rows and the gradient norm: the sum of cross-entropies over the trained tokens (the caller
divides by the global batch's trained tokens), computed on the rows without their padding; the global
gradient norm in float64 across ranks, and clipping to it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..packing import IGNORE, attention_mask


def score_cost(config: Any) -> float:
    """What one attention score costs next to one token through a block's linear layers (flops, both
    per layer): 4 x heads x head_dim for QK^T and PV, against 2 x the block's weights. ~1/3000 for SmolLM2."""
    d, hd = config.hidden_size, config.head_dim
    weights = d * hd * (2 * config.num_heads + 2 * config.num_kv_heads) + 3 * d * config.intermediate_size
    return 4 * config.num_heads * hd / (2 * weights)


def unpad(tokens: Tensor, labels: Tensor, positions: Tensor, segments: Tensor,
          per_score: float = 1 / 3000) -> tuple[Tensor, ...]:
    """A batch of packed rows without its padding: the real tokens of all rows end to end in one row (1, n),
    segment ids made unique across rows so the block-diagonal mask keeps every example apart; or, when that
    costs more, the rows cut to the longest row's real length.

    Padding costs as much as a real token in every matrix product, and first-fit rows of short conversations
    are often only 70-80% full. But the attention kernel computes every score of a masked row, so one row of n
    tokens means n^2 scores against rows x length^2: the layout with fewer flops wins, a score counting
    `per_score` tokens (`score_cost`)."""
    real = segments >= 0
    n, (rows, seq) = int(real.sum()), segments.shape
    end = int(real.any(0).nonzero().max()) + 1
    if rows > 1 and n + n * n * per_score < rows * end * (1 + end * per_score):
        unique = segments + seq * torch.arange(rows, dtype=segments.dtype)[:, None]
        return tokens[real][None], labels[real][None], positions[real][None], unique[real][None]
    return tokens[:, :end], labels[:, :end], positions[:, :end], segments[:, :end]


def token_loss_sum(model: nn.Module, tokens: Tensor, labels: Tensor, positions: Tensor, segments: Tensor,
                   autocast: torch.dtype | None = None) -> Tensor:
    """Sum of cross-entropies over the trained tokens of packed rows (block-diagonal attention)."""
    device = next(model.parameters()).device
    config = getattr(model, "config", None)
    tokens, labels, positions, segments = unpad(tokens, labels, positions, segments,
                                                *([score_cost(config)] if config is not None else []))
    allowed = attention_mask(segments.to(device))
    # SDPA turns a boolean mask into an additive one in every layer and keeps each copy for the backward
    # (layers x rows x seq^2 floats); made once here, in the dtype attention computes in, the layers share it.
    mask = torch.zeros(allowed.shape, dtype=autocast or torch.float32, device=device)
    mask.masked_fill_(~allowed, float("-inf"))
    labels = labels.to(device).long()
    trained = labels != IGNORE  # logits only where a loss is taken: the vocabulary projection is costly
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        logits = model(tokens.to(device).long(), positions.to(device).long(), mask, only=trained)
    return F.cross_entropy(logits.float(), labels[trained], reduction="sum")


def square_sum(t: Tensor, chunk: int = 1024) -> Tensor:
    """sum(t**2) in float64, without a float64 copy of t: fp32 norms of 1024-element pieces, squared and
    summed in float64. A plain fp32 norm of a 28M-element gradient is off by ~1e-3 on CPU; this by ~1e-9."""
    flat = t.detach().reshape(-1)
    n = flat.numel() // chunk * chunk
    pieces = torch.linalg.vector_norm(flat[:n].view(-1, chunk), dim=1).double().pow(2).sum() if n else 0.0
    return flat[n:].double().pow(2).sum() + pieces


def clip_gradients(params: list[Tensor], max_norm: float, world: int) -> float:
    """The global gradient norm (float64 sums of squares of each rank's shards, all-reduced), and clipping to
    max_norm. Casting whole gradients to float64 instead copied the model every step (a sixth of the step)."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float64)
    for g in grads:
        squares += square_sum(g.to_local() if hasattr(g, "to_local") else g).cpu()
    if world > 1:
        dist.all_reduce(squares)
    norm = float(squares.sqrt())
    if max_norm > 0 and norm > max_norm:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm

"""What each step trains on and at what rate: the seeded order of packed rows (a function of the step alone, so
a resumed run needs no other state) and the learning rate (linear warmup, cosine decay).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..errors import CamelidError


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to the peak, then cosine decay to min_ratio x peak at the last step."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


class Schedule:
    """Which packed rows each rank trains on at each step: a seeded permutation per epoch, global batches of
    batch x world rows, rank r taking its slice. Depends only on the step, so resuming needs no other state."""

    def __init__(self, n_rows: int, batch: int, world: int, accum: int, seed: int):
        self.batch, self.world, self.accum, self.seed = batch, world, accum, seed
        self.per_epoch = n_rows // (batch * world)
        if self.per_epoch < accum:
            raise CamelidError(f"{n_rows} packed rows are too few for one step of batch {batch} x {world} processes "
                               f"x grad-accum {accum}; lower --batch-size / --grad-accum or add data")
        self.steps_per_epoch = self.per_epoch // accum
        self._perm: tuple[int, Tensor] | None = None

    def rows(self, step: int, micro: int) -> Tensor:
        """All rows (every rank's) of one micro-batch."""
        epoch, j = divmod(step * self.accum + micro, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perm = (epoch, torch.randperm(self.per_epoch * self.batch * self.world, generator=g))
        size = self.batch * self.world
        return self._perm[1][j * size:(j + 1) * size]

    def mine(self, rows: Tensor, rank: int) -> Tensor:
        return rows[rank * self.batch:(rank + 1) * self.batch]

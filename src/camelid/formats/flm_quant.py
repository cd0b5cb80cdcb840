"""fastllm's low-bit weight rules: the (min, max) pairs a .flm stores, and how its loader turns them
into a scale and zero point (`LowBitConfig::Reset` in fastllm's include/fastllm.h).

Loader rule, in float32: min' = min(min, 0), max' = max(max, 0), scale = (max' - min') / (2^b - 1),
zp = round(-min' / scale) (half away from zero, clipped to [0, 2^b - 1]).
  int8 (code 3):            w = scale * (q - zp)
  int4 (code 8), int4-group (code 9, "no zero point"): m = -scale * zp, w = m + scale * q

fastllm's own writer stores the data's (min, max) and quantizes with its own (scale, zp), so the loader
often derives a different pair (one step off in the zero point, or a slightly different scale). We
choose (s, z) per row (or group), store min = -s*z, max = s*(qmax - z), run the loader's rule on those
stored float32 numbers, and quantize with the pair it yields: whatever fastllm derives is, by
construction, exactly what the values were quantized with.
"""
from __future__ import annotations

import torch

from ..errors import CamelidError


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves go away from zero (torch.round goes to even). x - trunc(x) is exact in float32."""
    t = torch.trunc(x)
    frac = x - t
    return t + (frac >= 0.5).to(x.dtype) - (frac <= -0.5).to(x.dtype)


def loader_params(mins: torch.Tensor, maxs: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) as fastllm's loader derives them from stored float32 (min, max) pairs."""
    qmax = float((1 << bits) - 1)
    lo = torch.minimum(mins.float(), torch.zeros(()))
    hi = torch.maximum(maxs.float(), torch.zeros(()))
    scale = (hi - lo) / qmax
    initial = 0.0 - lo / scale
    zp = torch.where(initial < 0, torch.zeros(()), torch.where(initial > qmax, torch.full((), qmax),
                                                                _round_half_away(initial)))
    return scale, zp


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, with_zero: bool) -> torch.Tensor:
    """q (rows, cols) uint8 codes; scale, zp (rows, 1) from `loader_params`. float32 out, as fastllm
    computes it: int8 `scale * (q - zp)`; int4 `(-scale * zp) + scale * q`."""
    qf = q.float()
    if with_zero:
        return scale * (qf - zp)
    return (-(scale * zp)) + scale * qf


def choose_params(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored (min, max) per row of `rows` (n, k): asymmetric min/max over the row with 0 kept in range
    (the loader forces that anyway), encoded as min = -s*z, max = s*(qmax - z)."""
    qmax = float((1 << bits) - 1)
    x = rows.float()
    lo = torch.clamp(x.amin(dim=1, keepdim=True), max=0.0)
    hi = torch.clamp(x.amax(dim=1, keepdim=True), min=0.0)
    s = (hi - lo) / qmax
    # An all-zero row: any positive scale reproduces it exactly (every code equals the zero point).
    s = torch.where(s > 0, s, torch.ones(()))
    z = torch.clamp(_round_half_away(-lo / s), 0, qmax)
    return -s * z, s * (qmax - z)


def quantize_rows(rows: torch.Tensor, bits: int, with_zero: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows (n, k) -> (codes uint8 (n, k), stored mins (n,), stored maxs (n,), scale (n, 1), zp (n, 1)),
    the codes made with exactly the (scale, zp) fastllm's loader will derive from the stored pair."""
    qmax = float((1 << bits) - 1)
    x = rows.float()
    mins, maxs = choose_params(x, bits)
    scale, zp = loader_params(mins, maxs, bits)
    if not torch.isfinite(scale).all() or not (scale > 0).all():
        raise CamelidError("cannot quantize a tensor with non-finite values (inf or nan) for fastllm")
    if with_zero:
        q = _round_half_away(x / scale + zp)
    else:
        q = _round_half_away((x - (-(scale * zp))) / scale)
    q = torch.clamp(q, 0, qmax).to(torch.uint8)
    return q, mins.reshape(-1), maxs.reshape(-1), scale, zp


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(n, k) codes 0..15 -> (n, k/2) bytes; the even column goes to the high nibble (fastllm's order)."""
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    out = torch.empty(packed.shape[0], cols, dtype=torch.uint8)
    out[:, 0::2] = packed >> 4
    out[:, 1::2] = packed & 0x0F
    return out

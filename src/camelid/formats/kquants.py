"""GGUF K-quant output: Q4_K, Q5_K and Q6_K blocks, and llama.cpp's Q4_K_M / Q5_K_M / Q6_K type mixes.

Blocks hold 256 values (a "super-block") and are laid out as ggml-common.h has them (gguf-py's
`gguf.quants` dequantizes them the same way):
  Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) for 8 sub-blocks of 32, 128 bytes of
        nibbles (sub-blocks 2j and 2j+1 share bytes 32j..32j+31: low nibble, high nibble);
        value = d * scale_s * q - dmin * min_s, q in 0..15.
  Q5_K (176 bytes): as Q4_K plus 32 bytes of fifth bits (bit s of byte l = 16 for element l of sub-block s).
  Q6_K (210 bytes): 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales (sub-blocks of 16), f16 d;
        value = d * scale_s * (q - 32), q in 0..63.
Scales are chosen per sub-block from its min/max (one pass; llama.cpp's quantizer also searches nearby
scales, so its error is somewhat lower), then rounded up to 6 or 8 bits against the super-block's f16
factors (so no value is clipped), and the values are picked for the rounded scales.

The mixes follow llama.cpp's `llama_tensor_get_type` for LLaMA: the output matrix (the embedding when the
output is tied) in Q6_K; in Q4_K_M / Q5_K_M, attn_v and ffn_down in Q6_K for the layers `use_more_bits`
picks (the first and last eighth and every third in between); everything else in the base type. A matrix
whose rows do not split into 256-blocks falls back as llama.cpp does: Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0 (the output: Q8_0), F16 when even 32 does not divide.
"""
from __future__ import annotations

import re

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
MIXES = {"q4_k_m": Q.Q4_K, "q5_k_m": Q.Q5_K, "q6_k": Q.Q6_K}
FILE_TYPES = {"q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
              "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K}
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
_LAYER = re.compile(r"blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def mix_type(mix: str, name: str, cols: int, n_layer: int, has_output: bool) -> "gguf.GGMLQuantizationType":
    """The GGUF type llama.cpp's quantizer gives the 2-D tensor `name` (GGUF name) in the mix `mix`."""
    qtype = MIXES[mix]
    layer = _LAYER.match(name)
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):
        return Q.Q8_0 if cols % 256 else Q.Q6_K
    if mix in ("q4_k_m", "q5_k_m") and layer and ("attn_v.weight" in name or "ffn_down" in name) \
            and use_more_bits(int(layer.group(1)), n_layer):
        qtype = Q.Q6_K
    if cols % 256:
        qtype = _FALLBACK[qtype]
        if cols % 32:
            qtype = Q.F16
    return qtype


def _f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the f16 bytes as uint8 pairs, the value the reader will see as float32)."""
    h = x.astype(np.float16)
    return h.view(np.uint8).reshape(*x.shape, 2), h.astype(np.float32)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def _scale_min_blocks(x: np.ndarray, nmax: int) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K: per sub-block of 32, 6-bit scale and min under f16 super-block factors; values 0..nmax."""
    lo = np.minimum(x.min(axis=2), 0)  # (nb, 8); the format subtracts a non-negative min
    mins = -lo
    m_bytes, dmin = _f16(mins.max(axis=1) / 63)
    # Both 6-bit factors round up, so the rounded min still reaches the lowest value and the rounded scale
    # the highest: no value is clipped, each is off by at most half a step.
    lm = np.clip(np.ceil(_ratio(mins, dmin[:, None])), 0, 63).astype(np.uint8)
    offset = dmin[:, None] * lm
    scale = (x.max(axis=2) + offset) / nmax
    d_bytes, d = _f16(scale.max(axis=1) / 63)
    ls = np.clip(np.ceil(_ratio(scale, d[:, None]) - 1e-6), 0, 63).astype(np.uint8)
    step = d[:, None] * ls
    q = np.clip(np.rint(_ratio(x + offset[..., None], np.broadcast_to(step[..., None], x.shape).copy())), 0, nmax)
    packed = np.zeros((x.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return d_bytes, m_bytes, packed, q.astype(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(nb, 8, 32) values -> (nb, 128) bytes: sub-block 2j in the low nibbles of bytes 32j.., 2j+1 in the high."""
    low = q[:, 0::2] & 0xF
    high = q[:, 1::2] & 0xF
    return (low | (high << 4)).reshape(q.shape[0], 128)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float32).reshape(-1, 8, 32)
    d, dmin, scales, q = _scale_min_blocks(x, 15)
    return np.concatenate([d, dmin, scales, _nibbles(q)], axis=1).reshape(rows.shape[0], -1)


def quantize_q5_k(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float32).reshape(-1, 8, 32)
    d, dmin, scales, q = _scale_min_blocks(x, 31)
    fifth = (q >> 4) & 1  # (nb, 8, 32): bit s of byte l
    qh = (fifth << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    return np.concatenate([d, dmin, scales, qh, _nibbles(q)], axis=1).reshape(rows.shape[0], -1)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float32).reshape(-1, 16, 16)
    scale = np.abs(x).max(axis=2) / 31  # (nb, 16), symmetric: q - 32 in -31..31
    d_bytes, d = _f16(scale.max(axis=1) / 127)
    sc = np.clip(np.ceil(_ratio(scale, d[:, None]) - 1e-6), -128, 127).astype(np.int8)  # up: nothing clipped
    step = np.broadcast_to((d[:, None] * sc)[..., None], x.shape).copy()
    q = (np.clip(np.rint(_ratio(x, step)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    # per half of 128: element 32k + l (k = 0..3) -> ql[l + 32 * (k & 1)] nibble (k >> 1), qh[l] bits 2k..2k+1
    ql = np.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                         (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    return np.concatenate([ql, qh.reshape(-1, 64), sc.view(np.uint8), d_bytes], axis=1).reshape(rows.shape[0], -1)


QUANTIZERS = {Q.Q4_K: quantize_q4_k, Q.Q5_K: quantize_q5_k, Q.Q6_K: quantize_q6_k}


def quantize(rows: np.ndarray, qtype: "gguf.GGMLQuantizationType") -> np.ndarray:
    """(rows, cols) float -> (rows, bytes per row) blocks of `qtype` (K-quants here, the rest by gguf-py)."""
    if qtype in QUANTIZERS:
        return QUANTIZERS[qtype](rows)
    return gguf.quants.quantize(rows.astype(np.float32), qtype)

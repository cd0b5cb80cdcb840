"""Weights kept as GGUF blocks (Q4_0, Q4_1, Q8_0) and the modules that run them through the native kernels.

A block matrix is a contiguous uint8 tensor (rows, row bytes): the GGUF file's own bytes, memory-mapped, so a
quantized model is never copied or widened. Our own int4 (w = (q - 8) s + z per group of 32/64/128) becomes
Q4_1 blocks (d = s, m = z - 8 s, both rounded to float16 as GGUF stores them) and int8 per channel becomes Q8_0
blocks (d = the row's scale), so one kernel serves every quantized layout.

`dequantize` is the PyTorch reference every kernel is tested against; `NativeLinear` and `NativeEmbedding` fall
back to it (dequantized once, kept in float) where the extension is not built.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from . import ext

TYPES = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}
# type + PACKED: the same blocks repacked with 8 rows interleaved (csrc/repack.cpp), the layout the decode
# kernels read fastest; `unpack` is its reference.
PACKED = 3
# Float matrices (kernels/dense.py) through the same interface: the rows' bytes, "blocks" of 32 values.
FLOAT_TYPES = {torch.bfloat16: 6, torch.float32: 7}
FLOAT_DTYPES = {v: k for k, v in FLOAT_TYPES.items()}
BLOCK_BYTES = {0: 18, 1: 20, 2: 34, 3: 18, 4: 20, 5: 34, 6: 64, 7: 128}
NO_PERM = torch.empty(0, dtype=torch.int64)
# From this many activation rows on, on a build without the int8 tile kernel (AVX512-VNNI, csrc/gemm.cpp),
# products go through bfloat16 weight tiles and oneDNN; below it the int8 kernel.
# Measured on AVX512-BF16 (Zen 4), one thread, 11264 x 2048 Q4_0: 8 rows 2.8 vs 3.0 ms, 32 rows 9.5 vs 24 ms,
# 128 rows 30 vs 108 ms. With the tile kernel products stay int8 at every size: 5632 x 2048 Q4_0 on Zen 5, one
# thread, 32 rows 1.8 ms vs 3.7 (bf16), 128 rows 5.5 vs 8.1 (benchmarks/prefill_kernels.py).
PREFILL_ROWS = 8
# float32 products through oneDNN with the plain weight (the op inductor uses): PyTorch's own float32 matmul goes
# to MKL, whose AVX2 kernels it picks on AMD CPUs: 5632 x 2048, 128 rows, one thread on Zen 5: 207 vs 95
# GFLOP/s, the same sums to float rounding (benchmarks/prefill_kernels.py). None where torch lacks it.
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def _header(qtype: int) -> int:
    return 32 if qtype % PACKED == TYPES["Q4_1"] else 16


def pack(blocks: Tensor, qtype: int) -> Tensor:
    """Reference for the kernels' repack: plain blocks -> rows in groups of 8 interleaved (rows % 8 stay plain).
    Per group and block: the 8 rows' scales (and Q4_1 minimums), then 4-value chunks with row j in 32-bit lane j
    (Q4: byte 32L + 4j + i = value 8L+i | value 8L+4+i << 4; Q8_0: byte 32c + 4j + i = value 4c+i)."""
    rows, width = blocks.shape
    bs, g = BLOCK_BYTES[qtype], rows // 8
    b = blocks[:g * 8].reshape(g, 8, -1, bs)
    heads = [b[..., :2]] + ([b[..., 2:4]] if qtype == TYPES["Q4_1"] else [])
    heads = [h.permute(0, 2, 1, 3).reshape(g, -1, 16) for h in heads]
    if qtype == TYPES["Q8_0"]:
        qs = b[..., 2:].reshape(g, 8, -1, 8, 4).permute(0, 2, 3, 1, 4).reshape(g, -1, 256)
    else:
        p = b[..., bs - 16:]
        v = torch.cat([p & 0x0F, p >> 4], dim=-1).reshape(g, 8, -1, 4, 8)
        qs = (v[..., :4] | (v[..., 4:] << 4)).permute(0, 2, 3, 1, 4).reshape(g, -1, 128)
    body = torch.cat(heads + [qs], dim=-1).reshape(g * 8, width)
    return torch.cat([body, blocks[g * 8:]]).contiguous()


def unpack(blocks: Tensor, qtype: int) -> Tensor:
    """Inverse of `pack` (qtype the repacked type): back to plain GGUF blocks."""
    rows, width = blocks.shape
    base, g = qtype % PACKED, rows // 8
    bs, hdr = BLOCK_BYTES[base], _header(base)
    grp = blocks[:g * 8].reshape(g, -1, 8 * bs)
    heads = [grp[..., o:o + 16].reshape(g, -1, 8, 2).permute(0, 2, 1, 3) for o in range(0, hdr, 16)]
    if base == TYPES["Q8_0"]:
        qs = grp[..., hdr:].reshape(g, -1, 8, 8, 4).permute(0, 3, 1, 2, 4).reshape(g, 8, -1, 32)
    else:
        p = grp[..., hdr:].reshape(g, -1, 4, 8, 4).permute(0, 3, 1, 2, 4)  # (g, row, block, L, i)
        v = torch.cat([p & 0x0F, p >> 4], dim=-1).reshape(g, 8, -1, 32)
        qs = v[..., :16] | (v[..., 16:] << 4)
    body = torch.cat(heads + [qs], dim=-1).reshape(g * 8, width)
    return torch.cat([body, blocks[g * 8:]]).contiguous()


def repack(blocks: Tensor, qtype: int, release: bool = False) -> tuple[Tensor, int]:
    """(blocks, type) in the kernels' fastest layout: a native repacked copy where the build reads one (AVX2),
    else as given. release: `blocks` is a read-only file mapping whose pages may be dropped as they are copied."""
    module = ext()
    # CAMELID_NO_REPACK=1 keeps the file's layout (benchmarks/repack_decode.py measures one against the other).
    if module is None or qtype >= PACKED or os.environ.get("CAMELID_NO_REPACK", "") not in ("", "0"):
        return blocks, qtype
    out, t = module.repack(blocks, qtype, release)
    return out, int(t)


def load_layout(blocks: Tensor, qtype: int, release: bool = False) -> tuple[Tensor, int]:
    """The layout a loaded model keeps: Q4_0/Q4_1 repacked (decode 1.3-1.5x faster at 1.1B), Q8_0 as stored.
    The decode kernel reads plain Q8_0 rows as fast as repacked ones (1.1B: 24.8 vs 23.6 tok/s at 1 thread, 35.7
    vs 36.2 at 2; benchmarks/repack_decode.py), so its repack would only add load time (2-3 s for 1.2 GB) and,
    for a file, a copy in place of shared page-cache pages."""
    if qtype % PACKED == TYPES["Q8_0"]:
        return blocks, qtype
    return repack(blocks, qtype, release)


def dequantize(blocks: Tensor, qtype: int) -> Tensor:
    """Reference: a block matrix (rows, row bytes) -> float32 (rows, cols), plain PyTorch."""
    if qtype in FLOAT_DTYPES:
        return blocks.view(FLOAT_DTYPES[qtype]).float()
    if qtype >= PACKED:
        blocks, qtype = unpack(blocks, qtype), qtype - PACKED
    rows = blocks.shape[0]
    b = blocks.reshape(rows, -1, BLOCK_BYTES[qtype])
    d = b[..., :2].contiguous().view(torch.float16).float()
    if qtype == TYPES["Q8_0"]:
        return (b[..., 2:].contiguous().view(torch.int8).float() * d).reshape(rows, -1)
    packed = b[..., 2:] if qtype == TYPES["Q4_0"] else b[..., 4:]
    q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()
    m = -8 * d if qtype == TYPES["Q4_0"] else b[..., 2:4].contiguous().view(torch.float16).float()
    return (q * d + m).reshape(rows, -1)


def quantize_activations(x: Tensor) -> Tensor:
    """Reference for the kernels' activation rounding: x (m, k) -> x rounded to int8 per block of 32, as float."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(d == 0, torch.ones_like(d), d))
    return (q * d).reshape(x.shape)


def from_int4(q: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """Our int4 (values 0..15 (rows, cols), scales/zeros per group of 32/64/128) -> Q4_1 blocks."""
    rows, cols = q.shape
    rep = cols // 32 // scales.shape[1]
    s = scales.float().repeat_interleave(rep, dim=1)
    m = zeros.float().repeat_interleave(rep, dim=1) - 8 * s
    qb = q.to(torch.uint8).reshape(rows, cols // 32, 32)
    packed = qb[..., :16] | (qb[..., 16:] << 4)
    head = torch.stack([s.half(), m.half()], dim=-1).view(torch.uint8)  # (rows, blocks, 4)
    return torch.cat([head, packed], dim=-1).reshape(rows, -1).contiguous()


def from_int8(q: Tensor, scales: Tensor) -> Tensor:
    """Our int8 per output channel (q int8 (rows, cols), scales (rows,)) -> Q8_0 blocks, d = the row's scale."""
    rows, cols = q.shape
    d = scales.float().half()[:, None, None].expand(rows, cols // 32, 1).contiguous().view(torch.uint8)
    return torch.cat([d, q.to(torch.int8).reshape(rows, cols // 32, 32).view(torch.uint8)], dim=-1) \
        .reshape(rows, -1).contiguous()


def perm_from_source(src: Tensor) -> Tensor:
    """Row i of the wanted order is stored row src[i]: the kernel's perm (stored row r -> output row perm[r])."""
    return torch.argsort(src).to(torch.int64).contiguous()


class NativeLinear(nn.Module):
    """y = x @ W.T for one or more block matrices side by side (q/k/v or gate/up joined without a copy).

    parts: (blocks, type, perm) with perm an int64 row permutation or empty."""

    def __init__(self, parts: list[tuple[Tensor, int, Tensor]]):
        super().__init__()
        self.types = [int(t) for _, t, _ in parts]
        self.sizes = [int(b.shape[0]) for b, _, _ in parts]
        self.in_features = int(parts[0][0].shape[1]) // BLOCK_BYTES[self.types[0]] * 32
        self.out_features = sum(self.sizes)
        for i, (b, _, p) in enumerate(parts):
            self.register_buffer(f"blocks{i}", b, persistent=False)
            self.register_buffer(f"perm{i}", p if p.numel() else NO_PERM, persistent=False)
        self._float: Tensor | None = None

    def parts(self) -> list[tuple[Tensor, int, Tensor]]:
        return [(getattr(self, f"blocks{i}"), t, getattr(self, f"perm{i}")) for i, t in enumerate(self.types)]

    def reference_weight(self) -> Tensor:
        """The float weight (out, in) these blocks hold, rows in output order (the reference path)."""
        out = []
        for b, t, p in self.parts():
            w = dequantize(b, t)
            if p.numel():
                w = torch.empty_like(w).index_copy_(0, p, w)
            out.append(w)
        return torch.cat(out)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        module = ext()
        if module is not None:
            blocks, types, perms = (list(p) for p in zip(*self.parts()))
            if x2.shape[0] >= PREFILL_ROWS and types[0] in FLOAT_DTYPES:
                y = self._float_prefill(x2)
            else:
                tiled = module.has_tile_kernel()
                run = module.qmatmul_bf16 if x2.shape[0] >= PREFILL_ROWS and not tiled else module.qmatmul
                y = run(x2, blocks, types, perms)
        else:
            if self._float is None:
                self._float = self.reference_weight()
            y = x2 @ self._float.T
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _float_prefill(self, x: Tensor) -> Tensor:
        """Float matrices, prefill-sized, through oneDNN: bfloat16 (activations rounded to bfloat16, as the decode
        kernel does; outputs too, libtorch having no bf16 x bf16 -> f32 GEMM on CPU) or float32 (exact products).
        Float parts carry no row permutation (kernels/dense.py makes none)."""
        outs = []
        for b, t, _ in self.parts():
            w = b.view(FLOAT_DTYPES[t])
            if w.dtype == torch.float32 and _ONEDNN_LINEAR is not None:
                outs.append(_ONEDNN_LINEAR(x, w, None, "none", [None], ""))
            else:
                outs.append(torch.nn.functional.linear(x.to(w.dtype), w).float())
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        names = {v: k for k, v in TYPES.items()} | {v + PACKED: k + "x8" for k, v in TYPES.items()} | \
            {6: "BF16", 7: "F32"}
        return f"in={self.in_features}, out={self.sizes}, {'/'.join(sorted({names[t] for t in self.types}))} blocks"


class NativeEmbedding(nn.Module):
    """Token embedding read from block rows (the quantized embedding stays quantized; tied output reuses it)."""

    def __init__(self, blocks: Tensor, qtype: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.qtype = qtype
        self.register_buffer("blocks", blocks, persistent=False)
        self.num_embeddings = int(blocks.shape[0])
        self.embedding_dim = int(blocks.shape[1]) // BLOCK_BYTES[qtype] * 32
        # An empty stand-in: callers ask `embed_tokens.weight` for the model's dtype and device.
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=blocks.device), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        module = ext()
        flat = tokens.reshape(-1)
        if module is not None:
            rows = module.dequantize_rows(self.blocks, self.qtype, flat)
        else:
            plain = unpack(self.blocks, self.qtype) if PACKED <= self.qtype < 2 * PACKED else self.blocks
            rows = dequantize(plain[flat], self.qtype if self.qtype in FLOAT_DTYPES else self.qtype % PACKED)
        return rows.reshape(*tokens.shape, self.embedding_dim).to(self.weight.dtype)

"""Prefill-sized products on one 5632 x 2048 matrix (the 1.1B shape's gate/up), 1-128 activation rows: the int8
kernels (the decode kernel below 12 rows, the 8-row x 16-token tile kernel from there) against the bfloat16
weight tiles + oneDNN path, on repacked and plain blocks, with GOP/s and the relative error against the reference
(int8-rounded activations times the dequantized weights). Then float32 products: PyTorch's matmul (MKL) against
oneDNN with the plain weight (`torch.ops.mkldnn._linear_pointwise`, what kernels/blocks.py uses for float models).

    python benchmarks/prefill_kernels.py [THREADS]
"""
from __future__ import annotations

import sys
import time
from typing import Callable

import gguf
import torch

from camelid import kernels
from camelid.kernels import blocks as kb

ROWS, COLS = 5632, 2048
GGUF_TYPES = {0: gguf.GGMLQuantizationType.Q4_0, 1: gguf.GGMLQuantizationType.Q4_1, 2: gguf.GGMLQuantizationType.Q8_0}


def best_of(f: Callable[[], object], n: int = 5) -> float:
    """Fastest of n timed calls, after one warm-up, in seconds."""
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def blocks_of(qtype: int) -> torch.Tensor:
    w = torch.randn(ROWS, COLS) * 0.02
    q = gguf.quants.quantize(w.numpy(), GGUF_TYPES[qtype])
    return torch.from_numpy(q.copy()).view(torch.uint8).reshape(ROWS, -1).contiguous()


def block_products() -> None:
    module = kernels.ext()
    for qtype in GGUF_TYPES:
        plain = blocks_of(qtype)
        packed, ptype = kb.repack(plain, qtype)
        weight = kb.dequantize(plain, qtype)
        for m in (1, 4, 8, 9, 16, 32, 128):
            x = torch.randn(m, COLS)
            y = module.qmatmul(x, [packed], [ptype], [kb.NO_PERM])
            ref = kb.quantize_activations(x) @ weight.T
            err = float((y - ref).abs().max() / ref.abs().max())
            int8 = best_of(lambda: module.qmatmul(x, [packed], [ptype], [kb.NO_PERM]))
            tiles = best_of(lambda: module.qmatmul_bf16(x, [packed], [ptype], [kb.NO_PERM]))
            tiles_plain = best_of(lambda: module.qmatmul_bf16(x, [plain], [qtype], [kb.NO_PERM]))
            gops = 2 * m * ROWS * COLS / int8 / 1e9
            print(f"{gguf.GGMLQuantizationType(GGUF_TYPES[qtype]).name} rows {m:4d}: int8 {int8 * 1e3:6.2f} ms "
                  f"({gops:4.0f} GOP/s, rel. error {err:.1e})  bf16 tiles {tiles * 1e3:6.2f} ms repacked, "
                  f"{tiles_plain * 1e3:6.2f} ms plain", flush=True)


def float_products() -> None:
    onednn = torch.ops.mkldnn._linear_pointwise
    for m in (32, 128):
        w, x = torch.randn(ROWS, COLS), torch.randn(m, COLS)
        mkl = best_of(lambda: torch.nn.functional.linear(x, w))
        dnnl = best_of(lambda: onednn(x, w, None, "none", [None], ""))
        gflops = lambda s: 2 * m * ROWS * COLS / s / 1e9
        print(f"float32 rows {m:4d}: torch (MKL) {mkl * 1e3:6.2f} ms ({gflops(mkl):.0f} GFLOP/s)  "
              f"oneDNN {dnnl * 1e3:6.2f} ms ({gflops(dnnl):.0f} GFLOP/s)", flush=True)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    if kernels.ext() is None:
        sys.exit("native kernels not built here")
    block_products()
    float_products()


if __name__ == "__main__":
    main()

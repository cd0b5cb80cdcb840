"""Prefill-sized block products, one 5632 x 2048 matrix (the 1.1B shape's gate/up), 1-128 activation rows: the
int8 kernels (the decode kernel below 12 rows, the 8-row x 16-token tile kernel from there) against the bfloat16
weight tiles + oneDNN path, on repacked and plain blocks; GOP/s and the relative error against the reference
(int8-rounded activations times the dequantized weights).

    python benchmarks/prefill_kernels.py [THREADS]
"""
import sys
import time

import torch
from camelid import kernels
from camelid.kernels import blocks as kb
import gguf
torch.manual_seed(0)
m = kernels.ext()
def make(rows, cols, t):
    w = torch.randn(rows, cols) * 0.02
    qt = {0: gguf.GGMLQuantizationType.Q4_0, 1: gguf.GGMLQuantizationType.Q4_1, 2: gguf.GGMLQuantizationType.Q8_0}[t]
    b = torch.from_numpy(gguf.quants.quantize(w.numpy(), qt).copy()).view(torch.uint8).reshape(rows, -1).contiguous()
    return b
threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(threads)
for t in (0, 1, 2):
    b = make(5632, 2048, t)
    pb, pt = kb.repack(b, t)
    ref_w = kb.dequantize(b, t)
    for M in (1, 4, 8, 9, 16, 32, 128):
        x = torch.randn(M, 2048)
        y = m.qmatmul(x, [pb], [pt], [kb.NO_PERM])
        ref = kb.quantize_activations(x) @ ref_w.T
        err = (y - ref).abs().max().item() / ref.abs().max().item()
        def tm(f, n=5):
            f(); ts=[]
            for _ in range(n):
                t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
            return min(ts)
        a = tm(lambda: m.qmatmul(x, [pb], [pt], [kb.NO_PERM]))
        bb = tm(lambda: m.qmatmul_bf16(x, [pb], [pt], [kb.NO_PERM]))
        c = tm(lambda: m.qmatmul_bf16(x, [b], [t], [kb.NO_PERM]))
        gm = lambda s: 2*M*5632*2048/s/1e9
        print(f"type {t} M {M:4d} relerr {err:.1e}  int8 {a*1e3:7.2f} ms ({gm(a):6.0f} GOP/s)  bf16(repacked) {bb*1e3:7.2f}  bf16(file) {c*1e3:7.2f}", flush=True)

"""Weight-only linear kernels on this CPU: GB/s of weights streamed per kernel for the built-in model's shapes.

    .venv/bin/python benchmarks/linear_kernels.py [--threads 2] [--batches 1,128] [--compile]

Decode (batch 1) is bound by how fast the weights are read, so GB/s = weight bytes / time is the figure
to compare with the machine's ~30 GB/s; at batch 128 (prefill) the kernels are compute bound and the
GFLOP/s column matters. Used to choose camelid.quantize's kernels.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in) of SmolLM2-135M


def _time(fn, min_seconds: float = 0.25) -> float:
    fn()
    fn()
    times = []
    deadline = time.perf_counter() + min_seconds
    while time.perf_counter() < deadline or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    # The best time: on a shared machine the median mostly measures the neighbours (OpenMP threads that
    # spin-wait for a descheduled partner make 2-thread medians swing 100x).
    return min(times)


def kernels(n: int, k: int, compile_: bool):
    """(name, weight bytes, fn(x_fp32, x_bf16)) for one (out, in) shape."""
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    out = []
    wb = w.bfloat16()
    out.append(("fp32 linear", w.numel() * 4, lambda x, xb: F.linear(x, w)))
    out.append(("bf16 linear", w.numel() * 2, lambda x, xb: F.linear(xb, wb)))
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s32, s16 = torch.rand(n), torch.rand(n).bfloat16()
    out.append(("int8 pack_mm fp32", w8.numel() + n * 4, lambda x, xb: torch._weight_int8pack_mm(x, w8, s32)))
    out.append(("int8 pack_mm bf16", w8.numel() + n * 2, lambda x, xb: torch._weight_int8pack_mm(xb, w8, s16)))
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for g in (32, 64, 128):
        if k % g:  # 576 is not a multiple of 128
            continue
        sz = torch.rand(k // g, n, 2)
        sz16 = sz.bfloat16()
        nbytes = packed.numel() + sz.numel() * 2  # scales and zeros as bf16 would be stored
        out.append((f"int4 g{g} fp32", nbytes, lambda x, xb, g=g, sz=sz: torch._weight_int4pack_mm_for_cpu(x, packed, g, sz)))
        out.append((f"int4 g{g} bf16", nbytes, lambda x, xb, g=g, sz16=sz16: torch._weight_int4pack_mm_for_cpu(xb, packed, g, sz16)))
    # int8 per group of 32 (and GGUF Q8_0) as two int4 planes: twice the rows through the int4 kernel.
    q2 = torch.randint(0, 16, (2 * n, k), dtype=torch.int32)
    packed2 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q2, 1)
    sz2 = torch.rand(k // 32, 2 * n, 2).bfloat16()
    out.append(("int8 g32 as 2x int4", w8.numel() + n * k // 32 * 2,
                lambda x, xb: torch._weight_int4pack_mm_for_cpu(xb, packed2, 32, sz2)))
    if compile_:
        def deq8(x, w8, s):
            return F.linear(x, w8.to(x.dtype)) * s
        c8 = torch.compile(deq8, dynamic=False)
        out.append(("int8 compiled bf16", w8.numel() + n * 2, lambda x, xb: c8(xb, w8, s16)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,128")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd int8 dequant-matmul")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads")
    for batch in (int(b) for b in args.batches.split(",")):
        print(f"\nbatch {batch}: GB/s of weights (GFLOP/s)")
        rows: dict[str, list[str]] = {}
        for n, k in SHAPES:
            x = torch.randn(batch, k)
            xb = x.bfloat16()
            for name, nbytes, fn in kernels(n, k, args.compile):
                t = _time(lambda: fn(x, xb))
                rows.setdefault(name, {})[(n, k)] = f"{nbytes / t / 1e9:6.1f} ({2 * batch * n * k / t / 1e9:5.0f})"
        header = "kernel".ljust(20) + "".join(f"{n}x{k}".rjust(16) for n, k in SHAPES)
        print(header)
        for name, cells in rows.items():
            print(name.ljust(20) + "".join(cells.get(shape, "-").rjust(16) for shape in SHAPES))


if __name__ == "__main__":
    main()

"""Decode speed of the eager and compiled (`torch.compile`) decode paths, fp32 and bf16, on the built-in
model; optionally where the time goes (torch.profiler) in each.

    .venv/bin/python benchmarks/decode_paths.py [--threads 2] [--rounds 5] [--profile]

The machine is shared and noisy: paths are measured alternately, round after round, and the report
gives medians and the compiled/eager ratio of each round's pair.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from camelid.engine import load_model
from camelid.generate import Generation, SamplingParams


def decode_rate(model, prompt: list[int], new: int, compiled: bool) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one greedy run that ignores end-of-sequence."""
    gen = Generation(model, prompt, SamplingParams(max_new_tokens=new), compile=compiled)
    it = iter(gen)
    next(it)  # prefill + first token
    start = time.perf_counter()
    n = sum(1 for _ in it)
    return len(prompt) / gen.prompt_seconds, n / (time.perf_counter() - start)


def profile(model, prompt: list[int], compiled: bool, steps: int = 24) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    gen = iter(Generation(model, prompt, SamplingParams(max_new_tokens=steps + 8), compile=compiled))
    for _ in range(4):
        next(gen)  # prefill and warm-up outside the trace
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            next(gen)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file or folder (default: the built-in model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of both paths")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for dtype_name in args.dtypes.split(","):
        loaded = load_model(args.model, dtype=getattr(torch, dtype_name), fuse=True)
        model = loaded.model
        prompt = (loaded.tokenizer.encode("The history of the camel family begins in North America. " * 40)
                  )[:args.prompt_tokens]
        start = time.perf_counter()
        decode_rate(model, prompt, 4, compiled=True)  # builds the compiled step for this cache shape
        compile_s = time.perf_counter() - start
        decode_rate(model, prompt, 4, compiled=False)
        eager, compiled, ratios = [], [], []
        for _ in range(args.rounds):
            e = decode_rate(model, prompt, args.new_tokens, compiled=False)[1]
            c = decode_rate(model, prompt, args.new_tokens, compiled=True)[1]
            eager.append(e)
            compiled.append(c)
            ratios.append(c / e)
        rows.append((dtype_name, statistics.median(eager), statistics.median(compiled), statistics.median(ratios),
                     compile_s))
        print(f"{dtype_name}: eager {[round(x, 1) for x in eager]}  compiled {[round(x, 1) for x in compiled]}",
              flush=True)
        if args.profile:
            print(f"--- {dtype_name} eager decode ---\n{profile(model, prompt, False)}")
            print(f"--- {dtype_name} compiled decode ---\n{profile(model, prompt, True)}")
    print(f"\ndecode tok/s, {args.threads} threads, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
          f"medians of {args.rounds} alternating rounds")
    print("| dtype | eager | compiled | compiled/eager | first compile s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, e, c, r, s in rows:
        print(f"| {name} | {e:.1f} | {c:.1f} | {r:.2f} | {s:.0f} |")


if __name__ == "__main__":
    main()

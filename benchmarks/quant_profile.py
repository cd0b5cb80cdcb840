"""Where decode time goes, per quantization: torch.profiler over greedy decode steps of the built-in model.

    .venv/bin/python benchmarks/quant_profile.py [--quant none,int8,int4,native] [--threads 2] [--steps 32] [--compile]

Prints, for each setting, decode tok/s and the top operators by self CPU time (share of the total). With
--compile it profiles the compiled one-token step (`Llama.decode_step`), inductor's kernels named one by one.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from camelid.engine import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--quant", default="none,int8,int4,native")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="profile the compiled decode step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.compile:
        from torch._inductor import config as inductor_config
        inductor_config.cpp.enable_kernel_profile = True
    for q in args.quant.split(","):
        loaded = load_model(args.model, quant=None if q == "none" else q, fuse=True)
        model = loaded.model
        model.setup_cache(1, 1024)
        with torch.inference_mode():
            logits = model(torch.arange(1, 33)[None], torch.arange(32))[0, -1]

            def steps(n: int, start: int) -> float:
                nonlocal logits
                t = time.perf_counter()
                for i in range(n):
                    token = torch.tensor([[int(logits.argmax())]])
                    if args.compile:
                        logits = model.decode_step(token, torch.tensor([start + i]), compiled=True)[0]
                    else:
                        logits = model(token, torch.tensor([start + i]))[0, -1]
                return n / (time.perf_counter() - t)

            steps(4, 32)
            steps(2, 130)  # a second cache span: the compiled step becomes dynamic in it once, here
            rate = steps(args.steps, 140)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps(args.steps, 140 + args.steps)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n== {q}: load {loaded.load_seconds:.2f} s, decode {rate:.1f} tok/s "
              f"({1000 / rate:.2f} ms/token), {len(loaded.quant)} quantized layers")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            print(f"  {e.key[:48]:48} {100 * e.self_cpu_time_total / total:5.1f}%  "
                  f"{e.self_cpu_time_total / args.steps / 1000:6.2f} ms/token  {e.count // args.steps:4d} calls/token")
        model.clear_cache()


if __name__ == "__main__":
    main()

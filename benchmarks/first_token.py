"""Time from `camelid generate` start to its first printed token, and decode tokens/s, on the built-in model.

Run: .venv/bin/python benchmarks/first_token.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CAMELID = Path(sys.executable).parent / "camelid"


def time_to_first_token(prompt: str) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen([str(CAMELID), "generate", "--max-new-tokens", "16", "--ignore-eos", prompt],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    while True:
        # The first byte on stdout is the first token: the CLI prints only the completion, unbuffered per chunk.
        if os.read(proc.stdout.fileno(), 1):
            elapsed = time.perf_counter() - start
            break
    proc.communicate()
    return elapsed


def decode_speed(prompt_tokens: int = 128, new_tokens: int = 128) -> tuple[float, float, float]:
    import torch

    from camelid.engine import load_model
    from camelid.generate import Generation, SamplingParams
    start = time.perf_counter()
    loaded = load_model(fuse=True)
    load = time.perf_counter() - start
    ids = list(range(1000, 1000 + prompt_tokens))
    gen = Generation(loaded.model, ids, SamplingParams(max_new_tokens=new_tokens))
    t0 = time.perf_counter()
    next(gen)
    t1 = time.perf_counter()
    n = 1 + sum(1 for _ in gen)
    t2 = time.perf_counter()
    del torch
    return load, prompt_tokens / (t1 - t0), (n - 1) / (t2 - t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ttft = [time_to_first_token("The capital of France is") for _ in range(args.rounds)]
    speeds = [decode_speed() for _ in range(args.rounds)]
    print("| measure (built-in SmolLM2-135M Q4_1, fp32, median of %d) | value |" % args.rounds)
    print("| --- | ---: |")
    print(f"| `camelid generate` start to first token | {statistics.median(ttft):.2f} s |")
    print(f"| load_model() | {statistics.median(s[0] for s in speeds):.2f} s |")
    print(f"| prefill, 128-token prompt | {statistics.median(s[1] for s in speeds):.0f} tok/s |")
    print(f"| decode, 128 greedy tokens | {statistics.median(s[2] for s in speeds):.1f} tok/s |")


if __name__ == "__main__":
    main()

"""Memory bandwidth probe: how fast this machine streams a buffer far larger than its caches (GB/s), with 1 and 2
threads, to set decode speed against: a decode step reads every weight once, so tok/s x bytes per token / this
figure is the fraction of the bandwidth a decoder reaches.

    python benchmarks/bandwidth.py [--mb 1024] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def probe(mb: int, threads: int, rounds: int) -> float:
    """Best read bandwidth in GB/s: a float32 sum over `mb` MB (one read of every byte, no writes)."""
    torch.set_num_threads(threads)
    x = torch.ones(mb * 1024 * 1024 // 4)
    x.sum()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    for threads in (1, 2):
        print(f"threads {threads}: {probe(args.mb, threads, args.rounds):.1f} GB/s read")
    print(f"machine load (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

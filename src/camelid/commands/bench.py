"""`camelid bench`: camelid's speed and memory, optionally side by side with llama.cpp and transformers."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import argtypes as t
from ..bench import ENGINES  # bench.py imports no torch: the engines run in worker processes
from ..errors import CamelidError
from . import options as o

PEERS = ENGINES[1:]
WIDTHS = ("none", "int8", "int4", "native")


def _widths(quant: str, dtype: str) -> list[str]:
    widths = []
    for q in (q.strip() for q in quant.split(",")):
        if q not in WIDTHS:
            raise CamelidError(f"--quant {q}: use none, int8, int4 or native")
        widths.append(dtype if q == "none" else q)
    return widths


def cmd_bench(args: argparse.Namespace) -> None:
    """Prefill/decode tok/s, first-token time, load time and peak memory, optionally against llama.cpp and transformers."""
    peers = [e.strip() for e in args.compare.split(",") if e.strip()]
    unknown = [e for e in peers if e not in PEERS]
    if unknown:
        raise CamelidError(f"--compare {unknown[0]}: unknown engine (choose from {', '.join(PEERS)})")
    widths = _widths(args.quant, args.dtype)
    if args.new_tokens < 2:
        raise CamelidError("--new-tokens must be >= 2 (the first token is timed apart from the decode)")
    from ..bench import bench, draw_chart, format_table
    rows = bench(args.model, widths, args.dtype, ["camelid", *peers], threads=args.threads,
                 prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, rounds=args.rounds,
                 work=Path(args.work_dir) if args.work_dir else None, group=args.group, compile=args.compile,
                 log=print if not args.quiet else lambda *a, **k: None)
    print(f"{args.prompt_tokens}-token prompt, {args.new_tokens} greedy tokens, {args.threads} threads, "
          f"medians of {args.rounds} round(s)")
    print(format_table(rows))
    for build in dict.fromkeys(f"{r['engine']}: {r['build']}" for r in rows if r.get("build")):
        print(build)
    print(f"machine load (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.chart:
        if draw_chart(rows, Path(args.chart)):
            print(f"chart: {args.chart}")
        else:
            print("no chart: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    o.add_model(p)
    p.add_argument("--quant", default="none", help="none, int8, int4, native, or several joined by commas")
    o.add_dtype(p, runs=False, choices=("float32", "bfloat16"), default="float32",
                help="float type the weights are computed in, for --quant none")
    o.add_group(p)
    p.add_argument("--threads", type=t.positive_int, default=2, help="threads for every engine")
    p.add_argument("--prompt-tokens", type=t.positive_int, default=128, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=t.positive_int, default=128, help="greedy tokens generated (at least 2)")
    p.add_argument("--rounds", type=t.positive_int, default=3, help="runs per engine, taking turns (medians)")
    p.add_argument("--compare", default="", help="peers: llama.cpp,transformers (default: none)")
    p.add_argument("--compile", action="store_true", help="camelid decodes with the compiled step")
    p.add_argument("--chart", default="bench.png", help="PNG bar chart ('' for none)")
    p.add_argument("--work-dir", help="where converted peer models are cached (default ~/.cache/camelid/bench)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    o.add_quiet(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help=cmd_bench.__doc__, description=cmd_bench.__doc__)
    _bench_arguments(p)
    p.set_defaults(func=cmd_bench)

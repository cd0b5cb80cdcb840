"""camelid's native kernels on a GGUF as loaded (Q4_0/Q4_1 repacked, 8 rows interleaved; Q8_0 in the file's
layout) against the file's layout for every type (CAMELID_NO_REPACK=1) and llama.cpp on the same file, same
threads, engines taking turns round after round (each run a fresh process, via camelid.bench): decode and
prefill tok/s and their ratios to llama.cpp, load to first token, peak RSS, the bytes a decode step reads and
the share of the measured memory bandwidth it reaches.

    python benchmarks/repack_decode.py [--model FILE.gguf] [--threads 1,2] [--rounds 3] [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
from pathlib import Path

from camelid.bench import _spawn
from camelid.engine import open_weights, resolve_model_path
from camelid.formats.gguf import GGUFReader


def bytes_per_token(path: Path) -> int:
    """Bytes of the matrices one decode step reads: every tensor but an embedding that is not also the output."""
    reader = GGUFReader(path)
    infos = reader.tensors()
    tied = "output.weight" not in infos
    total = sum(reader.raw(n)[0].nbytes for n in infos if n != "token_embd.weight" or tied)
    reader.close()
    return total


def bandwidth(threads: int) -> float:
    spec = importlib.util.spec_from_file_location("bandwidth", Path(__file__).with_name("bandwidth.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.probe(1024, threads, 5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    path = resolve_model_path(args.model)
    _, reader, tok = open_weights(path)
    reader.close()
    ids = (tok.encode("The history of the camel family begins in North America. ") * 64)[:args.prompt_tokens]
    per_token = bytes_per_token(path)
    engines = ("camelid", "file layout", "llama.cpp")
    print(f"{path.name}: {path.stat().st_size / 1e6:.0f} MB file, {per_token / 1e6:.0f} MB read per decode step; "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} greedy tokens, medians of {args.rounds}")
    print("| threads | engine | decode tok/s | prefill tok/s | load→1st token s | peak MB | decode × llama.cpp "
          "| prefill × llama.cpp | GB/s | % of probe |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for threads in (int(t) for t in args.threads.split(",")):
        base = {"threads": threads, "ids": ids, "new_tokens": args.new_tokens, "width": "native"}
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        for r in range(args.rounds):
            for engine in engines:
                os.environ["CAMELID_NO_REPACK"] = "1" if engine == "file layout" else ""
                spec = {**base, "engine": "llama.cpp", "gguf": str(path)} if engine == "llama.cpp" else \
                    {**base, "engine": "camelid", "model": str(path), "dtype": "float32", "quant": "native"}
                runs[engine].append(_spawn(spec))
                print(f"round {r + 1} {threads} thr {engine:>12}: {runs[engine][-1]['decode_tok_s']:.1f} tok/s",
                      file=sys.stderr)
        probe = bandwidth(threads)
        med = {e: {k: statistics.median(x[k] for x in runs[e]) for k in
                   ("decode_tok_s", "prefill_tok_s", "load_to_first_token_s", "peak_mb")} for e in engines}
        for e in engines:
            m = med[e]
            gbs = m["decode_tok_s"] * per_token / 1e9
            print(f"| {threads} | {e} | {m['decode_tok_s']:.1f} | {m['prefill_tok_s']:.0f} | "
                  f"{m['load_to_first_token_s']:.2f} | {m['peak_mb']:.0f} | "
                  f"{m['decode_tok_s'] / med['llama.cpp']['decode_tok_s']:.2f} | "
                  f"{m['prefill_tok_s'] / med['llama.cpp']['prefill_tok_s']:.2f} | {gbs:.1f} | {100 * gbs / probe:.0f}% |")
        print(f"| {threads} | bandwidth probe | | | | | | | {probe:.1f} | 100% |")
    print(f"machine load (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

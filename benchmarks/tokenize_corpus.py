"""`camelid data tokenize` on a generated corpus: tokens/s and peak resident memory.

    python benchmarks/tokenize_corpus.py [--mb 200] [--workers 1 2]

Writes a JSONL corpus of --mb megabytes (seeded pseudo-English documents of 50-2000 words), then runs the
command once per --workers value with a fresh Arrow cache, sampling the resident memory of the whole
process tree every 50 ms. Prints wall time, tokens/s, MB/s, the peak RSS of the largest single process and
the peak of the tree's sum (file-backed pages of the memory-mapped Arrow cache count in both).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SYLLABLES = ["la", "ma", "ko", "al", "pa", "ca", "vi", "cu", "na", "re", "to", "en", "the", "and", "of", "ing"]


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(20000)]
    vocab += [",", ".", "!", "?", "\n"]
    target, written, docs = megabytes * 1_000_000, 0, 0
    with path.open("w") as f:
        while written < target:
            words = rng.choices(vocab, k=rng.randint(50, 2000))
            line = json.dumps({"id": docs, "text": " ".join(words)}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return docs


def run(corpus: Path, out: Path, cache: Path, workers: int) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "camelid.cli", "data", "tokenize", "--source", str(corpus), "--out", str(out),
           "--workers", str(workers), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak_one = peak_tree = 0
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
        except psutil.Error:
            rss = []
        if rss:
            peak_one, peak_tree = max(peak_one, max(rss)), max(peak_tree, sum(rss))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"tokenize failed:\n{err}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"workers": workers, "wall_s": wall, "tokens": manifest["tokens"], "documents": manifest["documents"],
            "tokens_per_s": manifest["tokens"] / wall, "peak_rss_mb": peak_one / 2**20,
            "peak_tree_rss_mb": peak_tree / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tmp", help="scratch folder (default: a temporary one, removed at the end)")
    args = ap.parse_args()
    scratch = Path(args.tmp or tempfile.mkdtemp(prefix="camelid-tokbench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        corpus = scratch / "corpus.jsonl"
        docs = write_corpus(corpus, args.mb)
        size = corpus.stat().st_size
        print(f"corpus: {size / 1e6:.0f} MB, {docs} documents")
        for w in args.workers:
            shutil.rmtree(scratch / "cache", ignore_errors=True)
            shutil.rmtree(scratch / "out", ignore_errors=True)
            r = run(corpus, scratch / "out", scratch / "cache", w)
            print(f"workers {w}: {r['wall_s']:.1f} s, {r['tokens']} tokens, {r['tokens_per_s'] / 1e6:.2f} M tokens/s, "
                  f"{size / 1e6 / r['wall_s']:.1f} MB/s; peak RSS {r['peak_rss_mb']:.0f} MB (one process), "
                  f"{r['peak_tree_rss_mb']:.0f} MB (all processes)")
    finally:
        if not args.tmp:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

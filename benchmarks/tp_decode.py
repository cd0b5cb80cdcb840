"""Tensor-parallel decode speed and per-rank memory: 1 process (the plain model) against N processes
(`camelid.tp`, gloo on the CPU), on the same model and prompt.

    python benchmarks/tp_decode.py --model builtin --tp 1 3          # SmolLM2-135M: 9 heads, so 3 not 2
    python benchmarks/tp_decode.py --make-1b /tmp/llama-1b            # a random TinyLlama-shaped 1.1B model
    python benchmarks/tp_decode.py --model /tmp/llama-1b --tp 1 2 --rounds 2

Rounds alternate the process counts. Each run loads, prefills 16 tokens, decodes --tokens greedy tokens
and reports the decode tokens/s and each rank's resident memory added by loading (RSS after the load minus
RSS after the imports), next to the model's weight bytes (float32). The 1B model is written in bfloat16 to keep the disk small; it runs in float32.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_1b(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    print(f"wrote {folder}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")


def worker(model_path: str, tokens: int) -> None:
    import psutil
    import torch
    import torch.distributed as dist
    from camelid import tp
    from camelid.engine import load_model
    path = None if model_path == "builtin" else model_path
    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = psutil.Process().memory_info().rss  # torch and camelid imported, nothing loaded
    loaded = tp.load_sharded(path, world) if world > 1 else load_model(path)
    model = loaded.model
    rss = psutil.Process().memory_info().rss - base
    prompt = list(range(100, 116))
    with torch.inference_mode():
        model.setup_cache(1, len(prompt) + tokens + 1)
        logits = model(torch.tensor([prompt]), torch.arange(len(prompt)))[0, -1]
        start = time.perf_counter()
        for i in range(tokens):
            token = int(logits.argmax())
            logits = model(torch.tensor([[token]]), torch.tensor([len(prompt) + i]))[0, -1]
        seconds = time.perf_counter() - start
    all_rss = [rss]
    if world > 1:
        all_rss = [None] * world
        dist.all_gather_object(all_rss, rss)
    if world == 1 or dist.get_rank() == 0:
        weight_bytes = 4 * loaded.config.num_params
        print("RESULT " + json.dumps({"processes": world, "tok_s": tokens / seconds, "rss_mb": [r / 2**20 for r in all_rss],
                                      "weights_mb": weight_bytes / 2**20}), flush=True)
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: str, n: int, tokens: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    me = [str(Path(__file__).resolve()), "--worker", "--model", model, "--tokens", str(tokens)]
    cmd = [sys.executable, *me] if n == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(free_port()), *me]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{n} process(es) failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[0][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--make-1b", metavar="DIR", help="write a random 1.1B LLaMA-shaped model and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_1b:
        make_1b(Path(args.make_1b))
        return
    if args.worker:
        worker(args.model, args.tokens)
        return
    results: dict[int, list[dict]] = {n: [] for n in args.tp}
    for _ in range(args.rounds):
        for n in args.tp:
            results[n].append(run(args.model, n, args.tokens, args.threads))
    base = max(r["tok_s"] for r in results[args.tp[0]])
    print(f"model {args.model}, {args.tokens} decode tokens, {args.threads} thread(s) per process")
    for n, rs in results.items():
        best = max(r["tok_s"] for r in rs)
        rss = ", ".join(f"{x:.0f}" for x in rs[0]["rss_mb"])
        print(f"  {n} process(es): {best:.2f} tok/s (x{best / base:.2f}); RSS added by loading, per rank: {rss} MB; "
              f"weights {rs[0]['weights_mb']:.0f} MB in float32")


if __name__ == "__main__":
    main()

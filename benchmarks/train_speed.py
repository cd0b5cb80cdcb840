"""Training throughput: `camelid train` against `transformers.Trainer` on the same model, data, sequence length,
threads and precision. Tokens/s counts real (non-padding) tokens per second of optimizer steps, first step
excluded; peak memory is the process's largest resident set. Engines run in turn, each in a fresh process
(which goes first alternates), for several rounds (the machine is noisy); medians and per-round ratios are printed.

    .venv/bin/python benchmarks/train_speed.py --rounds 3 --steps 6 --seq-len 128 --batch-size 2 --threads 2
    .venv/bin/python benchmarks/train_speed.py --rounds 3 --dtype bfloat16   # both engines in bf16 autocast

Both use fused AdamW in fp32 master weights and clip gradients at 1.0. What differs is how each tool is
normally used: camelid packs conversations into rows (block-diagonal mask) and computes a batch with its
padding removed and the vocabulary projection only where a loss is taken; the Trainer gets one conversation
per row padded to the longest in the batch (as transformers' DataCollatorForSeq2Seq does), the way
FastChat/HF fine-tuning scripts feed it, and projects every position. Compare ratios within one --dtype only.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a model learns to answer questions about cats dogs gardens weather music history science and "
         "mathematics with short clear helpful replies that explain each step in plain words").split()


def write_data(folder: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))
        lines.append(json.dumps({"id": f"b{i}", "source": "bench", "preferred": True,
                                 "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_camelid(args: argparse.Namespace, data: Path, out: Path) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    from camelid.train.loop import train
    from camelid.train.options import TrainConfig
    result = train(TrainConfig(model=args.model, data=str(data), out=str(out), seq_len=args.seq_len,
                               batch_size=args.batch_size, max_steps=args.steps, lr=1e-5, quiet=True, force=True,
                               grad_checkpointing=args.grad_checkpointing, threads=args.threads, dtype=args.dtype))
    return {"tokens_per_s": result["tokens_per_s"], "peak_mb": peak_mb()}


def run_transformers(args: argparse.Namespace, data: Path, out: Path) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    from transformers import (LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback,
                              TrainingArguments)
    from camelid.engine import load_model
    from camelid.packing import read_conversations
    loaded = load_model(args.model)  # the same weights, dequantized to float32, then copied into transformers
    config = LlamaConfig(**{k: v for k, v in loaded.config.to_hf_dict().items() if k != "architectures"})
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.model.state_dict(), strict=False)
    model.tie_weights()
    tok = loaded.tokenizer
    template, _ = loaded.template()  # the template `camelid train` renders the same data with
    del loaded
    rows = []
    for rec in read_conversations(data / "train.jsonl"):
        ids, mask = template.render_ids(rec["messages"], tok, add_generation_prompt=False)
        ids, mask = ids[:args.seq_len], mask[:args.seq_len]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": [i if m else -100 for i, m in zip(ids, mask)]})

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.tokens: list[int] = []

        def on_step_begin(self, *a, **k) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k) -> None:
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)

    def collate(batch: list[dict]) -> dict:
        """Pad to the longest in the batch (what DataCollatorForSeq2Seq does), counting the real tokens."""
        n = max(len(b["input_ids"]) for b in batch)
        out = {key: torch.tensor([b[key] + [fill] * (n - len(b[key])) for b in batch])
               for key, fill in (("input_ids", pad), ("attention_mask", 0), ("labels", -100))}
        timer.tokens.append(int(out["attention_mask"].sum()))
        return out

    targs = TrainingArguments(output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                              learning_rate=1e-5, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                              dataloader_num_workers=0, seed=0, remove_unused_columns=False, disable_tqdm=True,
                              bf16=args.dtype == "bfloat16",
                              **({"gradient_checkpointing": True} if args.grad_checkpointing else {}))
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[timer])
    trainer.train()
    # The dataloader may prefetch one batch: step i consumed tokens[i].
    speeds = sorted(t / s for t, s in zip(timer.tokens[1:len(timer.times)], timer.times[1:]))
    return {"tokens_per_s": speeds[len(speeds) // 2], "peak_mb": peak_mb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model (default: the built-in SmolLM2-135M-Instruct, fp32)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute precision of both engines: bfloat16 = autocast with fp32 weights (camelid "
                        "--dtype bfloat16, Trainer bf16=True)")
    p.add_argument("--engine", choices=("camelid", "transformers"), help=argparse.SUPPRESS)  # one child run
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine:
        with tempfile.TemporaryDirectory() as tmp:
            fn = run_camelid if args.engine == "camelid" else run_transformers
            print(json.dumps(fn(args, Path(args.data), Path(tmp) / "out")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_data(data, args.examples)
        results: dict[str, list[dict]] = {"camelid": [], "transformers": []}
        child = [a for a in sys.argv[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
        for r in range(args.rounds):
            # Which engine goes first alternates: the first process of a round often runs slower.
            for engine in ("camelid", "transformers")[::1 if r % 2 == 0 else -1]:
                done = subprocess.run([sys.executable, __file__, *child, "--engine", engine, "--data", str(data)],
                                      capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    sys.exit(f"{engine} failed:\n{done.stderr[-3000:]}")
                res = json.loads(done.stdout.strip().splitlines()[-1])
                results[engine].append(res)
                print(f"round {r + 1} {engine:>12}: {res['tokens_per_s']:8.1f} tok/s, peak {res['peak_mb']:.0f} MB",
                      flush=True)
        ratios = [c["tokens_per_s"] / t["tokens_per_s"] for c, t in zip(results["camelid"], results["transformers"])]
        for engine, rs in results.items():
            print(f"{engine:>12}: median {statistics.median(r['tokens_per_s'] for r in rs):.1f} tok/s, "
                  f"peak {statistics.median(r['peak_mb'] for r in rs):.0f} MB")
        print(f"camelid / transformers per round: {', '.join(f'{x:.2f}x' for x in ratios)}; "
              f"median {statistics.median(ratios):.2f}x (seq-len {args.seq_len}, batch {args.batch_size}, "
              f"{args.threads} threads, {args.dtype})")


if __name__ == "__main__":
    main()

"""The whole fine-tuning path on the built-in model: `data prepare -> train -> generate`, with a loss plot.

Writes two small sources in their published formats (Stanford Alpaca JSON and Anthropic HH jsonl.gz) whose
answers follow a rule the base model does not know (arithmetic answered as "The sum of A and B is C."),
prepares a Koala-style mix, fine-tunes SmolLM2-135M-Instruct, prints the eval loss before and after and the
tuned model's answer to a held-out question, and copies the loss curve to benchmarks/finetune_loss.png.

    python benchmarks/finetune_demo.py [--steps 40] [--workdir /tmp/camelid-finetune]
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAMELID = [sys.executable, "-m", "camelid.cli"]


def write_sources(folder: Path, n: int, seed: int) -> tuple[Path, Path]:
    rng = random.Random(seed)
    alpaca, hh = [], []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        question = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."]).format(a=a, b=b)
        answer = f"The sum of {a} and {b} is {a + b}."
        if i % 2:
            alpaca.append({"instruction": question, "input": "", "output": answer})
        else:
            wrong = f"I think it is about {a + b + rng.randint(1, 9)}."
            hh.append({"chosen": f"\n\nHuman: {question}\n\nAssistant: {answer}",
                       "rejected": f"\n\nHuman: {question}\n\nAssistant: {wrong}"})
    alpaca_path, hh_path = folder / "alpaca_data.json", folder / "hh_train.jsonl.gz"
    alpaca_path.write_text(json.dumps(alpaca, indent=1))
    with gzip.open(hh_path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in hh)
    return alpaca_path, hh_path


def run(args: list[str]) -> str:
    print("$ camelid", " ".join(args), flush=True)
    return subprocess.run(CAMELID + args, check=True, text=True, stdout=subprocess.PIPE).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--conversations", type=int, default=400)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/camelid-finetune"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    alpaca, hh = write_sources(args.workdir, args.conversations, seed=0)
    data, out = args.workdir / "data", args.workdir / "run"
    run(["data", "prepare", "--source", f"alpaca:{alpaca}", "--source", f"hh:{hh}", "--mix", "alpaca=1.0,hh=1.0",
         "--eval-fraction", "0.1", "--seed", "0", "--out", str(data)])
    print(json.dumps(json.loads((data / "manifest.json").read_text()).get("sources", {}), indent=1)[:1500])
    run(["train", "--data", str(data), "--out", str(out), "--seq-len", "256", "--batch-size", "2", "--lr", "1e-4",
         "--warmup", "4", "--max-steps", str(args.steps), "--eval-every", str(max(1, args.steps // 4)),
         "--save-every", str(args.steps), "--seed", "0", "--quiet"])
    evals = [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "eval_loss" in r]
    print(f"eval loss: {evals[0]['eval_loss']:.3f} at step {evals[0]['step']} -> "
          f"{evals[-1]['eval_loss']:.3f} at step {evals[-1]['step']}")
    shutil.copy(out / "loss.png", HERE / "finetune_loss.png")
    print(f"loss curve: {HERE / 'finetune_loss.png'}")
    prompt = "<|im_start|>user\nWhat is 41 plus 27?<|im_end|>\n<|im_start|>assistant\n"
    print("tuned model:", run(["generate", "--model", str(out), "--max-new-tokens", "16", prompt]).strip())


if __name__ == "__main__":
    main()

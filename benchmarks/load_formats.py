"""`load_model` time for one model in every format `--model` opens, and the same loads by another camelid source
tree side by side (before/after a loader change): each load in its own process, formats and trees alternating
within every round, medians printed as seconds and as ratios to the HF folder (and to the other tree).

Run: .venv/bin/python benchmarks/load_formats.py [--rounds 5] [--hidden 1024 --layers 8] [--compare-src /tmp/old/src]
The model is random (TinyLlama-like proportions at the given width), written once under ~/.cache/camelid/load_bench.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "src"
TOKENIZER = HERE.parent / ".cache" / "tokenizer-llama2"
CHILD = """
import json, sys, time
start = time.perf_counter()
from camelid.engine import load_model
args = json.loads(sys.argv[1])
loaded = load_model(args.pop("model"), **args)
print(json.dumps({"seconds": time.perf_counter() - start, "camelid": __import__("camelid").__file__}))
"""


def build(root: Path, hidden: int, layers: int) -> dict[str, dict]:
    """Format -> load_model arguments, writing the model in each format once (HF first, then `convert`)."""
    from safetensors.torch import save_file
    import torch

    from camelid.config import ModelConfig
    from camelid.convert import convert, expected_shapes
    folder = root / f"h{hidden}-l{layers}"
    cfg = ModelConfig.from_name("llama-2-7b").tiny(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                                   num_layers=layers, num_heads=hidden // 64, num_kv_heads=hidden // 64, head_dim=64,
                                                   vocab_size=32000, max_position_embeddings=2048)
    hf = folder / "hf"
    if not (hf / "config.json").is_file():
        hf.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        save_file({n: torch.randn(s, generator=g) * 0.02 for n, s in expected_shapes(cfg).items()}, hf / "model.safetensors")
        (hf / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
        for f in TOKENIZER.glob("*.json"):  # GGUF and .flm need the vocabulary (the LLaMA-2 one `make setup` builds)
            shutil.copyfile(f, hf / f.name)
    outputs = {"meta": ("meta", "meta", None), "gguf": ("model.gguf", "gguf", None),
               "gguf-q8_0": ("model-q8_0.gguf", "gguf", "q8_0"), "flm": ("model.flm", "flm", None),
               "easylm": ("model.easylm", "easylm", None)}
    for name, (out, to, quant) in outputs.items():
        if not (folder / out).exists():
            convert(str(hf), folder / out, to, quant=quant, progress=False)
    return {"hf": {"model": str(hf)}, "meta": {"model": str(folder / "meta")},
            "gguf": {"model": str(folder / "model.gguf")}, "gguf-q8_0": {"model": str(folder / "model-q8_0.gguf")},
            "flm": {"model": str(folder / "model.flm")},
            "easylm": {"model": f"params::{folder / 'model.easylm'}", "config": str(hf / "config.json"),
                       "tokenizer": str(hf)}}


def load_once(src: Path, args: dict) -> float:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["camelid"].startswith(str(src)), result  # the tree asked for, not an installed copy
    return result["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--compare-src", type=Path, help="another camelid src/ folder to time side by side")
    a = p.parse_args()
    sys.path.insert(0, str(HERE))
    models = build(Path.home() / ".cache" / "camelid" / "load_bench", a.hidden, a.layers)
    trees = {"this": HERE, **({"other": a.compare_src.resolve()} if a.compare_src else {})}
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(a.rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for fmt in order:
            for tree, src in (trees.items() if r % 2 == 0 else reversed(trees.items())):
                try:
                    seconds = load_once(src, dict(models[fmt]))
                except RuntimeError as e:  # a format the other tree cannot open
                    print(f"round {r + 1} {tree:>5} {fmt:>9}: {e}", file=sys.stderr)
                    continue
                times.setdefault((tree, fmt), []).append(seconds)
                print(f"round {r + 1} {tree:>5} {fmt:>9}: {seconds:.2f} s", file=sys.stderr)
    base = statistics.median(times[("this", "hf")])
    print(f"\n{a.hidden} wide, {a.layers} layers; median of {a.rounds} process starts (import + load)")
    print("| format | this tree s | vs HF |" + (" other tree s | this/other |" if len(trees) > 1 else ""))
    print("| --- | ---: | ---: |" + (" ---: | ---: |" if len(trees) > 1 else ""))
    for fmt in models:
        ours = statistics.median(times[("this", fmt)])
        row = f"| {fmt} | {ours:.2f} | {ours / base:.2f} |"
        if len(trees) > 1:
            other = times.get(("other", fmt))
            row += f" {statistics.median(other):.2f} | {ours / statistics.median(other):.2f} |" if other else " cannot open | |"
        print(row)


if __name__ == "__main__":
    main()

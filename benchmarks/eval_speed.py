"""Evaluation speed, side by side on the same model and CPU, alternating rounds (medians):

1. lm-eval multiple-choice throughput (requests/s): camelid's backend (each item's context run once and
   shared by its answers, answers batched) vs lm-eval's own `hf` model on the same weights (the built-in
   model converted to an HF float32 folder);
2. perplexity tokens/s: `camelid eval perplexity` (llama.cpp's method) vs llama.cpp (llama-cpp-python,
   all logits) at matching precision: both on an F32 GGUF, and both on the built-in Q4_1 file (llama.cpp
   computes quantized dot products with 8-bit activations; camelid dequantizes to float32).

    .venv/bin/python benchmarks/eval_speed.py [--threads 2] [--rounds 3] [--items 24]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PARAGRAPH = ("The llama is a domesticated South American camelid, widely used as a meat and pack animal by Andean "
             "cultures since the pre-Columbian era. Llamas are social animals and live with others as a herd. "
             "Their wool is soft and contains only a small amount of lanolin. Llamas can learn simple tasks after "
             "a few repetitions. When using a pack, they can carry about 25 to 30% of their body weight for 8 to "
             "13 km. ")
CHOICES = [" the Andes mountains", " a desert in Africa", " the Arctic tundra", " an island in the Pacific Ocean"]


def convert(src: Path, out: Path, *args: str) -> Path:
    if not out.exists():
        subprocess.run([str(ROOT / ".venv/bin/camelid"), "convert", str(src), str(out), *args, "--quiet"], check=True)
    return out


def mc_requests(n_items: int):
    from lm_eval.api.instance import Instance
    reqs = []
    for i in range(n_items):
        context = f"{PARAGRAPH}Question {i}: where do llamas come from?\nAnswer:"
        for c in CHOICES:
            reqs.append(Instance("loglikelihood", {}, (context, c), len(reqs)))
    return reqs


def time_loglikelihood(lm, requests) -> tuple[float, list]:
    start = time.perf_counter()
    out = lm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - start, out


def bench_lm_eval(hf_dir: Path, rounds: int, items: int) -> dict:
    from lm_eval.models.huggingface import HFLM

    from camelid.engine import load_model
    from camelid.eval.lm_eval_backend import CamelidLM
    requests = mc_requests(items)
    ours = CamelidLM(load_model(hf_dir, fuse=True), batch_size=32)
    theirs = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=8, device="cpu")
    times = {"camelid": [], "hf": []}
    results = {}
    for r in range(rounds):
        for name, lm in (("camelid", ours), ("hf", theirs)) if r % 2 == 0 else (("hf", theirs), ("camelid", ours)):
            seconds, results[name] = time_loglikelihood(lm, requests)
            times[name].append(seconds)
    worst = max(abs(a[0] - b[0]) for a, b in zip(results["camelid"], results["hf"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"requests": len(requests), "camelid_req_s": len(requests) / med["camelid"],
            "hf_req_s": len(requests) / med["hf"], "speedup": med["hf"] / med["camelid"],
            "max_abs_loglikelihood_diff": worst, "rounds": times}


def llama_cpp_perplexity(path: Path, ids: list[int], context: int, threads: int) -> tuple[float, float, int]:
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=context, n_batch=context, logits_all=True, verbose=False,
                n_threads=threads)
    nll, n, scanned = 0.0, 0, 0
    start = time.perf_counter()
    for s in range(0, len(ids) - context + 1, context):
        w = ids[s:s + context]
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[context // 2:context - 1], dtype=np.float64)
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        nll -= logp[np.arange(len(logp)), w[context // 2 + 1:]].sum()
        n += len(logp)
        scanned += context
    return math.exp(nll / n), time.perf_counter() - start, scanned


def bench_perplexity(gguf: Path, text: str, context: int, rounds: int, threads: int) -> dict:
    from camelid.engine import load_model
    from camelid.eval.perplexity import perplexity
    loaded = load_model(gguf, fuse=True)
    ids = loaded.tokenizer.encode(text)
    times = {"camelid": [], "llama.cpp": []}
    ppl = {}
    for r in range(rounds):
        for name in (("camelid", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "camelid")):
            if name == "camelid":
                result = perplexity(loaded.model, ids, context=context, batch=1)
                ppl[name], seconds, scanned = result.ppl, result.seconds, result.scanned
            else:
                ppl[name], seconds, scanned = llama_cpp_perplexity(gguf, ids, context, threads)
            times[name].append(scanned / seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"file": gguf.name, "tokens": len(ids), "context": context, "camelid_tok_s": med["camelid"],
            "llama_cpp_tok_s": med["llama.cpp"], "ratio": med["camelid"] / med["llama.cpp"],
            "ppl_camelid": ppl["camelid"], "ppl_llama_cpp": ppl["llama.cpp"],
            "ppl_rel_diff": abs(ppl["camelid"] - ppl["llama.cpp"]) / ppl["llama.cpp"], "rounds_tok_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--items", type=int, default=24, help="multiple-choice items (4 answers each)")
    parser.add_argument("--context", type=int, default=256, help="perplexity window")
    parser.add_argument("--chars", type=int, default=12000, help="characters of README.md as the perplexity text")
    parser.add_argument("--only", choices=("lm-eval", "perplexity"))
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from camelid.engine import builtin_model_path
    cache = Path(tempfile.gettempdir()) / "camelid-eval-bench"
    cache.mkdir(exist_ok=True)
    builtin = builtin_model_path()
    report = {"threads": args.threads, "cpu": torch.backends.cpu.get_cpu_capability()}
    if args.only in (None, "lm-eval"):
        hf_dir = convert(builtin, cache / "smollm2-hf", "--to", "hf", "--dtype", "float32")
        sys.path.insert(0, str(ROOT))
        from tests.test_eval_perplexity import write_gguf_tokenizer
        if not (hf_dir / "tokenizer.json").exists():
            write_gguf_tokenizer(builtin, hf_dir)
        report["lm_eval_mc"] = r = bench_lm_eval(hf_dir, args.rounds, args.items)
        print(f"lm-eval multiple choice, {r['requests']} requests: camelid {r['camelid_req_s']:.1f} req/s, "
              f"hf {r['hf_req_s']:.1f} req/s -> {r['speedup']:.2f}x (max |loglik diff| "
              f"{r['max_abs_loglikelihood_diff']:.2e})", flush=True)
    if args.only in (None, "perplexity"):
        text = (ROOT / "README.md").read_text(encoding="utf-8")[:args.chars]
        f32 = convert(builtin, cache / "smollm2-f32.gguf", "--to", "gguf", "--dtype", "float32")
        report["perplexity"] = []
        for gguf in (f32, builtin):
            r = bench_perplexity(gguf, text, args.context, args.rounds, args.threads)
            report["perplexity"].append(r)
            print(f"perplexity {r['file']} ({r['tokens']} tokens, context {r['context']}): camelid "
                  f"{r['camelid_tok_s']:.0f} tok/s, llama.cpp {r['llama_cpp_tok_s']:.0f} tok/s -> {r['ratio']:.2f}x; "
                  f"PPL {r['ppl_camelid']:.4f} vs {r['ppl_llama_cpp']:.4f} ({100 * r['ppl_rel_diff']:.3f}%)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

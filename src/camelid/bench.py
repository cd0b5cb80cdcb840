"""`camelid bench`: prefill and decode tokens/s, time to first token, load time and peak memory, optionally
side by side with llama.cpp (llama-cpp-python) and transformers on the same model, prompt and thread count.

Every run is a fresh subprocess (clean memory figures, no state carried between engines), and the engines
take turns round after round, so a noisy neighbour slows all of them alike; the table shows medians.
Peers run at the matching width: camelid int4 vs a Q4_0 GGUF, int8 vs Q8_0, native vs the GGUF itself,
bfloat16 vs BF16, float32 vs F32; the peer files are made once with `camelid convert` and cached.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .errors import CamelidError

PROMPT_TEXT = ("The history of the camel family begins in North America, where the earliest camelids lived "
               "about forty-five million years ago. Over time they spread to South America and to Asia. ")
ENGINES = ("camelid", "llama.cpp", "transformers")
# camelid width -> (llama.cpp GGUF to compare with, its `camelid convert` options)
GGUF_PEERS = {"int4": ("Q4_0", {"quant": "q4_0"}), "int8": ("Q8_0", {"quant": "q8_0"}),
              "bfloat16": ("BF16", {"dtype": "bfloat16"}), "float32": ("F32", {"dtype": "float32"})}


# ---- one engine in its own process ---------------------------------------------------------------------
def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not carry over the parent's
    peak across fork + exec, which made a worker started from a big process look big)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(first: float, start: float, prefill: float, tokens: list[int], end: float, n_prompt: int) -> dict:
    return {"ttft_s": first - start, "prefill_tok_s": n_prompt / prefill,
            "decode_tok_s": (len(tokens) - 1) / (end - first) if len(tokens) > 1 else float("nan"), "tokens": tokens}


def _run_camelid(spec: dict) -> dict:
    import torch

    from .engine import load_model
    from .generate import Generation, SamplingParams
    torch.set_num_threads(spec["threads"])
    from . import kernels
    start = time.perf_counter()
    loaded = load_model(spec["model"], dtype=getattr(torch, spec["dtype"]), quant=spec["quant"], group=spec.get("group"),
                        fuse=True)
    load_s = time.perf_counter() - start
    build = f"native kernels {kernels.ext().isa()}" if kernels.available() else "PyTorch path (no native kernels)"
    ids, n = spec["ids"], spec["new_tokens"]
    extra = {"compile": True} if spec.get("compile") else {}
    runs = []
    for new in (2, n):  # the first run is the cold one (first token after load); the second is timed
        gen = Generation(loaded.model, ids, SamplingParams(max_new_tokens=new), (), None, **extra)
        t0 = time.perf_counter()
        tokens = [next(gen)]
        first = time.perf_counter()
        tokens += list(gen)
        runs.append(_timed(first, t0, gen.prompt_seconds, tokens, time.perf_counter(), len(ids)))
    return {**runs[1], "load_s": load_s, "load_to_first_token_s": load_s + runs[0]["ttft_s"], "build": build}


def _run_llama_cpp(spec: dict) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise CamelidError("llama-cpp-python is not installed: `make bench` installs it "
                           "(CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python==0.3.36)") from None
    ids, n = spec["ids"], spec["new_tokens"]
    start = time.perf_counter()
    llm = Llama(model_path=spec["gguf"], n_ctx=len(ids) + n + 16, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], n_batch=max(512, len(ids)), verbose=False)
    load_s = time.perf_counter() - start
    import llama_cpp
    build = llama_cpp.llama_print_system_info().decode(errors="replace")
    runs = []
    for new in (2, n):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)  # prefill on its own, so it can be timed apart from sampling
        prefill = time.perf_counter() - t0
        tokens = []
        # reset=True finds the whole prompt already evaluated and samples from it without evaluating again.
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            tokens.append(int(token))
            if len(tokens) == 1:
                first = time.perf_counter()
            if len(tokens) == new:
                break
        runs.append(_timed(first, t0, prefill, tokens, time.perf_counter(), len(ids)))
    return {**runs[1], "load_s": load_s, "load_to_first_token_s": load_s + runs[0]["ttft_s"], "build": build}


def _run_transformers(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=getattr(torch, spec["dtype"])).eval()
    load_s = time.perf_counter() - start
    ids, n = torch.tensor([spec["ids"]]), spec["new_tokens"]
    runs = []
    with torch.inference_mode():
        for new in (2, n):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            prefill = time.perf_counter() - t0
            tokens = [int(out.logits[0, -1].argmax())]
            first = time.perf_counter()
            past = out.past_key_values
            while len(tokens) < new:
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                tokens.append(int(out.logits[0, -1].argmax()))
            runs.append(_timed(first, t0, prefill, tokens, time.perf_counter(), ids.shape[1]))
    return {**runs[1], "load_s": load_s, "load_to_first_token_s": load_s + runs[0]["ttft_s"]}


def worker(spec: dict) -> dict:
    run = {"camelid": _run_camelid, "llama.cpp": _run_llama_cpp, "transformers": _run_transformers}[spec["engine"]]
    result = run(spec)
    result["peak_mb"] = _peak_mb()
    return result


def _spawn(spec: dict, timeout: float = 1800) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "camelid.bench", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CamelidError(f"bench: the {spec['engine']} run failed: {tail}")
    return json.loads(lines[-1])


# ---- the comparison ---------------------------------------------------------------------------------------
def _peer_files(model: Path, widths: list[str], engines: list[str], work: Path) -> dict[str, str]:
    """The GGUF files (per width) and HF folder the peers load, made once with `camelid convert`."""
    from .convert import convert
    work.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    stem = model.stem if model.is_file() else model.name
    if "llama.cpp" in engines:
        for width in widths:
            if width == "native":
                if model.suffix != ".gguf":
                    raise CamelidError("--quant native compares with llama.cpp on the model's own GGUF: --model must be a .gguf")
                files[width] = str(model)
                continue
            kind, options = GGUF_PEERS[width]
            out = work / f"{stem}.{kind}.gguf"
            if not out.exists():
                convert(str(model), out, "gguf", progress=False, **options)
            files[width] = str(out)
    if "transformers" in engines:
        out = work / f"{stem}-hf"
        if not out.exists():
            convert(str(model), out, "hf", dtype="float32", progress=False)
        files["hf"] = str(out)
    return files


def bench(model: str | None, widths: list[str], dtype: str, engines: list[str], *, threads: int = 2,
          prompt_tokens: int = 128, new_tokens: int = 128, rounds: int = 3, work: Path | None = None,
          group: int | None = None, compile: bool = False, log=print) -> list[dict]:
    """Rows {engine, width, medians...} for camelid at each width and each peer at the matching width."""
    from .engine import open_weights, resolve_model_path
    path = resolve_model_path(model)
    _, reader, tok = open_weights(path)
    reader.close()
    if tok is None:
        raise CamelidError(f"{path}: no tokenizer, so there is no prompt to bench with")
    unit = tok.encode(PROMPT_TEXT)
    ids = (unit * (prompt_tokens // len(unit) + 1))[:prompt_tokens]
    files = _peer_files(path, widths, engines, work or Path.home() / ".cache" / "camelid" / "bench") \
        if len(engines) > 1 else {}
    jobs = []
    for width in widths:
        quant = None if width in ("float32", "bfloat16") else width
        base = {"threads": threads, "ids": ids, "new_tokens": new_tokens, "width": width}
        cdtype = dtype if quant is None else "float32"
        for engine in engines:
            if engine == "camelid":
                jobs.append({**base, "engine": engine, "model": str(path), "dtype": width if quant is None else cdtype,
                             "quant": quant, "group": group, "compile": compile})
            elif engine == "llama.cpp":
                jobs.append({**base, "engine": engine, "gguf": files[width]})
            elif engine == "transformers":  # one run per dtype: its weights are float whatever camelid's width
                tf_dtype = "bfloat16" if width == "bfloat16" else "float32"
                if not any(j["engine"] == engine and j["dtype"] == tf_dtype for j in jobs):
                    jobs.append({**base, "engine": engine, "hf": files["hf"], "dtype": tf_dtype})
    results: dict[int, list[dict]] = {i: [] for i in range(len(jobs))}
    for r in range(rounds):
        for i, job in enumerate(jobs):
            res = _spawn(job)
            results[i].append(res)
            log(f"round {r + 1}/{rounds} {job['engine']:>12} {job['width']:>8}: prefill {res['prefill_tok_s']:7.1f} "
                f"decode {res['decode_tok_s']:6.1f} tok/s", file=sys.stderr)
    rows = []
    for i, job in enumerate(jobs):
        med = {k: statistics.median(r[k] for r in results[i]) for k in
               ("prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "load_to_first_token_s", "peak_mb")}
        label = {"camelid": job["width"], "llama.cpp": Path(job.get("gguf", "")).stem.rsplit(".", 1)[-1],
                 "transformers": job.get("dtype", "")}[job["engine"]]
        rows.append({"engine": job["engine"], "width": job["width"], "weights": label, **med,
                     "tokens": results[i][0]["tokens"], "build": results[i][0].get("build", "")})
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table; decode and prefill ratios are camelid's speed over each peer at the same width."""
    mine = {r["width"]: r for r in rows if r["engine"] == "camelid"}
    lines = ["| engine | weights | prefill tok/s | decode tok/s | first token ms | load s | load→1st token s | peak MB "
             "| camelid decode × | camelid prefill × |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ours = mine.get(r["width"])
        ratio = (f"{ours['decode_tok_s'] / r['decode_tok_s']:.2f}", f"{ours['prefill_tok_s'] / r['prefill_tok_s']:.2f}") \
            if ours and r["engine"] != "camelid" else ("", "")
        lines.append(f"| {r['engine']} | {r['weights']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{1000 * r['ttft_s']:.0f} | {r['load_s']:.2f} | {r['load_to_first_token_s']:.2f} | "
                     f"{r['peak_mb']:.0f} | {ratio[0]} | {ratio[1]} |")
    return "\n".join(lines)


def draw_chart(rows: list[dict], out: Path) -> bool:
    """Bars of prefill and decode tok/s per engine and width; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{r['engine']}\n{r['weights']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(rows) * 2), 4.5))
    colors = {"camelid": "#d08c2c", "llama.cpp": "#4a78b5", "transformers": "#8a8a8a"}
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill tok/s"), (axes[1], "decode_tok_s", "decode tok/s")):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=[colors[r["engine"]] for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))

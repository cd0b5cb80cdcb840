"""Load on `camelid serve` (continuous batching) and, when installed, llama-cpp-python's server on the same
GGUF with the same threads: aggregate completion tokens/s and p50/p95 request latency at several
concurrencies, printed as one table and drawn as a PNG.

    .venv/bin/python benchmarks/serve_load.py                  # the table + benchmarks/serve_load.png
    .venv/bin/python benchmarks/serve_load.py --verify 200     # 200 requests at concurrency 16: all succeed,
                                                               # greedy answers equal single-request answers,
                                                               # server memory stable

Requests are completions with mixed prompt lengths and mixed max_tokens, temperature 0, EOS ignored
where the server allows it (llama-cpp-python does not: its tokens are counted from `usage`).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from camelid.engine import builtin_model_path
from camelid.serve.launch import RunningServer, free_port, start_server

WORDS = ("the llama walked across the high plains of the andes carrying wool to the market while the "
         "farmers sang old songs about rivers mountains and the long road home").split()


def workload(n: int, seed: int = 0, short: bool = False) -> list[tuple[str, int]]:
    """n (prompt, max_tokens) pairs: prompts of 4-120 words, replies of 16-96 tokens (short: 8-32), in a fixed
    mixed order."""
    out = []
    for i in range(n):
        k = (i * 7919 + seed) % 997
        words = 4 + k % 117
        prompt = " ".join(WORDS[(k + j) % len(WORDS)] for j in range(words))
        out.append((f"Story {i}: {prompt}", 8 + (k % 4) * 8 if short else 16 + (k % 5) * 20))
    return out


def run_load(url: str, jobs: list[tuple[str, int]], concurrency: int, model: str | None,
             extra: dict) -> tuple[float, list[float], int, list[str]]:
    """Wall time, per-request latencies, total completion tokens, texts (in job order)."""
    def one(job):
        prompt, max_tokens = job
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0} | extra
        if model:
            body["model"] = model
        start = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        out = r.json()
        return time.perf_counter() - start, out["usage"]["completion_tokens"], out["choices"][0]["text"]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - start
    return wall, [r[0] for r in results], sum(r[1] for r in results), [r[2] for r in results]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_llama_cpp(model: Path, threads: int, context: int, log: Path) -> RunningServer | None:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        print("llama-cpp-python[server] is not installed: comparing against it is skipped", file=sys.stderr)
        return None
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(context)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    server = RunningServer(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/v1/models", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError("llama_cpp.server did not start")


def bench(name: str, url: str, levels: list[int], per_level: int, model: str | None, extra: dict) -> list[dict]:
    rows = []
    run_load(url, workload(2), 2, model, extra)  # warm-up
    for c in levels:
        jobs = workload(max(per_level, 2 * c), seed=c)
        wall, lat, tokens, _ = run_load(url, jobs, c, model, extra)
        lat.sort()
        rows.append({"server": name, "concurrency": c, "requests": len(jobs), "tokens": tokens,
                     "tok_s": tokens / wall, "p50": statistics.median(lat), "p95": lat[int(0.95 * (len(lat) - 1))]})
        r = rows[-1]
        print(f"  {name:17s} c={c:<3d} {r['tok_s']:7.1f} tok/s  p50 {r['p50']:6.2f}s  p95 {r['p95']:6.2f}s", file=sys.stderr)
    return rows


def draw(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == name]
        xs = [r["concurrency"] for r in mine]
        a.plot(xs, [r["tok_s"] for r in mine], marker="o", label=name)
        b.plot(xs, [r["p50"] for r in mine], marker="o", label=f"{name} p50")
        b.plot(xs, [r["p95"] for r in mine], marker="x", linestyle="--", label=f"{name} p95")
    a.set(xlabel="concurrent requests", ylabel="completion tokens/s", title="aggregate throughput")
    b.set(xlabel="concurrent requests", ylabel="seconds", title="request latency")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}", file=sys.stderr)


def verify(url: str, n: int, concurrency: int, pid: int) -> None:
    jobs = workload(n, seed=1, short=True)
    extra = {"ignore_eos": True}
    print(f"verify: {n} requests one at a time ...", file=sys.stderr)
    _, _, _, single = run_load(url, jobs, 1, None, extra)
    before = rss_mib(pid)
    print(f"verify: the same {n} at concurrency {concurrency} ...", file=sys.stderr)
    wall, lat, tokens, batched = run_load(url, jobs, concurrency, None, extra)
    after_first = rss_mib(pid)
    run_load(url, jobs, concurrency, None, extra)
    after = rss_mib(pid)
    same = sum(a == b for a, b in zip(single, batched))
    print(f"verify: {len(batched)}/{n} succeeded, {same}/{n} greedy answers equal to single-request answers, "
          f"{tokens / wall:.1f} tok/s, p95 {sorted(lat)[int(0.95 * (n - 1))]:.2f}s; server RSS {before:.0f} -> "
          f"{after_first:.0f} -> {after:.0f} MiB")
    if same != n or after > after_first * 1.1 + 50:
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=16, help="requests per level (at least 2 x concurrency)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--dtype", default="float32,bfloat16", help="camelid compute dtypes, comma-separated")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--verify", type=int, metavar="N", help="check N requests at concurrency 16 instead")
    ap.add_argument("--png", default=str(Path(__file__).with_name("serve_load.png")))
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="serve_load-"))
    rows = []
    dtypes = args.dtype.split(",")
    for dtype in dtypes[:1] if args.verify else dtypes:
        ours = start_server(["--max-batch", str(max(levels)), "--context", str(args.context), "--max-queue", "1024",
                             "--dtype", dtype], logs / f"camelid-{dtype}.log", threads=args.threads)
        try:
            if args.verify:
                verify(ours.url, args.verify, 16, ours.process.pid)
                continue
            name = "camelid" if dtype == "float32" else f"camelid {dtype}"
            rows += bench(name, ours.url, levels, args.requests, None, {"ignore_eos": True})
        finally:
            ours.stop()
    if args.verify:
        return
    if not args.no_llama_cpp:
        theirs = start_llama_cpp(builtin_model_path(), args.threads, args.context, logs / "llama_cpp.log")
        if theirs:
            try:
                rows += bench("llama.cpp", theirs.url, levels, args.requests, None, {})
            finally:
                theirs.stop()
    print(f"\n| server | concurrency | requests | completion tokens | tokens/s | p50 s | p95 s |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | "
              f"{r['p50']:.2f} | {r['p95']:.2f} |")
    single = {r["server"]: r["tok_s"] for r in rows if r["concurrency"] == 1}
    for r in rows:
        if r["concurrency"] == 8 and r["server"] in single:
            print(f"{r['server']}: concurrency 8 = {r['tok_s'] / single[r['server']]:.2f}x single stream")
    draw(rows, Path(args.png))


if __name__ == "__main__":
    main()

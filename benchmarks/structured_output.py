"""Cost of structured output on `camelid serve`: decode tokens/s of one row constrained by a JSON schema
(llguidance bitmask) against the same row unconstrained, and aggregate tokens/s of 8 concurrent streams with
half of them constrained against all 8 unconstrained. Rounds alternate (unconstrained, constrained, ...) and
medians are compared, so machine drift hits both sides alike. Prints a table; draws a PNG.

    .venv/bin/python benchmarks/structured_output.py                # 5 rounds, benchmarks/structured_output.png
    .venv/bin/python benchmarks/structured_output.py --rounds 3 --threads 2

Decode rate of a stream = (tokens - 1) / (time of last token - time of first token): prompt processing
and grammar compilation are left out, so the figure is the per-token cost of sampling under the mask.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from camelid.serve.launch import start_server

# A long structured answer: 12 short strings, about 100-130 tokens of JSON.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["animals"],
          "properties": {"animals": {"type": "array", "minItems": 12, "maxItems": 12,
                                     "items": {"type": "string", "minLength": 3, "maxLength": 24}}}}
MESSAGES = [{"role": "user", "content": "List twelve animals that live in the Andes, as JSON."}]


def stream_once(url: str, constrained: bool, max_tokens: int, seed: int) -> tuple[int, float]:
    """(tokens, decode seconds between the first and the last token) of one streamed chat completion."""
    body = {"messages": MESSAGES, "stream": True, "temperature": 0.8, "seed": seed, "max_tokens": max_tokens,
            "stream_options": {"include_usage": True}}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "animals", "schema": SCHEMA}}
    else:
        body["ignore_eos"] = True
    first = last = None
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    return tokens, (last - first) if first and last else float("nan")


def per_row(url: str, rounds: int, max_tokens: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
    for r in range(rounds):
        for kind in ("unconstrained", "constrained"):
            tokens, seconds = stream_once(url, kind == "constrained", max_tokens, seed=r)
            rates[kind].append((tokens - 1) / seconds)
    return rates


def aggregate(url: str, rounds: int, max_tokens: int, concurrency: int = 8) -> dict[str, list[float]]:
    """Total tokens / wall time of `concurrency` simultaneous streams: all plain, or half constrained."""
    rates: dict[str, list[float]] = {"all unconstrained": [], "half constrained": []}
    for r in range(rounds):
        for kind in rates:
            flags = [kind == "half constrained" and i % 2 == 0 for i in range(concurrency)]
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                results = list(pool.map(lambda f_i: stream_once(url, f_i[0], max_tokens, seed=100 * r + f_i[1]),
                                        zip(flags, range(concurrency))))
            rates[kind].append(sum(t for t, _ in results) / (time.perf_counter() - start))
    return rates


def sampling_cost(repeats: int = 5) -> tuple[float, float]:
    """In-process, without the model: ms per token of choosing a token from 49k logits, unconstrained and under
    the grammar (mask + masked choice + accept), replaying a valid answer token by token; medians of repeats.
    This is the whole extra work a constrained row does per step, free of the server's timing noise."""
    import torch

    from camelid.engine import load_model
    from camelid.grammar import GrammarCompiler
    from camelid.sampling import SamplingParams, choose

    loaded = load_model()
    tok, vocab = loaded.tokenizer, loaded.config.vocab_size
    compiler = GrammarCompiler(tok, vocab, tok.stop_ids)
    answer = json.dumps({"animals": ["llama", "alpaca", "vicuna", "guanaco", "condor", "puma", "chinchilla",
                                     "viscacha", "spectacled bear", "andean fox", "flamingo", "hummingbird"]})
    ids = tok.encode(answer)
    params = SamplingParams(temperature=0.8)
    logits = torch.randn(len(ids), vocab)
    plain, masked = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(len(ids)):
            choose(logits[i], params)
        plain.append((time.perf_counter() - start) / len(ids) * 1e3)
        constraint = compiler.json_schema(SCHEMA)
        start = time.perf_counter()
        for i, token in enumerate(ids):
            choose(logits[i], params, mask=constraint.mask())
            constraint.accept(token)
        masked.append((time.perf_counter() - start) / len(ids) * 1e3)
        assert constraint.error is None, constraint.error
    return statistics.median(plain), statistics.median(masked)


def chart(rows: list[tuple[str, float, float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (title, a_name, b_name) in zip(axes, (("one row (decode tok/s)", "unconstrained", "constrained"),
                                                  ("8 concurrent (aggregate tok/s)", "all unconstrained",
                                                   "half constrained"))):
        values = {name: value for name, value, _ in rows}
        ax.bar([a_name, b_name], [values[a_name], values[b_name]], color=["#888", "#3a7"])
        ax.set_title(title)
        for i, v in enumerate((values[a_name], values[b_name])):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    fig.suptitle("camelid serve: JSON-schema constrained decoding (llguidance bitmask), medians")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=120)
    p.add_argument("--chart", type=Path, default=Path(__file__).with_name("structured_output.png"))
    args = p.parse_args()
    log = Path(tempfile.mkdtemp(prefix="camelid-bench-")) / "server.log"
    server = start_server(["--max-batch", "8", "--context", "1024", "--threads", str(args.threads)], log,
                          threads=args.threads)
    try:
        stream_once(server.url, True, 16, seed=0)  # warm up: the grammar engine reads the vocabulary once
        stream_once(server.url, False, 16, seed=0)
        row = per_row(server.url, args.rounds, args.max_tokens)
        agg = aggregate(server.url, args.rounds, args.max_tokens)
    finally:
        server.stop()
    plain_ms, masked_ms = sampling_cost()
    rows = []
    print(f"sampling one token (in process): {plain_ms:.3f} ms unconstrained, {masked_ms:.3f} ms under the grammar "
          f"(+{masked_ms - plain_ms:.3f} ms per constrained row per step)")
    print(f"{'measure':<22} {'median tok/s':>12} {'rounds':>40}")
    for name, values in (row | agg).items():
        med = statistics.median(values)
        rows.append((name, med, 0.0))
        print(f"{name:<22} {med:>12.1f} {' '.join(f'{v:.1f}' for v in values):>40}")
    r = statistics.median(row["constrained"]) / statistics.median(row["unconstrained"])
    a = statistics.median(agg["half constrained"]) / statistics.median(agg["all unconstrained"])
    print(f"constrained / unconstrained, one row: {r:.3f} ({(1 - r) * 100:+.1f}% slower)")
    print(f"half constrained / none, 8 concurrent: {a:.3f} ({(1 - a) * 100:+.1f}% slower)")
    chart(rows, args.chart)
    print(f"chart: {args.chart}")


if __name__ == "__main__":
    main()

"""Cost of structured output in camelid's continuous batching: decode tokens/s of one row constrained by a JSON
schema (llguidance bitmask) against the same row unconstrained, and aggregate tokens/s of 8 rows decoded
together with half of them constrained against 8 unconstrained. It drives the server's scheduler in process
(no HTTP, no client threads), so what is compared is the decode loop itself; rounds alternate (unconstrained,
constrained, ...) and medians are compared, so machine drift hits both sides alike. Also measured: the extra
work per token of a constrained row (mask, masked choice, accept) without the model. Prints a table; draws a PNG.

    .venv/bin/python benchmarks/structured_output.py                 # 9 rounds, benchmarks/structured_output.png
    .venv/bin/python benchmarks/structured_output.py --rounds 5 --threads 2

Decode rate of a row = (tokens - 1) / (time of its last token - time of its first), from the scheduler's own
timestamps: prompt processing and grammar compilation are left out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from camelid.engine import load_model
from camelid.grammar import GrammarCompiler
from camelid.sampling import SamplingParams, choose
from camelid.scheduler import Chunk, Done, Job, Scheduler

# A long structured answer: 16 strings of 8-24 characters, ~100-150 tokens of JSON.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["animals"],
          "properties": {"animals": {"type": "array", "minItems": 16, "maxItems": 16,
                                     "items": {"type": "string", "minLength": 8, "maxLength": 24}}}}
PROMPT = ("<|im_start|>user\nList sixteen animals that live in the Andes, as JSON.<|im_end|>\n"
          "<|im_start|>assistant\n")


class Bench:
    def __init__(self, threads: int, batch: int = 8):
        torch.set_num_threads(threads)
        self.loaded = load_model()
        tok = self.loaded.tokenizer
        self.prompt = tok.encode(PROMPT)
        self.stop_ids = set(tok.stop_ids)
        self.compiler = GrammarCompiler(tok, self.loaded.config.vocab_size, self.stop_ids)
        self.scheduler = Scheduler(self.loaded, max_batch=batch, context=512, max_queue=64)
        self.scheduler.start()

    def run(self, constrained: list[bool], max_tokens: int, seed: int) -> list[tuple[int, float]]:
        """Decode len(constrained) rows together; each row's (tokens, seconds from first to last token)."""
        times: list[list[float]] = [[] for _ in constrained]
        done = threading.Semaphore(0)

        def emitter(i: int):
            def emit(event):
                if isinstance(event, Chunk):
                    times[i].append(event.time)
                elif isinstance(event, Done):
                    done.release()
            return emit

        jobs = []
        for i, c in enumerate(constrained):
            params = SamplingParams(max_new_tokens=max_tokens, temperature=0.8, seed=seed + i)
            # Unconstrained rows ignore EOS (run the whole budget); constrained ones end with their JSON.
            jobs.append(Job(list(self.prompt), params, emitter(i), stop_ids=self.stop_ids if c else set(),
                            constraint=self.compiler.json_schema(SCHEMA) if c else None))
        self.scheduler.submit_many(jobs)
        for _ in jobs:
            done.acquire()
        return [(len(t), t[-1] - t[0]) for t in times]


def per_row(bench: Bench, rounds: int, max_tokens: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
    for r in range(rounds):
        for kind in rates:
            [(tokens, seconds)] = bench.run([kind == "constrained"], max_tokens, seed=r)
            rates[kind].append((tokens - 1) / seconds)
    return rates


def aggregate(bench: Bench, rounds: int, max_tokens: int, rows: int = 8) -> dict[str, list[float]]:
    """Total tokens / wall time of `rows` rows decoded together: all plain, or every other one constrained."""
    rates: dict[str, list[float]] = {"all unconstrained": [], "half constrained": []}
    for r in range(rounds):
        for kind in rates:
            start = time.perf_counter()
            results = bench.run([kind == "half constrained" and i % 2 == 0 for i in range(rows)], max_tokens,
                                seed=100 * r)
            rates[kind].append(sum(t for t, _ in results) / (time.perf_counter() - start))
    return rates


def sampling_cost(bench: Bench, repeats: int = 5) -> tuple[float, float]:
    """Without the model: ms per token of choosing from the vocabulary's logits, unconstrained and under the
    grammar (mask + masked choice + accept), replaying a valid answer token by token; medians of repeats."""
    tok, vocab = bench.loaded.tokenizer, bench.loaded.config.vocab_size
    answer = json.dumps({"animals": ["wild vicuna", "alpaca herd", "guanaco pair", "spectacled bear",
                                     "andean condor", "chinchilla", "mountain viscacha", "andean fox",
                                     "mountain tapir", "puma concolor", "andean flamingo", "giant hummingbird",
                                     "taruca deer", "huemul deer", "wild guinea pig", "andean cat"]})
    ids = tok.encode(answer)
    params = SamplingParams(temperature=0.8)
    logits = torch.randn(len(ids), vocab)
    plain, masked = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(len(ids)):
            choose(logits[i], params)
        plain.append((time.perf_counter() - start) / len(ids) * 1e3)
        constraint = bench.compiler.json_schema(SCHEMA)
        start = time.perf_counter()
        for i, token in enumerate(ids):
            choose(logits[i], params, mask=constraint.mask())
            constraint.accept(token)
        masked.append((time.perf_counter() - start) / len(ids) * 1e3)
        assert constraint.error is None, constraint.error
    return statistics.median(plain), statistics.median(masked)


def chart(values: dict[str, float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (title, names) in zip(axes, (("one row: decode tok/s", ("unconstrained", "constrained")),
                                         ("8 rows together: aggregate tok/s",
                                          ("all unconstrained", "half constrained")))):
        ax.bar(names, [values[n] for n in names], color=["#888", "#3a7"])
        ax.set_title(title)
        for i, n in enumerate(names):
            ax.text(i, values[n], f"{values[n]:.1f}", ha="center", va="bottom")
    fig.suptitle("camelid: JSON-schema constrained decoding (llguidance bitmask), medians of alternating rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--chart", type=Path, default=Path(__file__).with_name("structured_output.png"))
    args = p.parse_args()
    bench = Bench(args.threads)
    try:
        bench.run([True, False], 8, seed=0)  # warm up
        row = per_row(bench, args.rounds, args.max_tokens)
        agg = aggregate(bench, max(3, args.rounds // 2), args.max_tokens)
        plain_ms, masked_ms = sampling_cost(bench)
    finally:
        bench.scheduler.stop()
    print(f"sampling one token without the model: {plain_ms:.3f} ms unconstrained, {masked_ms:.3f} ms under the "
          f"grammar (+{masked_ms - plain_ms:.3f} ms per constrained row per step)")
    medians = {}
    print(f"{'measure':<20} {'median tok/s':>12}  rounds")
    for name, values in (row | agg).items():
        medians[name] = statistics.median(values)
        print(f"{name:<20} {medians[name]:>12.1f}  {' '.join(f'{v:.1f}' for v in values)}")
    r = medians["constrained"] / medians["unconstrained"]
    a = medians["half constrained"] / medians["all unconstrained"]
    print(f"constrained / unconstrained, one row: {r:.3f} ({(1 - r) * 100:.1f}% slower)")
    print(f"half constrained / all unconstrained, 8 rows: {a:.3f} ({(1 - a) * 100:.1f}% slower)")
    chart(medians, args.chart)
    print(f"chart: {args.chart}")


if __name__ == "__main__":
    main()

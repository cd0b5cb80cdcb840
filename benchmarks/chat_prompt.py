"""Prompt-building time of a chat request: the masked path (`render_ids`, what the server called before) against
the prompt-only path (`prompt_ids`: render once, encode once), side by side, rounds alternating, in CPU time.

The built-in model's tokenizer with its own GGUF chat template (jinja, what `camelid serve` uses for it) and the
equivalent built-in JSON template (`smollm`). Prints a table and the ratio, and plots time against turns.

Run: .venv/bin/python benchmarks/chat_prompt.py [--turns 1 8 16 32 64] [--rounds 5] [--png benchmarks/chat_prompt.png]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from camelid.chat import get_template, template_from_hf
from camelid.engine import builtin_model_path
from camelid.formats.gguf import GGUFReader
from camelid.tokenizer import Tokenizer

QUESTION = ("I am planning a week-long trip to the mountains in late autumn and would like to know what to pack, "
            "how to plan the daily hikes, and which precautions to take against sudden changes in weather. ")
ANSWER = ("Pack layers: a thermal base, a fleece, a waterproof shell, gloves and a warm hat. Plan hikes of four "
          "to six hours that end before dusk, check the forecast every morning, tell someone your route, and "
          "carry a map, a headlamp, water, food and a small first-aid kit. Turn back early if clouds build up. ")


def conversation(turns: int) -> list[dict[str, str]]:
    """A system message, `turns` user/assistant exchanges, and a final user question: one chat request."""
    c = [{"role": "system", "content": "You are a helpful travel assistant."}]
    for i in range(turns):
        c += [{"role": "user", "content": f"({i}) {QUESTION}"}, {"role": "assistant", "content": f"({i}) {ANSWER}"}]
    return c + [{"role": "user", "content": "Thank you. And what should I eat on the trail?"}]


def timed(fn) -> tuple[float, list[int]]:
    # CPU time of this process: the work done, which other jobs sharing the cores do not inflate (wall time
    # does, several-fold on a loaded machine); both paths run on one thread.
    start = time.process_time()
    ids = fn()
    return time.process_time() - start, ids


def measure(template, tok: Tokenizer, turns: int, rounds: int) -> tuple[float, float, int]:
    """Median CPU seconds of the masked and the prompt-only path (alternating), and the prompt's length."""
    c = conversation(turns)
    old, new = [], []
    for _ in range(rounds):
        t_old, ids_old = timed(lambda: template.render_ids(c, tok, add_generation_prompt=True)[0])
        t_new, ids_new = timed(lambda: template.prompt_ids(c, tok, add_generation_prompt=True))
        if ids_old != ids_new:
            raise SystemExit(f"{template.name}: the two paths disagree at {turns} turns")
        old.append(t_old)
        new.append(t_new)
    return statistics.median(old), statistics.median(new), len(ids_new)


def plot(rows: list[tuple[str, int, int, float, float]], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == name]
        ax.plot([r[1] for r in mine], [r[3] * 1000 for r in mine], "o-", label=f"{name}: render_ids (with mask)")
        ax.plot([r[1] for r in mine], [r[4] * 1000 for r in mine], "s--", label=f"{name}: prompt_ids")
    ax.set_xlabel("turns in the request")
    ax.set_ylabel("prompt-building CPU time (ms, median)")
    ax.set_yscale("log")
    ax.set_title("Chat prompt building, built-in SmolLM2 tokenizer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--png", type=Path, default=Path(__file__).with_name("chat_prompt.png"))
    args = parser.parse_args()
    metadata = GGUFReader(builtin_model_path()).metadata
    tok = Tokenizer.from_gguf_metadata(metadata)
    templates = {"jinja (GGUF's own)": template_from_hf(metadata["tokenizer.chat_template"], bos_token="<|im_start|>",
                                                         eos_token="<|im_end|>", name="embedded"),
                 "JSON (smollm)": get_template("smollm")}
    rows = []
    for name, template in templates.items():
        for turns in tqdm(args.turns, desc=name):
            old, new, length = measure(template, tok, turns, args.rounds)
            rows.append((name, turns, length, old, new))
    print(f"| template | turns | prompt tokens | render_ids (mask) | prompt_ids | ratio |  (CPU time, median of {args.rounds})")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, turns, length, old, new in rows:
        print(f"| {name} | {turns} | {length} | {old * 1000:.1f} ms | {new * 1000:.1f} ms | {old / new:.1f}x |")
    plot(rows, args.png)
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()

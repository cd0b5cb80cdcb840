"""Summaries of judgments (mean score per model, turn and category; win/tie/loss with counts) and a chart."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def summarize_single(records: list[dict]) -> dict:
    """Per model: mean score overall, per turn and per category; how many judgments were unparsable."""
    out: dict = {}
    by_model = defaultdict(list)
    for r in records:
        by_model[r["model"]].append(r)
    for model, rs in by_model.items():
        scored = [r for r in rs if r.get("score") is not None]
        turns, cats = defaultdict(list), defaultdict(list)
        for r in scored:
            turns[r["turn"]].append(r["score"])
            cats[r.get("category") or "none"].append(r["score"])
        out[model] = {"score": _mean([r["score"] for r in scored]), "judgments": len(rs), "unparsable": len(rs) - len(scored),
                      "per_turn": {str(t): _mean(v) for t, v in sorted(turns.items())},
                      "per_category": {c: _mean(v) for c, v in sorted(cats.items())}}
    return {"mode": "single", "models": out}


def _tally(rs: list[dict]) -> dict:
    n = {"win": 0, "tie": 0, "loss": 0, "inconsistent": 0, "error": 0}
    for r in rs:
        v = r["verdict"]
        if v == "A":
            n["win"] += 1
        elif v == "B":
            n["loss"] += 1
        elif v == "tie":
            n["tie"] += 1
        elif v == "inconsistent":  # the judge changed its mind when the order changed: a tie
            n["tie"] += 1
            n["inconsistent"] += 1
        else:
            n["error"] += 1
    decided = n["win"] + n["tie"] + n["loss"]
    n["win_rate"] = round(n["win"] / decided, 4) if decided else None
    n["win_rate_ties_half"] = round((n["win"] + 0.5 * n["tie"]) / decided, 4) if decided else None
    return n


def summarize_pairwise(records: list[dict]) -> dict:
    """Win/tie/loss of model A against model B (ties include inconsistent pairs), overall and per category."""
    if not records:
        return {"mode": "pairwise"}
    cats = defaultdict(list)
    for r in records:
        cats[r.get("category") or "none"].append(r)
    return {"mode": "pairwise", "model_a": records[0]["model_a"], "model_b": records[0]["model_b"],
            "overall": _tally(records), "per_category": {c: _tally(rs) for c, rs in sorted(cats.items())}}


def plot(summary: dict, path: Path) -> None:
    """Single: mean score per category for each model; pairwise: win/tie/loss bars per category."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if summary["mode"] == "single":
        models = list(summary["models"])
        cats = sorted({c for m in models for c in summary["models"][m]["per_category"]})
        width = 0.8 / max(len(models), 1)
        for i, m in enumerate(models):
            values = [summary["models"][m]["per_category"].get(c) or 0 for c in cats]
            ax.bar([x + i * width for x in range(len(cats))], values, width, label=m)
        ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(cats))], cats, rotation=30, ha="right")
        ax.set_ylim(0, 10)
        ax.set_ylabel("mean score (1-10)")
        ax.set_title("Single-answer grading")
        ax.legend()
    else:
        rows = [("overall", summary["overall"])] + list(summary["per_category"].items())
        labels = [r[0] for r in rows]
        left = [0.0] * len(rows)
        for key, colour in (("win", "#2a9d8f"), ("tie", "#c0c0c0"), ("loss", "#e76f51")):
            values = [r[1][key] for r in rows]
            ax.barh(labels, values, left=left, color=colour, label=key)
            left = [a + b for a, b in zip(left, values)]
        ax.invert_yaxis()
        ax.set_xlabel("judgments")
        ax.set_title(f"{summary['model_a']} vs {summary['model_b']} (ties include inconsistent orders)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Bradley-Terry ratings on the Elo scale from pairwise votes, with bootstrap 95% intervals (as Chatbot
Arena computes its leaderboard): P(a beats b) = 1 / (1 + 10^((R_b - R_a) / 400)); a tie (and "both bad")
counts as half a win for each side; the maximum-likelihood ratings are found by Newton's method and
centred on 1000."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SCALE, BASE, CENTRE = 400.0, 10.0, 1000.0
OUTCOMES = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}


def _arrays(battles: Sequence[tuple[str, str, str]]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    models = sorted({m for a, b, _ in battles for m in (a, b)})
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[x[0]] for x in battles], dtype=np.int64)
    b = np.array([index[x[1]] for x in battles], dtype=np.int64)
    y = np.array([OUTCOMES[x[2]] for x in battles], dtype=np.float64)
    return models, a, b, y


def _fit(n: int, a: np.ndarray, b: np.ndarray, y: np.ndarray, l2: float = 1e-6, steps: int = 100) -> np.ndarray:
    """Maximum-likelihood strengths (natural-log units) by Newton's method; a faint L2 pull towards 0
    keeps a model that never won (or never lost) finite, as Chatbot Arena's near-unregularised fit does."""
    theta = np.zeros(n)
    rows = np.arange(len(a))
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(theta[a] - theta[b])))
        diff = np.zeros((len(a), n))
        diff[rows, a] += 1.0
        diff[rows, b] -= 1.0
        grad = diff.T @ (y - p) - l2 * len(a) * theta
        hess = (diff * (p * (1 - p))[:, None]).T @ diff + l2 * len(a) * np.eye(n)
        step = np.linalg.solve(hess + 1e-12 * np.eye(n), grad)
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    return theta


def elo_ratings(battles: Sequence[tuple[str, str, str]]) -> dict[str, float]:
    """Ratings of every model in `battles` ((model_a, model_b, winner) with winner in OUTCOMES)."""
    if not battles:
        return {}
    models, a, b, y = _arrays(battles)
    theta = _fit(len(models), a, b, y)
    ratings = SCALE / math.log(BASE) * (theta - theta.mean()) + CENTRE
    return dict(zip(models, ratings.tolist()))


def bootstrap_intervals(battles: Sequence[tuple[str, str, str]], rounds: int = 200,
                        seed: int = 0) -> dict[str, tuple[float, float]]:
    """2.5th and 97.5th percentiles of each model's rating over `rounds` resamplings of the votes."""
    if not battles:
        return {}
    models, a, b, y = _arrays(battles)
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, len(models)))
    for r in range(rounds):
        pick = rng.integers(0, len(a), len(a))
        theta = _fit(len(models), a[pick], b[pick], y[pick], steps=50)
        samples[r] = SCALE / math.log(BASE) * (theta - theta.mean()) + CENTRE
    low, high = np.percentile(samples, [2.5, 97.5], axis=0)
    return {m: (float(lo), float(hi)) for m, lo, hi in zip(models, low, high)}


def leaderboard(battles: Sequence[tuple[str, str, str]], rounds: int = 200, seed: int = 0) -> list[dict]:
    """Rows sorted by rating: model, rating, 95% interval, votes, wins, ties, losses."""
    ratings = elo_ratings(battles)
    intervals = bootstrap_intervals(battles, rounds, seed)
    rows = []
    for model, rating in ratings.items():
        mine = [x for x in battles if model in x[:2]]
        wins = sum(1 for x in mine if (x[2] == "model_a" and x[0] == model) or (x[2] == "model_b" and x[1] == model))
        ties = sum(1 for x in mine if x[2].startswith("tie"))
        lo, hi = intervals[model]
        rows.append({"model": model, "rating": round(rating, 1), "ci_low": round(lo, 1), "ci_high": round(hi, 1),
                     "votes": len(mine), "wins": wins, "ties": ties, "losses": len(mine) - wins - ties})
    return sorted(rows, key=lambda r: -r["rating"])


def plot(rows: list[dict], path) -> None:
    """Ratings with their 95% intervals, best first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.5))
    names = [r["model"] for r in rows]
    ratings = [r["rating"] for r in rows]
    err = [[r["rating"] - r["ci_low"] for r in rows], [r["ci_high"] - r["rating"] for r in rows]]
    ax.errorbar(ratings, names, xerr=err, fmt="o", capsize=4)
    ax.invert_yaxis()
    ax.set_xlabel("Bradley-Terry rating (Elo scale), 95% bootstrap interval")
    ax.set_title(f"Arena leaderboard ({sum(r['votes'] for r in rows) // 2} votes)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

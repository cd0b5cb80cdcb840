"""Arena ratings: Bradley-Terry on the Elo scale checked against a direct maximum-likelihood fit
(scipy's optimiser on the same likelihood) on synthetic votes drawn from known strengths; the
leaderboard command on a real votes database."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from camelid.eval.ratings import bootstrap_intervals, elo_ratings, leaderboard
from camelid.serve.votes import VoteStore

TRUE = {"alpha": 1200.0, "beta": 1100.0, "gamma": 1000.0, "delta": 850.0}


def synthetic_votes(n: int, seed: int = 0, tie_rate: float = 0.15) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    models = list(TRUE)
    out = []
    for _ in range(n):
        a, b = rng.choice(len(models), 2, replace=False)
        ma, mb = models[a], models[b]
        if rng.random() < tie_rate:
            out.append((ma, mb, "tie" if rng.random() < 0.5 else "tie (bothbad)"))
            continue
        p = 1 / (1 + 10 ** ((TRUE[mb] - TRUE[ma]) / 400))
        out.append((ma, mb, "model_a" if rng.random() < p else "model_b"))
    return out


def direct_fit(votes) -> dict[str, float]:
    """Maximise the Bradley-Terry log-likelihood directly in Elo units (ties = half a win each)."""
    from scipy.optimize import minimize
    models = sorted({m for a, b, _ in votes for m in (a, b)})
    idx = {m: i for i, m in enumerate(models)}
    y = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}

    def nll(r):
        total = 0.0
        for a, b, w in votes:
            p = 1 / (1 + 10 ** ((r[idx[b]] - r[idx[a]]) / 400))
            total -= y[w] * math.log(p) + (1 - y[w]) * math.log(1 - p)
        return total

    r = minimize(nll, np.zeros(len(models)), method="BFGS", options={"gtol": 1e-8}).x
    r = r - r.mean() + 1000
    return dict(zip(models, r))


def test_bradley_terry_equals_direct_maximum_likelihood_and_recovers_strengths() -> None:
    votes = synthetic_votes(3000)
    ours = elo_ratings(votes)
    direct = direct_fit(votes)
    for m in TRUE:
        assert abs(ours[m] - direct[m]) < 0.5, (m, ours[m], direct[m])
    # Known strengths come back (relative to their mean, as ratings are only defined up to a shift); ties
    # drawn regardless of strength would pull ratings together, so these votes have none.
    votes = synthetic_votes(3000, seed=1, tie_rate=0.0)
    ours = elo_ratings(votes)
    mean_true = sum(TRUE.values()) / len(TRUE)
    for m, t in TRUE.items():
        assert abs(ours[m] - (t - mean_true + 1000)) < 50, (m, ours[m])
    intervals = bootstrap_intervals(votes, rounds=100)
    inside = sum(intervals[m][0] <= TRUE[m] - mean_true + 1000 <= intervals[m][1] for m in TRUE)
    assert inside >= 3 and all(intervals[m][0] < ours[m] < intervals[m][1] for m in TRUE)
    assert [r["model"] for r in leaderboard(votes, rounds=20)] == ["alpha", "beta", "gamma", "delta"]


def test_a_model_that_never_wins_stays_finite() -> None:
    votes = [("a", "b", "model_a")] * 5 + [("b", "c", "tie")] * 3
    ratings = elo_ratings(votes)
    assert all(math.isfinite(v) for v in ratings.values()) and ratings["a"] > ratings["b"]


def test_leaderboard_command(camelid_bin: Path, tmp_path: Path) -> None:
    store = VoteStore(tmp_path / "votes.db")
    for a, b, w in synthetic_votes(200, seed=3):
        store.add(a, b, w, [{"role": "user", "content": "hi"}], [{"role": "user", "content": "hi"}])
    store.close()
    proc = subprocess.run([str(camelid_bin), "eval", "leaderboard", str(tmp_path / "votes.db"), "--chart",
                           str(tmp_path / "lb.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["leaderboard"]
    assert rows[0]["model"] == "alpha" and sum(r["votes"] for r in rows) == 400
    assert (tmp_path / "lb.png").stat().st_size > 1000


def test_leaderboard_missing_database(camelid_bin: Path, tmp_path: Path) -> None:
    from .helpers import one_line_error
    proc = subprocess.run([str(camelid_bin), "eval", "leaderboard", str(tmp_path / "none.db")], capture_output=True,
                          text=True, timeout=60)
    one_line_error(proc, "none.db")


@pytest.mark.parametrize("action", ["perplexity", "lm-eval", "answer", "judge", "leaderboard"])
def test_every_eval_command_has_help(camelid_bin: Path, action: str) -> None:
    proc = subprocess.run([str(camelid_bin), "eval", action, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: camelid eval " + action in proc.stdout, proc.stderr

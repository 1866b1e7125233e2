"""Statistics of a random-search grid: EMP with bootstrap bands, share of good draws, paired sign test,
goals-to-threshold and the data-efficiency ratio with a paired bootstrap interval.

Scores are fractions of the optimal return. "Paired" means draw i of every method and budget used the same
hyperparameter assignment, so the draw index is the unit that is resampled.
"""

from __future__ import annotations

from math import comb

import numpy as np


def emp_curve(scores, n_max: int) -> np.ndarray:
    """scores: (N,) -> (n_max,) E[max of n draws], n = 1..n_max, draws with replacement from the N scores
    (Dodge et al. 2019; for n <= N this is ``expected_max_performance``)."""
    v = np.sort(np.asarray(scores, dtype=np.float64))
    big_n = len(v)
    if big_n == 0:
        raise ValueError("emp_curve needs at least one score")
    i = np.arange(1, big_n + 1)
    return np.array([(v * ((i / big_n) ** n - ((i - 1) / big_n) ** n)).sum() for n in range(1, n_max + 1)])


def expected_max_performance(scores) -> np.ndarray:
    """Scores of N random hyperparameter draws -> (N,) curve, entry n-1 = E[max of n draws]."""
    return emp_curve(scores, len(np.asarray(scores)))


def emp_band(scores, n_max: int, reps: int = 1000, level: float = 0.9, seed: int = 0) -> dict:
    """EMP curve and a bootstrap band: resample the N scores with replacement ``reps`` times ->
    {"emp", "lo", "hi"}, each a list of n_max floats (the central ``level`` interval)."""
    s = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boots = np.stack([emp_curve(s[rng.integers(0, len(s), len(s))], n_max) for _ in range(reps)])
    a = (1 - level) / 2
    return {
        "emp": emp_curve(s, n_max).tolist(),
        "lo": np.quantile(boots, a, axis=0).tolist(),
        "hi": np.quantile(boots, 1 - a, axis=0).tolist(),
    }


def share_at_least(scores, level: float = 0.5) -> float:
    return float(np.mean(np.asarray(scores) >= level))


def sign_test(a, b) -> dict:
    """Paired two-sided exact sign test of a vs b (ties dropped) -> wins of a, losses, ties, p-value."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    n, k = wins + losses, min(wins, losses)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)
    return {"wins": wins, "losses": losses, "ties": int(len(d) - n), "p": p}


def goals_to_threshold(goals, best, threshold: float):
    """goals: ascending budgets (training goals), best: the best score at each -> the first budget whose best
    draw reaches ``threshold``, or None."""
    for g, s in zip(goals, best, strict=True):
        if s >= threshold:
            return g
    return None


def efficiency_ratio(goals, scores_base, scores_m, threshold: float, reps: int = 2000, seed: int = 0) -> dict:
    """Data-efficiency ratio goals_base / goals_m to reach ``threshold`` with the best draw, and its paired
    bootstrap distribution. scores_*: (budgets, N) draw-paired scores -> {"ratio" (None unless both reach),
    "lo", "hi" (5% / 95% of the resamples where both reach), "both_reach", "only_m", "only_base", "neither"
    (shares of resamples)}."""
    sb, sm = np.asarray(scores_base, float), np.asarray(scores_m, float)
    n = min(sb.shape[1], sm.shape[1])
    sb, sm = sb[:, :n], sm[:, :n]

    def ratio(idx):
        gb = goals_to_threshold(goals, sb[:, idx].max(1), threshold)
        gm = goals_to_threshold(goals, sm[:, idx].max(1), threshold)
        return gb, gm

    gb, gm = ratio(np.arange(n))
    rng = np.random.default_rng(seed)
    both, counts = [], {"only_m": 0, "only_base": 0, "neither": 0}
    for _ in range(reps):
        b, m = ratio(rng.integers(0, n, n))
        if b is not None and m is not None:
            both.append(b / m)
        elif m is not None:
            counts["only_m"] += 1
        elif b is not None:
            counts["only_base"] += 1
        else:
            counts["neither"] += 1
    out = {
        "goals_base": gb,
        "goals_m": gm,
        "ratio": gb / gm if gb is not None and gm is not None else None,
        "lo": float(np.quantile(both, 0.05)) if both else None,
        "hi": float(np.quantile(both, 0.95)) if both else None,
        "both_reach": len(both) / reps,
    }
    out.update({k: v / reps for k, v in counts.items()})
    return out


__all__ = [
    "efficiency_ratio",
    "emp_band",
    "emp_curve",
    "expected_max_performance",
    "goals_to_threshold",
    "share_at_least",
    "sign_test",
]

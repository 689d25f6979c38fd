"""Confidence and out-of-distribution scores of kNN votes, and their calibration (pure numpy).

- `vote_confidence(totals, present, winner)`: per query, the winner's share of the vote weight, its margin over
  the runner-up (as a share) and the entropy (nats) of the normalised per-class totals. The paper notes that the
  plurality count / vote entropy tracks accuracy.
- `ood_score(d, n=100)`: the paper's OOD signal, the mean cosine distance to the first `n` neighbours (fewer if
  fewer were searched); missing neighbours (NaN) are ignored.
- `ece(conf, correct)` / `reliability(conf, correct)`: expected calibration error over equal-width bins.
- `fit_platt(x, y)` / `apply_platt(...)`: P(correct) = sigmoid(a * x + b) on x = `share_logit(share, k)`, the
  log-odds of the vote share clipped to [1/2k, 1 - 1/2k] (a unanimous vote, share 1, still gets a finite
  logit, so the fit can pull it below 1). `a` is an inverse temperature, `b` a bias; fitted by Newton's method
  on a validation split. Two parameters keep it stable on a few hundred queries.
- `fit_isotonic(x, y)` / `apply_isotonic(...)`: the non-parametric alternative (pool adjacent violators); it
  needs more validation queries than Platt scaling to beat the raw share (measured on Fashion-MNIST).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np


def vote_confidence(totals: np.ndarray, present: np.ndarray, winner: np.ndarray) -> Dict[str, np.ndarray]:
    """{share, margin, entropy} (nq,) from per-class totals (nq, C), presence mask and winner column (nq,).

    `winner` is the column of the winning class in `totals` (-1 = no neighbours: share 0, margin 0, entropy 0).
    """
    t = np.where(present, np.asarray(totals, dtype=np.float64), 0.0)
    assert t.ndim == 2 and winner.shape == (t.shape[0],), f"totals {t.shape} and winner {winner.shape} differ"
    nq = t.shape[0]
    s = t.sum(axis=1)
    p = np.divide(t, s[:, None], out=np.zeros_like(t), where=s[:, None] > 0)
    rows = np.arange(nq)
    ok = winner >= 0
    w = np.where(ok, p[rows, np.clip(winner, 0, None)] if t.shape[1] else 0.0, 0.0)
    others = p.copy()
    if t.shape[1]:
        others[rows, np.clip(winner, 0, None)] = -np.inf
    runner = others.max(axis=1, initial=-np.inf) if t.shape[1] else np.full(nq, -np.inf)
    margin = np.where(ok, w - np.where(np.isfinite(runner), np.maximum(runner, 0.0), 0.0), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return {"share": w, "margin": margin, "entropy": np.where(ok, ent, 0.0)}


def of_votes(v) -> Dict[str, np.ndarray]:
    """`vote_confidence` of a `votes.Votes` (its winner's column found from its label)."""
    col = np.where(v.label >= 0, np.searchsorted(v.classes, v.label), -1)
    return vote_confidence(v.totals, v.present, col)


def ood_score(d: np.ndarray, n: int = 100) -> np.ndarray:
    """(nq,) mean cosine distance to the first `n` neighbours of (nq, k) distances `d` (NaN = missing)."""
    d = np.asarray(d, dtype=np.float64)[:, :n]
    valid = ~np.isnan(d)
    cnt = valid.sum(axis=1)
    tot = np.where(valid, d, 0.0).sum(axis=1)
    return np.divide(tot, cnt, out=np.full(d.shape[0], np.nan), where=cnt > 0)


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> Dict[str, np.ndarray]:
    """Per equal-width confidence bin over [0, 1]: count, mean confidence and accuracy (NaN in empty bins)."""
    conf = np.clip(np.asarray(conf, dtype=np.float64), 0.0, 1.0)
    correct = np.asarray(correct, dtype=np.float64)
    assert conf.shape == correct.shape, f"conf {conf.shape} and correct {correct.shape} differ"
    b = np.minimum((conf * bins).astype(np.int64), bins - 1)  # conf = 1.0 falls in the last bin
    count = np.bincount(b, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=bins) / count
        acc = np.bincount(b, weights=correct, minlength=bins) / count
    return {"edges": np.linspace(0, 1, bins + 1), "count": count, "confidence": mean_conf, "accuracy": acc}


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: sum over bins of (bin share of queries) x |accuracy - mean confidence|."""
    r = reliability(conf, correct, bins)
    n = r["count"].sum()
    if n == 0:
        return float("nan")
    keep = r["count"] > 0
    return float(np.sum(r["count"][keep] / n * np.abs(r["accuracy"][keep] - r["confidence"][keep])))


def fit_isotonic(x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Non-decreasing least-squares fit of y on x (pool adjacent violators); returns (knots_x, knots_y).

    Equal x values are pooled first, so the map is a function; `apply_isotonic` interpolates between knots.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    assert x.shape == y.shape and x.ndim == 1 and len(x) > 0, "fit_isotonic needs two equal non-empty 1-d arrays"
    ux, inv = np.unique(x, return_inverse=True)
    wsum = np.bincount(inv).astype(np.float64)
    ysum = np.bincount(inv, weights=y)
    # Blocks as a stack of (mean, weight, first knot index); merge while the last two decrease.
    means, weights, starts = [], [], []
    for i in range(len(ux)):
        means.append(ysum[i] / wsum[i])
        weights.append(wsum[i])
        starts.append(i)
        while len(means) > 1 and means[-2] > means[-1]:
            w = weights[-2] + weights[-1]
            m = (means[-2] * weights[-2] + means[-1] * weights[-1]) / w
            means[-2:], weights[-2:], starts[-2:] = [m], [w], [starts[-2]]
    ky = np.empty(len(ux))
    bounds = starts + [len(ux)]
    for m, a, b in zip(means, bounds[:-1], bounds[1:]):
        ky[a:b] = m
    return ux, ky


def apply_isotonic(x: np.ndarray, knots_x: np.ndarray, knots_y: np.ndarray) -> np.ndarray:
    """The fitted map at `x` (linear between knots, constant beyond the ends)."""
    return np.interp(np.asarray(x, dtype=np.float64), knots_x, knots_y)


def share_logit(share: np.ndarray, k: int) -> np.ndarray:
    """Log-odds of vote shares, clipped to [1/2k, 1 - 1/2k] so that unanimous votes stay finite."""
    e = 0.5 / max(int(k), 1)
    p = np.clip(np.asarray(share, dtype=np.float64), e, 1.0 - e)
    return np.log(p / (1.0 - p))


def fit_platt(x: np.ndarray, y: np.ndarray, iters: int = 100, l2: float = 1e-3) -> Tuple[float, float]:
    """(a, b) of the logistic fit P(y=1) = sigmoid(a x + b) (Newton's method, a small L2 penalty for stability)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    assert x.shape == y.shape and x.ndim == 1 and len(x) > 0, "fit_platt needs two equal non-empty 1-d arrays"
    X = np.stack([x, np.ones_like(x)], axis=1)
    w = np.array([1.0, 0.0])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (p - y) + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w = w - step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def apply_platt(x: np.ndarray, a: float, b: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(a * np.asarray(x, dtype=np.float64) + b)))

"""kNN vote methods (the paper's aggregation rules) as a registry of vectorised numpy functions.

Every method maps cosine distances `d` (nq, k) of ranked neighbours (rank i = column i, 0-based) to
per-neighbour weights; weights are summed per label and the label with the largest total wins. Ties follow
the paper: scanning ranks in order, a class becomes the winner only when its running total is strictly
greater than the best so far, so among tied classes the one that reached the maximum first wins.

Soft variants multiply the weight by gamma(item) from soft pruning (see `pipeline.memory.pruning`).
Interventions multiply weights by per-neighbour factors (`multipliers`) in every method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from pipeline.errors import UserError

WeightFn = Callable[..., np.ndarray]


@dataclass(frozen=True)
class VoteMethod:
    name: str
    weight: WeightFn  # (d (nq,k) float, ranks (k,), params) -> (nq,k) weights
    soft: bool  # multiply by gamma (soft pruning)
    doc: str


METHODS: Dict[str, VoteMethod] = {}
DEFAULT_PARAMS = {"xi": 1.0, "tau": 0.07, "alpha": 2.0}


def register(name: str, doc: str):
    """Register a base method `name` and its soft variant `soft_<name>`."""

    def wrap(fn: WeightFn) -> WeightFn:
        METHODS[name] = VoteMethod(name, fn, False, doc)
        METHODS[f"soft_{name}"] = VoteMethod(f"soft_{name}", fn, True, f"{doc} x gamma(item)")
        return fn

    return wrap


@register("plurality", "1")
def _plurality(d: np.ndarray, ranks: np.ndarray, **_) -> np.ndarray:
    return np.ones_like(d)


@register("distance", "exp(-d)^xi")
def _distance(d: np.ndarray, ranks: np.ndarray, xi: float = 1.0, **_) -> np.ndarray:
    return np.exp(-d) ** xi


@register("softmax", "exp((1-d)/tau), unnormalised")
def _softmax(d: np.ndarray, ranks: np.ndarray, tau: float = 0.07, **_) -> np.ndarray:
    return np.exp((1.0 - d) / tau)


@register("rank", "1/(alpha+i)")
def _rank(d: np.ndarray, ranks: np.ndarray, alpha: float = 2.0, **_) -> np.ndarray:
    return np.broadcast_to(1.0 / (alpha + ranks), d.shape).copy()


def available_methods() -> List[str]:
    return list(METHODS)


def get_method(name: str) -> VoteMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown vote method {name!r}: choose one of {', '.join(METHODS)}") from None


@dataclass
class Votes:
    """Result of a vote over nq queries."""
    label: np.ndarray  # (nq,) int64 winning label (-1 when a query has no neighbours)
    weights: np.ndarray  # (nq, k) float64 per-neighbour weights (0 for missing neighbours)
    classes: np.ndarray  # (C,) int64 labels that occur in the neighbour sets
    totals: np.ndarray  # (nq, C) float64 per-class vote totals
    present: np.ndarray  # (nq, C) bool: the class occurs among the query's neighbours

    def scores(self, q: int) -> Dict[int, float]:
        """{label: total} of query q for the labels present among its neighbours, best first."""
        js = np.flatnonzero(self.present[q])
        js = js[np.argsort(-self.totals[q, js], kind="stable")]
        return {int(self.classes[j]): float(self.totals[q, j]) for j in js}


def weights(method: str, d: np.ndarray, gamma: Optional[np.ndarray] = None,
            multipliers: Optional[np.ndarray] = None, **params) -> np.ndarray:
    """Per-neighbour weights (nq, k) of `method` for distances `d`; NaN distances (missing) weigh 0."""
    m = get_method(method)
    d = np.asarray(d, dtype=np.float64)
    assert d.ndim == 2, f"d must be (nq, k), got {d.shape}"
    p = {**DEFAULT_PARAMS, **{k: v for k, v in params.items() if v is not None}}
    w = m.weight(np.nan_to_num(d, nan=0.0), np.arange(d.shape[1], dtype=np.float64), **p)
    if m.soft and gamma is not None:
        w = w * np.asarray(gamma, dtype=np.float64)
    if multipliers is not None:
        mult = np.asarray(multipliers, dtype=np.float64)
        assert (mult >= 0).all(), "vote multipliers must be >= 0"
        w = w * mult
    return np.where(np.isnan(d), 0.0, w)


def vote(method: str, d: np.ndarray, labels: np.ndarray, gamma: Optional[np.ndarray] = None,
         multipliers: Optional[np.ndarray] = None, **params) -> Votes:
    """Weights, per-class totals and the winning label of `method` for (nq, k) distances and labels.

    `labels` < 0 marks a missing neighbour (it gets weight 0 and never wins). `gamma` (soft methods only)
    and `multipliers` (interventions) are (nq, k) factors aligned with `d`.
    """
    labels = np.asarray(labels, dtype=np.int64)
    d = np.asarray(d, dtype=np.float64)
    assert labels.shape == d.shape, f"labels {labels.shape} and distances {d.shape} differ"
    missing = labels < 0
    d = np.where(missing, np.nan, d)
    w = weights(method, d, gamma, multipliers, **params)
    nq, k = labels.shape
    classes, inv = np.unique(np.where(missing, labels.max(initial=0) + 1, labels), return_inverse=True)
    inv = inv.reshape(nq, k)
    if missing.any():  # the sentinel class of missing neighbours is the last one: drop it
        classes = classes[:-1]
    C = len(classes)
    running = np.zeros((nq, C + 1))
    best = np.full(nq, -1, dtype=np.int64)
    best_total = np.full(nq, -np.inf)
    rows = np.arange(nq)
    # Scan ranks in order (vectorised over queries) so ties go to the class that reached the max first.
    for i in range(k):
        c = inv[:, i]
        running[rows, c] += w[:, i]
        upd = (running[rows, c] > best_total) & ~missing[:, i]
        best = np.where(upd, c, best)
        best_total = np.where(upd, running[rows, c], best_total)
    label = np.where(best >= 0, classes[np.clip(best, 0, C - 1)], -1) if C else np.full(nq, -1)
    present = np.zeros((nq, C + 1), dtype=bool)
    present[np.repeat(rows, k), inv.reshape(-1)] = True
    return Votes(label=label.astype(np.int64), weights=w, classes=classes, totals=running[:, :C],
                 present=present[:, :C])

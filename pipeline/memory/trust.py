"""Trust signals on predictions: confidence, OOD score, the calibration stored with a memory version, abstaining.

On disk: `<memory>/calibration/vNNNNNN.json` (written atomically by `vmem eval`), one file per memory version:
`{"version": N, "k": 10, "ood_neighbors": 100, "ood_threshold": 0.31, "methods": {"rank": {"kind": "platt",
"a": 1.3, "b": 0.2, "n_fit": 1000, "ece_before": 0.05, "ece_after": 0.01}, ...}}`: per vote method, a map from
the winner's vote share to P(correct) fitted on a validation split at k neighbours (`platt`: a, b of
`confidence.fit_platt` on the share's log-odds; `isotonic`: knots x, y of `confidence.fit_isotonic`);
`ood_threshold` is the 95th percentile of the OOD score of in-distribution validation queries. A memory
without that file still gets confidence, margin, entropy and the OOD score; `probability` stays None.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from pipeline import storage
from pipeline.index.manifest import version_name
from pipeline.memory import confidence as C

_CACHE: Dict[str, Tuple[float, Optional["Calibration"]]] = {}
CACHE_S = 10.0  # a calibration written by `vmem eval` reaches a running memory within this many seconds


@dataclass
class Calibration:
    version: int
    k: int
    ood_neighbors: int
    ood_threshold: Optional[float] = None
    methods: Dict[str, dict] = field(default_factory=dict)  # method -> {kind, a, b | x, y, n_fit, ece_*}

    def probability(self, method: str, k: int, share: np.ndarray) -> Optional[np.ndarray]:
        """Calibrated P(correct) of vote shares under `method` at `k`; None when not fitted for them."""
        m = self.methods.get(method)
        if m is None or k != self.k:
            return None
        return apply_map(m, share, k)

    def to_dict(self) -> dict:
        return {"version": self.version, "k": self.k, "ood_neighbors": self.ood_neighbors,
                "ood_threshold": self.ood_threshold, "methods": self.methods}


def fit_map(kind: str, share: np.ndarray, correct: np.ndarray, k: int) -> dict:
    """A calibration map of `kind` ('platt' or 'isotonic') from vote shares to P(correct)."""
    if kind == "platt":
        a, b = C.fit_platt(C.share_logit(share, k), correct)
        return {"kind": kind, "a": a, "b": b}
    if kind == "isotonic":
        x, y = C.fit_isotonic(share, correct)
        return {"kind": kind, "x": x.tolist(), "y": y.tolist()}
    raise ValueError(f"unknown calibration kind {kind!r}: platt or isotonic")


def apply_map(m: dict, share: np.ndarray, k: int) -> np.ndarray:
    if m.get("kind", "isotonic") == "platt":
        return C.apply_platt(C.share_logit(share, k), m["a"], m["b"])
    return C.apply_isotonic(share, np.asarray(m["x"]), np.asarray(m["y"]))


def calibration_url(memory_dir: str, version: int) -> str:
    return storage.join(memory_dir, "calibration", f"{version_name(version)}.json")


def save_calibration(memory_dir: str, cal: Calibration) -> str:
    url = calibration_url(memory_dir, cal.version)
    storage.atomic_write_json(url, cal.to_dict())
    _CACHE.pop(url, None)
    return url


def load_calibration(memory_dir: str, version: int) -> Optional[Calibration]:
    """The calibration of memory `version` (None if none was fitted); re-read at most every CACHE_S seconds."""
    url = calibration_url(memory_dir, version)
    hit = _CACHE.get(url)
    if hit is not None and time.monotonic() - hit[0] < CACHE_S:
        return hit[1]
    if not storage.exists(url):
        # Compactions and edits change a memory's version, not how its vote shares relate to accuracy: the
        # newest fit of an earlier version stands until `vmem eval` fits this one.
        older = sorted(int(n[1:7]) for n in storage.listdir(storage.join(memory_dir, "calibration"))
                       if n.startswith("v") and n.endswith(".json") and n[1:7].isdigit() and int(n[1:7]) < version)
        url = calibration_url(memory_dir, older[-1]) if older else url
    cal = Calibration(**storage.read_json(url)) if storage.exists(url) else None
    _CACHE[calibration_url(memory_dir, version)] = (time.monotonic(), cal)
    return cal


@dataclass(frozen=True)
class AbstainPolicy:
    """Answer "unknown" below `min_confidence` (calibrated probability when known, else vote share) or above
    `max_ood` (OOD score). None disables a test."""
    min_confidence: Optional[float] = None
    max_ood: Optional[float] = None

    def reason(self, confidence: float, probability: Optional[float], ood_score: float) -> Optional[str]:
        conf, what = (probability, "calibrated probability") if probability is not None else (confidence,
                                                                                            "vote share")
        if self.min_confidence is not None and conf < self.min_confidence:
            return f"{what} {conf:.3f} < memory.abstain.min_confidence {self.min_confidence}"
        if self.max_ood is not None and ood_score > self.max_ood:
            return f"OOD score {ood_score:.3f} > memory.abstain.max_ood {self.max_ood}"
        return None


def policy_of(cfg) -> AbstainPolicy:
    a = cfg.memory.abstain
    return AbstainPolicy(a.min_confidence, a.max_ood)


def annotate(preds: List, v, nb, memory_dir: str, version: int, cfg) -> List:
    """Fill the trust fields of `preds` (one per row of `nb`) from their vote `v`, in place; returns `preds`."""
    conf = C.of_votes(v)
    n_ood = cfg.memory.ood_neighbors
    ood = C.ood_score(nb.distances, n_ood)
    k = int((nb.I >= 0).sum(axis=1).max(initial=0))
    cal = load_calibration(memory_dir, version)
    prob = cal.probability(preds[0].method, k, conf["share"]) if cal is not None and preds else None
    policy = policy_of(cfg)
    threshold = policy.max_ood if policy.max_ood is not None else (
        cal.ood_threshold if cal is not None and cal.k == k else None)
    for q, p in enumerate(preds):
        p.confidence, p.margin, p.entropy = (float(conf[n][q]) for n in ("share", "margin", "entropy"))
        p.ood_score = float(ood[q])
        p.probability = None if prob is None else float(prob[q])
        p.ood = None if threshold is None else bool(ood[q] > threshold)
        if nb.rank_before is not None:
            p.reranker = cfg.memory.reranker or "custom"
            for n, r in zip(p.neighbors, nb.rank_before[q][nb.I[q] >= 0]):
                n.rank_before = int(r)
        why = policy.reason(p.confidence, p.probability, p.ood_score)
        if why is not None:
            p.voted_label, p.label, p.label_name = p.label, -1, "unknown"
            p.abstained, p.abstain_reason = True, why
    return preds

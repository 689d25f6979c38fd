"""Overlays over the memory's items, read from the state tables: interventions (vote multipliers and
relabels) and soft-pruning gamma.

- `overlays.lance` rows (kind, target, weight, label, label_name, at): kinds `item_weight`, `item_label`,
  `label_weight`, `source_weight` and `clear`. The latest row per (kind, target) wins; a `clear` row drops
  everything before it. Rows of deleted items are removed by erasure.
- `gamma.lance` (id, v, gamma): the last soft pruning, used by the soft_* vote methods.
Both are keyed by external id / label / source, which survive compaction, so compaction never rewrites them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
import pyarrow as pa

from pipeline.memory.state import GAMMA, OVERLAYS, MemoryState, latest_per_target


@dataclass
class GammaOverlay:
    version: int
    ids: np.ndarray  # sorted
    gamma: np.ndarray

    def lookup(self, I: np.ndarray) -> np.ndarray:
        """gamma for each id in I (1.0 for ids the overlay does not know, e.g. added after pruning)."""
        if len(self.ids) == 0:
            return np.ones(I.shape)
        pos = np.clip(np.searchsorted(self.ids, I), 0, len(self.ids) - 1)
        return np.where(self.ids[pos] == I, self.gamma[pos], 1.0)


def load_gamma(state: MemoryState) -> Optional[GammaOverlay]:
    v = state[GAMMA].version()
    if not v:
        return None
    t = state[GAMMA].read()
    ids = t.column("id").to_numpy()
    order = np.argsort(ids)
    return GammaOverlay(v, ids[order], t.column("gamma").to_numpy()[order])


def save_gamma(state: MemoryState, ids: np.ndarray, v: np.ndarray, gamma: np.ndarray) -> int:
    return state[GAMMA].overwrite(pa.table({"id": pa.array(ids, pa.int64()), "v": pa.array(v, pa.int64()),
                                            "gamma": pa.array(gamma, pa.float64())}))


@dataclass
class Interventions:
    version: int = 0
    items: Dict[int, Dict[str, Any]] = field(default_factory=dict)  # id -> {weight?, label?, label_name?}
    labels: Dict[int, float] = field(default_factory=dict)
    sources: Dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.items or self.labels or self.sources)

    def relabel(self, I: np.ndarray, labels: np.ndarray, label_names: np.ndarray):
        """(labels, label_names) with per-item label overrides applied."""
        labels, label_names = labels.copy(), label_names.copy()
        if not any("label" in it for it in self.items.values()):
            return labels, label_names
        for (q, j), i in np.ndenumerate(I):
            it = self.items.get(int(i))
            if it and "label" in it:
                labels[q, j] = int(it["label"])
                label_names[q, j] = it.get("label_name") or str(it["label"])
        return labels, label_names

    def multipliers(self, I: np.ndarray, labels: np.ndarray, sources: np.ndarray) -> np.ndarray:
        """(nq, k) vote multipliers of the item, label and source weights for neighbours whose `labels` are
        the current ones (relabels already applied: a label weight follows what the vote counts)."""
        mult = np.ones(I.shape)
        if not self:
            return mult
        for (q, j), i in np.ndenumerate(I):
            it = self.items.get(int(i))
            if it:
                mult[q, j] *= float(it.get("weight", 1.0))
        for lab, w in self.labels.items():
            mult[labels == lab] *= w
        for src, w in self.sources.items():
            mult[sources == src] *= w
        return mult


def load_interventions(state: MemoryState) -> Interventions:
    v = state[OVERLAYS].version()
    iv = Interventions(version=v)
    if not v:
        return iv
    for r in latest_per_target(state[OVERLAYS].read()):
        kind, target = r["kind"], r["target"]
        if kind == "item_weight":
            iv.items.setdefault(int(target), {})["weight"] = float(r["weight"])
        elif kind == "item_label":
            iv.items.setdefault(int(target), {}).update(label=int(r["label"]), label_name=r["label_name"])
        elif kind == "label_weight":
            iv.labels[int(target)] = float(r["weight"])
        elif kind == "source_weight":
            iv.sources[str(target)] = float(r["weight"])
    iv.items = {i: {k: v for k, v in it.items() if not (k == "weight" and v == 1.0)} for i, it in iv.items.items()}
    iv.items = {i: it for i, it in iv.items.items() if it}
    iv.labels = {k: w for k, w in iv.labels.items() if w != 1.0}
    iv.sources = {k: w for k, w in iv.sources.items() if w != 1.0}
    return iv

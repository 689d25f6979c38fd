"""Versioned overlays over the memory's items: soft-pruning gamma and interventions.

An overlay is a sequence of immutable files `memory/overlays/<name>/v000001.<ext>` plus a `CURRENT` pointer
replaced atomically (the commit point), like manifests. Overlays are keyed by external id / label / source,
which survive compaction, so compaction never rewrites them.

- `gamma`: Parquet (id, v, gamma) from soft pruning, used by the soft_* vote methods.
- `interventions`: JSON {"items": {id: {"weight", "label", "label_name"}}, "labels": {label: weight},
  "sources": {source: weight}}: weight multipliers in every vote method and per-item label overrides.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import UserError
from pipeline.index.manifest import version_name


class OverlayStore:
    """Versions of one named overlay under `memory_dir/overlays/<name>`."""

    def __init__(self, memory_dir: str, name: str, ext: str):
        self.dir = storage.join(memory_dir, "overlays", name)
        self.ext = ext

    def version(self) -> int:
        url = storage.join(self.dir, "CURRENT")
        return int(storage.read_json(url)["version"]) if storage.exists(url) else 0

    def url(self, version: int) -> str:
        return storage.join(self.dir, f"{version_name(version)}.{self.ext}")

    def commit(self, data: bytes) -> int:
        """Write the next version and point CURRENT at it; returns the new version."""
        v = self.version() + 1
        storage.atomic_write_bytes(self.url(v), data)
        storage.atomic_write_json(storage.join(self.dir, "CURRENT"), {"version": v})
        return v

    def read(self, version: Optional[int] = None) -> Optional[bytes]:
        v = self.version() if version is None else version
        return storage.read_bytes(self.url(v)) if v else None


# ---------- soft pruning gamma ----------
def gamma_store(memory_dir: str) -> OverlayStore:
    return OverlayStore(memory_dir, "gamma", "parquet")


def save_gamma(memory_dir: str, ids: np.ndarray, v: np.ndarray, gamma: np.ndarray) -> int:
    table = pa.table({"id": pa.array(ids, pa.int64()), "v": pa.array(v, pa.int64()),
                      "gamma": pa.array(gamma, pa.float64())})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return gamma_store(memory_dir).commit(buf.getvalue())


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


def load_gamma(memory_dir: str) -> Optional[GammaOverlay]:
    store = gamma_store(memory_dir)
    v = store.version()
    if not v:
        return None
    t = pq.read_table(io.BytesIO(store.read(v)))
    ids = t.column("id").to_numpy()
    order = np.argsort(ids)
    return GammaOverlay(v, ids[order], t.column("gamma").to_numpy()[order])


# ---------- interventions ----------
def interventions_store(memory_dir: str) -> OverlayStore:
    return OverlayStore(memory_dir, "interventions", "json")


@dataclass
class Interventions:
    version: int = 0
    items: Dict[int, Dict[str, Any]] = field(default_factory=dict)  # id -> {weight?, label?, label_name?}
    labels: Dict[int, float] = field(default_factory=dict)
    sources: Dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"items": {str(k): v for k, v in self.items.items()},
                "labels": {str(k): v for k, v in self.labels.items()}, "sources": dict(self.sources)}

    @classmethod
    def from_json(cls, version: int, d: dict) -> "Interventions":
        return cls(version, {int(k): v for k, v in d.get("items", {}).items()},
                   {int(k): float(v) for k, v in d.get("labels", {}).items()},
                   {str(k): float(v) for k, v in d.get("sources", {}).items()})

    def __bool__(self) -> bool:
        return bool(self.items or self.labels or self.sources)

    def apply(self, I: np.ndarray, labels: np.ndarray, label_names: np.ndarray, sources: np.ndarray):
        """(multipliers, labels, label_names) after interventions for (nq, k) neighbour arrays.

        Label overrides apply first; label weights then use the overridden label (what the vote counts).
        """
        mult = np.ones(I.shape)
        labels = labels.copy()
        label_names = label_names.copy()
        if not self:
            return mult, labels, label_names
        for (q, j), i in np.ndenumerate(I):
            it = self.items.get(int(i))
            if it:
                if "label" in it:
                    labels[q, j] = int(it["label"])
                    label_names[q, j] = it.get("label_name", str(it["label"]))
                mult[q, j] *= float(it.get("weight", 1.0))
        for lab, w in self.labels.items():
            mult[labels == lab] *= w
        for src, w in self.sources.items():
            mult[sources == src] *= w
        return mult, labels, label_names


def load_interventions(memory_dir: str) -> Interventions:
    store = interventions_store(memory_dir)
    v = store.version()
    if not v:
        return Interventions()
    return Interventions.from_json(v, json.loads(store.read(v)))


def save_interventions(memory_dir: str, iv: Interventions) -> int:
    for w in [*(it.get("weight", 1.0) for it in iv.items.values()), *iv.labels.values(), *iv.sources.values()]:
        if not (float(w) >= 0):
            raise UserError(f"intervention weights must be >= 0, got {w}")
    return interventions_store(memory_dir).commit(json.dumps(iv.to_json(), indent=1, sort_keys=True).encode())

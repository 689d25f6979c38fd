"""What classify/search/explain return: plain dataclasses that serialise to JSON as they are."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np


@dataclass
class Neighbor:
    id: int
    label: int  # the label the vote counted (after any intervention override)
    label_name: str
    distance: float  # cosine distance 1 - similarity
    weight: float  # this neighbour's vote weight under the method used
    key: str
    source: str
    multiplier: float = 1.0  # intervention factor included in `weight`
    gamma: float = 1.0  # soft-pruning factor included in `weight` (soft_* methods)
    original_label: Optional[int] = None  # set when an intervention overrode the stored label

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prediction:
    label: int
    label_name: str
    scores: Dict[str, float]  # per-class vote totals, best first
    neighbors: List[Neighbor] = field(default_factory=list)
    method: str = "plurality"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Neighbors:
    """(nq, k) arrays of a search over the whole memory (shards + delta, tombstones excluded)."""
    D: np.ndarray  # similarities (inner product), -inf where missing
    I: np.ndarray  # external ids, -1 where missing
    labels: np.ndarray
    label_names: np.ndarray
    keys: np.ndarray
    sources: np.ndarray
    stored_labels: Optional[np.ndarray] = None  # labels the shards hold, before relabel overlays

    def meta_columns(self) -> tuple:
        return self.labels, self.label_names, self.keys, self.sources

    @property
    def distances(self) -> np.ndarray:
        return np.where(self.I < 0, np.nan, 1.0 - self.D)

    def take(self, k: int) -> "Neighbors":
        return Neighbors(*(a[:, :k] for a in (self.D, self.I, self.labels, self.label_names, self.keys,
                                              self.sources)),
                         stored_labels=None if self.stored_labels is None else self.stored_labels[:, :k])

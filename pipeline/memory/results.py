"""What classify/explain return: plain dataclasses that serialise to JSON as they are. (Searches return
`pipeline.index.neighbors.Neighbors`.)"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional


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
    rank_before: Optional[int] = None  # 0-based rank in the search order, set when a reranker reordered them

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prediction:
    label: int
    label_name: str
    scores: Dict[str, float]  # per-class vote totals, best first
    neighbors: List[Neighbor] = field(default_factory=list)
    method: str = "plurality"
    # Trust signals (pipeline.memory.confidence / trust): how unanimous the vote was and how far the query is.
    confidence: float = 0.0  # the winner's share of the vote weight
    margin: float = 0.0  # winner's share minus the runner-up's
    entropy: float = 0.0  # entropy (nats) of the per-class vote shares
    ood_score: float = float("nan")  # mean cosine distance to the first memory.ood_neighbors neighbours
    probability: Optional[float] = None  # calibrated P(label is right); None without a calibration for method@k
    ood: Optional[bool] = None  # ood_score above the threshold (calibration's or memory.abstain.max_ood)
    abstained: bool = False  # the abstain policy answered "unknown": label -1, label_name "unknown"
    abstain_reason: Optional[str] = None
    voted_label: Optional[int] = None  # what the vote said, when the policy abstained
    reranker: Optional[str] = None  # the reranker that reordered the neighbours (Neighbor.rank_before)

    def to_dict(self) -> dict:
        return asdict(self)

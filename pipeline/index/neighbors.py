"""`Neighbors`: the one type a search result travels in, from a shard searcher to the HTTP response.

Every layer that searches returns it: `ShardSearcher.search` (one shard), `Router.search` (the shards of one
manifest, merged), the memory's delta, and `Snapshot.search` (shards + delta, deletions excluded, relabels
applied). Rerankers take one and return one. Metadata is gathered once, by the shard (or the delta) that
holds each hit, and travels beside the ids as (nq, k) arrays, so nothing looks an id up twice.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import List, Optional, Sequence

import faiss
import numpy as np

from pipeline.data.items import HIT_FIELDS

# (field, fill for a missing neighbour, dtype): the per-neighbour metadata every search returns.
META = tuple((f.hit_name, f.fill, f.dtype) for f in HIT_FIELDS)
_FILL = {"D": -np.inf, "I": -1, "labels": -1, "stored_labels": -1, "weights": 1.0, "rank_before": -1}


@dataclass
class Neighbors:
    """(nq, k) arrays of the k nearest items of each query, best first; -1 ids (and fills) pad short rows."""
    D: np.ndarray  # scores: inner-product similarity (cosine on unit vectors); -inf where missing
    I: np.ndarray  # external int64 ids, -1 where missing
    labels: np.ndarray  # the labels the vote counts (relabels applied once the snapshot has searched)
    label_names: np.ndarray
    keys: np.ndarray
    sources: np.ndarray
    stored_labels: Optional[np.ndarray] = None  # labels the shards hold, before relabel overlays
    weights: Optional[np.ndarray] = None  # a reranker's per-neighbour vote factors (None = all 1)
    rank_before: Optional[np.ndarray] = None  # a reranker's record of each neighbour's search rank

    @classmethod
    def empty(cls, nq: int, k: int) -> "Neighbors":
        return cls(np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64),
                   *(np.full((nq, k), fill, dtype) for _, fill, dtype in META))

    @property
    def shape(self) -> tuple:
        return self.I.shape

    @property
    def distances(self) -> np.ndarray:
        """Cosine distances 1 - similarity (NaN where missing): what the vote methods weigh."""
        return np.where(self.I < 0, np.nan, 1.0 - self.D)

    def columns(self) -> dict:
        """Every non-None (nq, k) array by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def take(self, cols: np.ndarray) -> "Neighbors":
        """Each row's columns reordered/selected by `cols` (nq, m) positions."""
        return Neighbors(**{n: np.take_along_axis(a, cols, axis=1) for n, a in self.columns().items()})

    def first(self, k: int) -> "Neighbors":
        return Neighbors(**{n: a[:, :k] for n, a in self.columns().items()})

    def rows(self, start: int, stop: int) -> "Neighbors":
        return Neighbors(**{n: a[start:stop] for n, a in self.columns().items()})

    def with_(self, **changes) -> "Neighbors":
        return replace(self, **changes)


def merge(parts: Sequence[Neighbors], k: int, keep_max: bool = True, dedupe: bool = False) -> Neighbors:
    """Exact top-k of several searches of the same queries, best first; ties keep the order of `parts`.

    `dedupe` keeps each id once (its best-ranked hit): needed when parts may overlap (an item folded into the
    shards by a compaction this reader has not followed yet is in both the shards and the delta); the shards of
    one manifest hold disjoint ids and need not pay for it."""
    parts = [p for p in parts if p is not None]
    assert parts, "merge needs at least one part"
    if len(parts) == 1 and parts[0].I.shape[1] >= k and not dedupe:
        return parts[0].first(k)
    names = [n for n in parts[0].columns() if all(getattr(p, n) is not None for p in parts)]
    cat = {n: np.concatenate([getattr(p, n) for p in parts], axis=1) for n in names}
    I = cat["I"]
    score = np.where(I < 0, -np.inf, cat["D"] if keep_max else -cat["D"])
    order = np.argsort(-score, axis=1, kind="stable")
    ranked = np.take_along_axis(I, order, axis=1)
    valid = ranked >= 0
    if dedupe:
        by_id = np.argsort(ranked, axis=1, kind="stable")  # each id's hits grouped, best rank first
        ids = np.take_along_axis(ranked, by_id, axis=1)
        repeat = np.zeros(ids.shape, bool)
        repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
        dup = np.zeros(ids.shape, bool)
        np.put_along_axis(dup, by_id, repeat, axis=1)
        valid &= ~dup
    width = max(int(k), 1)
    if order.shape[1] < width:  # fewer candidates than k: pad with always-invalid columns
        extra = width - order.shape[1]
        cat = {n: np.concatenate([a, np.full((len(I), extra), _FILL.get(n, ""), a.dtype)], axis=1)
               for n, a in cat.items()}
        order = np.concatenate([order, np.arange(order.shape[1], width)[None].repeat(len(I), 0)], axis=1)
        valid = np.concatenate([valid, np.zeros((len(I), extra), bool)], axis=1)
    front = np.argsort(~valid, axis=1, kind="stable")[:, :width]  # valid hits first, rank order kept
    pos = np.take_along_axis(order, front, axis=1)
    ok = np.take_along_axis(valid, front, axis=1)
    out = {n: np.take_along_axis(a, pos, axis=1) for n, a in cat.items()}
    out["I"] = np.where(ok, out["I"], -1)
    out["D"] = np.where(ok, out["D"], -np.inf if keep_max else np.inf).astype(np.float32)
    for name, fill, dtype in META:
        if name in out:
            out[name] = np.where(ok, out[name], fill).astype(dtype)
    return Neighbors(**out)


def merge_topk(Ds: Sequence[np.ndarray], Is: Sequence[np.ndarray], k: int, keep_max: bool = True):
    """Exact global top-k of (D, I) pairs without metadata (recall and eval jobs); each (nq, k), best first.

    Each part's rows are sorted best first, as faiss search returns them; -1 ids pad."""
    assert len(Ds) == len(Is) and len(Ds) > 0, "need one (D, I) pair per part"
    width = max(int(k), max(d.shape[1] for d in Ds))
    pad = -np.inf if keep_max else np.inf

    def widen(a, fill, dtype):
        a = np.asarray(a, dtype=dtype)
        if a.shape[1] == width:
            return a
        out = np.full((a.shape[0], width), fill, dtype=dtype)
        out[:, : a.shape[1]] = a
        return out

    Dall = np.stack([widen(d, pad, np.float32) for d in Ds])
    Iall = np.stack([widen(i, -1, np.int64) for i in Is])
    D, I = faiss.merge_knn_results(Dall, Iall, keep_max=keep_max)
    return D[:, :k], I[:, :k]


def concat_rows(parts: List[Neighbors]) -> Neighbors:
    """Stack the query rows of several results of equal width (batches searched separately)."""
    names = parts[0].columns().keys()
    return Neighbors(**{n: np.concatenate([getattr(p, n) for p in parts], axis=0) for n in names})

"""The delta: items added since the last compaction, durable in an append-only log and searched exactly.

Each added item is one log record (id, metadata, base64 float32 vector); `DeltaIndex` replays the log into
an in-memory `IndexIDMap2(IndexFlatIP)` so a search over the delta is exact and returns external ids. The
router's results and the delta's are merged by similarity, so an add is visible to the very next query.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import faiss
import numpy as np

from pipeline.memory.logs import AppendLog, decode_vector, encode_vector

META_FIELDS = ("label", "label_name", "key", "source", "shard")


def id_selector(ids: np.ndarray) -> Optional[faiss.IDSelector]:
    """A faiss selector that keeps every id except `ids` (None when there is nothing to exclude)."""
    if ids is None or len(ids) == 0:
        return None
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    batch = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
    sel = faiss.IDSelectorNot(batch)
    sel._keep = (ids, batch)  # the selectors point into these: keep them alive as long as `sel`
    return sel


class DeltaIndex:
    """Exact in-memory index over the delta log's vectors, with their metadata by id."""

    def __init__(self, log_url: str, dim: int):
        self.log = AppendLog(log_url)
        self.dim = dim
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.meta: Dict[int, dict] = {}
        self.position = 0
        self.catch_up()

    def __len__(self) -> int:
        return len(self.meta)

    def catch_up(self) -> int:
        """Replay records appended (by anyone) since the last read; returns how many were new."""
        records, self.position = self.log.read(self.position)
        if records:
            self._apply(records)
        return len(records)

    def _apply(self, records: List[dict]) -> None:
        records = [r for r in records if int(r["id"]) not in self.meta]
        if not records:
            return
        xb = np.stack([decode_vector(r["vec"]) for r in records]).astype(np.float32)
        ids = np.array([int(r["id"]) for r in records], dtype=np.int64)
        self.index.add_with_ids(xb, ids)
        for r in records:
            self.meta[int(r["id"])] = {f: r.get(f) for f in META_FIELDS}

    def add(self, xb: np.ndarray, ids: Sequence[int], metas: Sequence[dict]) -> None:
        """Append the items durably to the log, then make them searchable (in that order)."""
        records = [{"id": int(i), "vec": encode_vector(x), **{f: m.get(f) for f in META_FIELDS}}
                   for i, x, m in zip(ids, xb, metas)]
        self.log.append(records)
        self.catch_up()

    def vectors(self) -> tuple:
        """(ids, xb) of every delta item, in insertion order."""
        n = self.index.ntotal
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        xb = self.index.index.reconstruct_n(0, n) if n else np.zeros((0, self.dim), np.float32)
        return ids, xb

    def search(self, xq: np.ndarray, k: int, exclude: Optional[np.ndarray] = None):
        """Exact top-k (D similarities, I ids; -1 padding) over live delta items."""
        nq = xq.shape[0]
        if self.index.ntotal == 0:
            return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        sel = id_selector(exclude)
        params = faiss.SearchParameters(sel=sel) if sel is not None else None
        D, I = self.index.search(xq, k, params=params)
        D = np.where(I < 0, -np.inf, D).astype(np.float32)
        return D, I

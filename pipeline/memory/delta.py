"""The delta: items added since the faiss shards were built, read from the state's item table and searched
exactly in RAM.

An item is in the delta while its `indexed` version is not in the current manifest's lineage (0 for a fresh
add; an older compaction's number after a rebuild). The table is read incrementally: Lance fragments are
immutable, so on a new table version only fragments this process has not seen are read; when a seen fragment
disappears (Lance compaction, or an update that rewrote rows) or the manifest changes, the delta is read
again from scratch.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import faiss
import numpy as np

from pipeline.memory.state import ITEMS, META_FIELDS, MemoryState, vectors_of


def id_selector(ids: np.ndarray) -> Optional[faiss.IDSelector]:
    """A faiss selector that keeps every id except `ids` (None when there is nothing to exclude)."""
    if ids is None or len(ids) == 0:
        return None
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    batch = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
    sel = faiss.IDSelectorNot(batch)
    sel._keep = (ids, batch)  # the selectors point into these: keep them alive as long as `sel`
    return sel


def delta_filter(lineage: Sequence[int]) -> str:
    """Rows whose vectors only the item table holds and that no shard of this lineage holds."""
    folded = f" AND indexed NOT IN ({','.join(str(int(v)) for v in lineage)})" if lineage else ""
    return "vector IS NOT NULL" + folded


class DeltaIndex:
    """Exact in-memory index over the delta rows of the item table, with their metadata by id."""

    def __init__(self, state: MemoryState, dim: int, lineage: Sequence[int]):
        self.state, self.dim, self.lineage = state, dim, list(lineage)
        self.table_version = -1
        self._fragments: set = set()
        self._reset_index()
        self.catch_up()

    def _reset_index(self) -> None:
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self.meta: Dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.meta)

    def catch_up(self) -> int:
        """Read rows committed (by any process) since the last call; returns how many were new."""
        v = self.state[ITEMS].version()
        if v == self.table_version:
            return 0
        t, reset = self.state[ITEMS].new_rows(self._fragments, ["id", *META_FIELDS, "vector"],
                                               delta_filter(self.lineage))
        if reset:
            self._reset_index()
        self.table_version = v
        return self._apply(t) if t.num_rows else 0

    def _apply(self, t) -> int:
        ids = t.column("id").to_numpy().astype(np.int64)
        keep = np.array([int(i) not in self.meta for i in ids], bool)
        if not keep.any():
            return 0
        t = t.filter(keep)
        ids = ids[keep]
        _, first = np.unique(ids, return_index=True)  # one row per id (a key added twice at once)
        t, ids = t.take(np.sort(first)), ids[np.sort(first)]
        self.index.add_with_ids(vectors_of(t, self.dim), ids)
        self.meta.update({int(i): row for i, row in zip(ids, t.select(list(META_FIELDS)).to_pylist())})
        return len(ids)

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
        return np.where(I < 0, -np.inf, D).astype(np.float32), I

    def rows(self, ids: List[int]) -> List[dict]:
        return [self.meta.get(int(i), {}) for i in ids]

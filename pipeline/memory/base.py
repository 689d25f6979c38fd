"""The committed faiss part of a memory: one manifest version and the router over its shards.

The memory layer sees the index layer only through this module. Per-item metadata is not loaded here: the
shard searchers return it with each hit, and look-ups by id go to the state's item table, so a process that
opens a memory holds memory proportional to its shards, not to its items.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np

from pipeline import storage
from pipeline.index.manifest import Manifest, ManifestStore
from pipeline.memory.results import Neighbors


def blob_url(memory_dir: str, item_id: int) -> str:
    """Where the image of an item added through the API is stored (erased with the item by compaction)."""
    return storage.join(memory_dir, "blobs", f"{int(item_id)}.png")


def merge_neighbors(a: Neighbors, b: Neighbors, k: int) -> Neighbors:
    """Exact top-k of two searches, each id once (an item folded by a compaction that this reader has not
    followed yet can come from both); on equal similarity `a` ranks first."""
    D = np.concatenate([a.D, b.D], axis=1)
    I = np.concatenate([a.I, b.I], axis=1)
    cols = [np.concatenate([x, y], axis=1) for x, y in zip(a.meta_columns(), b.meta_columns())]
    order = np.argsort(-np.where(I < 0, -np.inf, D), axis=1, kind="stable")
    nq = I.shape[0]
    out_idx = np.zeros((nq, k), np.int64)
    valid = np.zeros((nq, k), bool)
    for q in range(nq):
        seen, j = set(), 0
        for p in order[q]:
            i = int(I[q, p])
            if i < 0 or i in seen:
                continue
            seen.add(i)
            out_idx[q, j], valid[q, j] = p, True
            j += 1
            if j == k:
                break
    rows = np.arange(nq)[:, None]
    D2 = np.where(valid, D[rows, out_idx], -np.inf).astype(np.float32)
    I2 = np.where(valid, I[rows, out_idx], -1)
    fills = (-1, "", "", "")
    meta = [np.where(valid, c[rows, out_idx], f) for c, f in zip(cols, fills)]
    return Neighbors(D2, I2, meta[0].astype(np.int64), *(m.astype(object) for m in meta[1:]))


class BaseState:
    """One manifest version: search over its shards through a router (in-process, Ray actors, or Serve)."""

    def __init__(self, memory_dir: str, version: Optional[int] = None, use_ray: bool = False,
                 router_factory: Optional[Callable[[Manifest], object]] = None):
        self.store = ManifestStore(memory_dir)
        self.manifest = self.store.load(version)
        self.memory_dir = memory_dir
        m = self.manifest
        self.version, self.dim, self.index_key = m.version, m.dim, m.index_key
        self.num_shards = m.num_shards
        self.count = m.count
        self.encoder = m.encoder.get("name")
        self.image_size = m.encoder.get("image_size")
        self.lineage: List[int] = list(m.build.get("lineage", [m.version]))
        self.label_names = {int(k): v for k, v in m.build.get("label_names", {}).items()}
        self.use_ray = use_ray
        self._router_factory = router_factory
        self._router = None

    @property
    def router(self):
        if self._router is None:
            if self._router_factory is not None:
                self._router = self._router_factory(self.manifest)
            else:
                from pipeline.index.router import Router

                self._router = Router(self.memory_dir, self.version, use_ray=self.use_ray, manifest=self.manifest)
        return self._router

    def close(self) -> None:
        if self._router is not None:
            self._router.close()
            self._router = None

    def label_name(self, label: int) -> str:
        return self.label_names.get(int(label), str(label))

    def search(self, xq: np.ndarray, k: int, nprobe: Optional[int] = None,
               exclude: Optional[np.ndarray] = None, exclude_tag=None) -> Neighbors:
        """Top-k over the shards; `exclude` ids are skipped inside faiss (`exclude_tag` changes when they do)."""
        from pipeline.index.shard import ExcludeSet

        ex = ExcludeSet((self.version, exclude_tag), exclude) if exclude is not None and len(exclude) else None
        r = self.router.search(xq, k, nprobe=nprobe, exclude=ex)
        I = np.asarray(r.I, dtype=np.int64)
        D = np.where(I < 0, -np.inf, np.asarray(r.D, dtype=np.float32))
        return Neighbors(D, I, np.where(I < 0, -1, np.asarray(r.labels, dtype=np.int64)),
                         np.asarray(r.label_names, dtype=object), np.asarray(r.keys, dtype=object),
                         np.asarray(r.sources, dtype=object))

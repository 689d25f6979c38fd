"""The committed part of a memory version: manifest, shard searcher (the index layer's Router), item metadata.

The memory layer sees the index layer only through this module, so the rest of `pipeline.memory` does not
depend on manifest field names or router internals.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.errors import NotFound
from pipeline.index.manifest import Manifest, ManifestStore, version_name
from pipeline.index.shard import META_COLUMNS
from pipeline.index.shard import read_meta as read_shard_meta
from pipeline.memory.results import Neighbors


def blob_url(memory_dir: str, item_id: int) -> str:
    """Where the image of an item added through the API is stored (erased with the item by compaction)."""
    return storage.join(memory_dir, "blobs", f"{int(item_id)}.png")


def default_log_url(store: ManifestStore, manifest: Manifest, name: str) -> str:
    """Where the `name` log of a version lives when its manifest does not say (a freshly built memory)."""
    rel = manifest.logs.get(name) or f"logs/{version_name(manifest.version)}/{name}.jsonl"
    return store.url(rel)


def read_meta(url: str) -> pa.Table:
    t = read_shard_meta(url)
    return t.select([c for c in META_COLUMNS if c in t.column_names])


def merge_neighbors(base: Neighbors, delta: Neighbors, k: int) -> Neighbors:
    """Exact top-k of two searches (the router's merge over shards); on equal similarity `base` ranks first."""
    from pipeline.index.router import gather_meta, merge_topk

    parts = [{"I": nb.I, "labels": nb.labels, "label_names": nb.label_names, "keys": nb.keys,
              "sources": nb.sources} for nb in (delta, base)]  # faiss breaks ties toward the later list
    D, I = merge_topk([delta.D, base.D], [delta.I, base.I], k)
    meta = gather_meta(I, parts)
    return Neighbors(np.where(I < 0, -np.inf, D), I, meta["labels"], meta["label_names"], meta["keys"],
                     meta["sources"])


class BaseState:
    """One manifest version: search over its shards and look-ups in its metadata (loaded once)."""

    def __init__(self, memory_dir: str, version: Optional[int] = None, use_ray: bool = False):
        self.store = ManifestStore(memory_dir)
        self.manifest = self.store.load(version)
        self.memory_dir = memory_dir
        m = self.manifest
        self.version, self.dim, self.index_key = m.version, m.dim, m.index_key
        self.num_shards = m.num_shards
        self.encoder = m.encoder.get("name")
        self.image_size = m.encoder.get("image_size")
        tables, shard_no = [], []
        for s in m.shards:
            t = read_meta(self.store.url(s.meta_path))
            tables.append(t)
            shard_no.append(np.full(t.num_rows, s.shard, dtype=np.int32))
        self.meta = pa.concat_tables(tables) if tables else None
        ids = self.meta.column("id").to_numpy() if self.meta is not None else np.zeros(0, np.int64)
        self._order = np.argsort(ids, kind="stable")
        self.ids_sorted = ids[self._order]
        self.shard_no = np.concatenate(shard_no) if shard_no else np.zeros(0, np.int32)
        self.shard_counts = np.bincount(self.shard_no, minlength=max(self.num_shards, 1))
        self.count = len(ids)
        self.labels = self.meta.column("label").to_numpy() if self.count else np.zeros(0, np.int64)
        self._sources = np.asarray(self.meta.column("source").to_pylist(), dtype=object) if self.count else \
            np.zeros(0, object)
        self._ids = ids
        self._router = None
        self.use_ray = use_ray

    def log_url(self, name: str) -> str:
        return default_log_url(self.store, self.manifest, name)

    def store_current_version(self) -> Optional[int]:
        return self.store.current_version()

    @property
    def router(self):
        if self._router is None:
            from pipeline.index.router import Router

            self._router = Router(self.memory_dir, self.version, use_ray=self.use_ray, manifest=self.manifest)
        return self._router

    def close(self) -> None:
        if self._router is not None:
            self._router.close()
            self._router = None

    # ----- look-ups -----
    def _pos(self, i: int) -> Optional[int]:
        p = int(np.searchsorted(self.ids_sorted, i))
        if p < len(self.ids_sorted) and self.ids_sorted[p] == i:
            return int(self._order[p])
        return None

    def has_id(self, i: int) -> bool:
        return self._pos(int(i)) is not None

    def rows(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(mask of the `ids` this version holds, their row positions in `meta` / `labels`)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.ids_sorted):
            return np.zeros(len(ids), bool), np.zeros(0, np.int64)
        p = np.clip(np.searchsorted(self.ids_sorted, ids), 0, len(self.ids_sorted) - 1)
        found = self.ids_sorted[p] == ids
        return found, self._order[p[found]]

    def has_ids(self, ids: np.ndarray) -> np.ndarray:
        return self.rows(ids)[0]

    def item(self, i: int) -> dict:
        p = self._pos(int(i))
        if p is None:
            raise NotFound(f"no item with id {i} in version {self.version}")
        row = self.meta.slice(p, 1).to_pylist()[0]
        row.pop("id", None)
        row["shard_no"] = int(self.shard_no[p])
        return row

    def select(self, label: Optional[int] = None, source: Optional[str] = None) -> np.ndarray:
        mask = np.ones(self.count, bool)
        if label is not None:
            mask &= self.labels == int(label)
        if source is not None:
            mask &= self._sources == source
        return self._ids[mask]

    @functools.cached_property
    def label_names(self) -> Dict[int, str]:
        if not self.count:
            return {}
        t = self.meta.select(["label", "label_name"]).group_by(["label", "label_name"]).aggregate([])
        return {int(l): str(n) for l, n in zip(t.column("label").to_pylist(), t.column("label_name").to_pylist())}

    def label_name(self, label: int) -> str:
        return self.label_names.get(int(label), str(label))

    def deleted_ratios(self, tomb_ids: np.ndarray) -> List[float]:
        """Fraction of each shard's items that are tombstoned."""
        if not len(tomb_ids) or not self.count:
            return [0.0] * self.num_shards
        _, rows = self.rows(tomb_ids)  # O(T log N): cheap enough to run after every delete
        per = np.bincount(self.shard_no[rows], minlength=len(self.shard_counts))
        return [float(per[s] / max(self.shard_counts[s], 1)) for s in range(len(self.shard_counts))]

    # ----- search -----
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


def open_base(memory_dir: str, version: Optional[int] = None, use_ray: bool = False) -> BaseState:
    return BaseState(memory_dir, version, use_ray)

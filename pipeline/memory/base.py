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
from pipeline.index.neighbors import Neighbors
from pipeline.index.router import Router
from pipeline.index.shard import ExcludeSet


def blob_url(memory_dir: str, item_id: int) -> str:
    """Where the image of an item added through the API is stored (erased with the item by compaction)."""
    return storage.join(memory_dir, "blobs", f"{int(item_id)}.png")


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
                self._router = Router(self.memory_dir, self.version, use_ray=self.use_ray, manifest=self.manifest)
        return self._router

    def close(self) -> None:
        if self._router is not None:
            self._router.close()
            self._router = None

    def label_name(self, label: int) -> str:
        return self.label_names.get(int(label), str(label))

    def search(self, xq: np.ndarray, k: int, nprobe: Optional[int] = None,
               exclude: Optional[ExcludeSet] = None) -> Neighbors:
        """Top-k over the shards (the router's answer); `exclude` ids are skipped inside faiss."""
        nb = self.router.search(xq, k, nprobe=nprobe, exclude=exclude)
        return nb.with_(D=np.where(nb.I < 0, -np.inf, nb.D).astype(np.float32))

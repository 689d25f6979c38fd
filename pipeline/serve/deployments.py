"""Ray Serve deployments: one per index shard, a router that fans out and merges, and the HTTP ingress.

```
HTTP ─> Ingress (FastAPI; holds the VisualMemory: votes, tombstones, delta, overlays, writes)
          └─ memory.search -> RemoteRouter ─> Router deployment ─┬─> shard-0 deployment (ShardSearcher)
                                                                  ├─> shard-1 deployment
                                                                  └─> ...   merge_topk over their answers
```
Why this shape: the shards are the only part that needs RAM proportional to the memory and they scale
independently (replicas/autoscaling from `cfg.serve`); the router is stateless; all mutable state (logs,
overlays, the manifest pointer) stays in the single ingress replica, the one writer, so a delete is excluded
from the very next query without any cross-replica protocol. Shards receive the manifest version with each
request and load that version's file on first use, keeping the previous one until it is no longer asked
for, so queries keep working while compaction commits a new version.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipeline.config import Config, from_dict, to_dict
from pipeline.index.shard import ExcludeShipper

log = logging.getLogger("vmem.serve")


def _deployment_options(cfg: Config) -> Dict[str, Any]:
    sc = cfg.serve
    if sc.autoscaling:
        return {"autoscaling_config": {"min_replicas": 1, "initial_replicas": max(1, sc.shard_replicas),
                                       "max_replicas": max(sc.max_replicas, sc.shard_replicas),
                                       "target_ongoing_requests": 4}}
    return {"num_replicas": sc.shard_replicas}


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ShardDeployment:
    """Searches shard `shard_no` of whichever manifest version a request names (`ShardSearcher` inside)."""

    def __init__(self, memory_dir: str, shard_no: int, cfg: dict):
        from pipeline import storage

        self.cfg = from_dict(cfg)
        storage.configure(self.cfg.storage)
        self.memory_dir = memory_dir
        self.shard_no = shard_no
        self.searchers: Dict[int, Any] = {}
        self.lock = threading.Lock()

    def _searcher(self, version: int):
        s = self.searchers.get(version)
        if s is not None:
            return s
        with self.lock:  # one load per version even when many requests arrive at once
            s = self.searchers.get(version)
            if s is None:
                from pipeline.index.manifest import ManifestStore
                from pipeline.index.shard import ShardSearcher

                m = ManifestStore(self.memory_dir).load(version)
                entries = [e for e in m.shards if e.shard == self.shard_no]
                if not entries:
                    raise RuntimeError(f"manifest v{version} has no shard {self.shard_no}; restart `vmem serve`")
                s = ShardSearcher(self.memory_dir, entries[0], metric=m.metric, nprobe=m.nprobe, rerank_k=m.rerank_k)
                # Keep the newest two versions: queries against the previous one may still be in flight.
                self.searchers = {v: x for v, x in self.searchers.items() if v >= version - 1}
                self.searchers[version] = s
                log.info("shard %d: loaded manifest version %d", self.shard_no, version)
        return s

    async def search(self, version: int, xq: np.ndarray, k: int, nprobe: Optional[int], exclude) -> dict:
        # faiss releases the GIL: searching in a thread lets one replica serve several requests at once.
        return await asyncio.to_thread(lambda: self._searcher(version).search(xq, k, nprobe=nprobe,
                                                                             exclude=exclude))


@serve.deployment(ray_actor_options={"num_cpus": 0})
class RouterDeployment:
    """Fans a query out to every shard deployment and merges their top-k exactly."""

    def __init__(self, shards: List[DeploymentHandle], metric: str = "ip"):
        self.shards = shards
        self.keep_max = metric == "ip"

    async def search(self, version: int, xq: np.ndarray, k: int, nprobe: Optional[int] = None,
                     exclude=None):
        from pipeline.index.router import SearchResult, gather_meta, merge_topk

        parts = await asyncio.gather(*[h.search.remote(version, xq, k, nprobe, exclude) for h in self.shards])
        D, I = merge_topk([p["D"] for p in parts], [p["I"] for p in parts], k, keep_max=self.keep_max)
        return SearchResult(D=D, I=I, version=version, **gather_meta(I, list(parts)))


class RemoteRouter:
    """The index layer's Router contract (`.search(xq, k, nprobe, exclude) -> SearchResult`) answered by the
    router deployment; called from the ingress's worker threads, so it may block on the handle.

    The tombstone ids go to the object store once per exclude version (the memory tags an `ExcludeSet` with
    its base version and tombstone-log position, which change whenever the ids do), so shards fetch and build
    their faiss selector once per set, not once per query.
    """

    def __init__(self, handle: DeploymentHandle, version: int):
        self.handle = handle
        self.version = version
        self._exclude = ExcludeShipper()

    def search(self, xq: np.ndarray, k: int, nprobe: Optional[int] = None, exclude=None) -> Any:
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        return self.handle.search.remote(self.version, xq, int(k), nprobe, self._exclude(exclude)).result()

    def close(self) -> None:
        """Nothing to release here: the shard deployments outlive any one manifest version."""


def served_memory(cfg: Config, router: DeploymentHandle):
    """A VisualMemory whose committed shards are searched by the router deployment, not in this process.

    Votes, tombstones, delta and overlays stay in the memory layer; only `BaseState.router` is replaced, on
    every (re)load of a manifest version, so compaction switches the shards' version too.
    """
    from pipeline.memory.memory import VisualMemory

    class ServedMemory(VisualMemory):
        def _load(self, version):
            with self._lock:  # publish the base with its remote router already attached
                super()._load(version)
                self.base._router = RemoteRouter(router, self.base.version)

    return ServedMemory(cfg.memory_dir, None, cfg)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress()
class Ingress:
    """The HTTP API (`pipeline.serve.api.create_api`) over a VisualMemory whose base index is the router."""

    def __init__(self, cfg: dict, router: DeploymentHandle):
        from pipeline import storage

        self.cfg = from_dict(cfg)
        storage.configure(self.cfg.storage)
        self.memory = served_memory(self.cfg, router)

    def __serve_build_asgi_app__(self):
        from pipeline.serve.api import create_api

        return create_api(self.cfg, self.memory)


def build_app(cfg: Config):
    """The Serve application for `cfg`: one deployment per shard of the current manifest, a router bound to
    their handles, and the FastAPI ingress bound to the router. Returns a `ray.serve.Application`."""
    from pipeline.index.manifest import ManifestStore

    manifest = ManifestStore(cfg.memory_dir).load()  # NotFound with a hint when nothing is built yet
    d = to_dict(cfg)
    opts = _deployment_options(cfg)
    shards = [ShardDeployment.options(name=f"shard-{e.shard:03d}", **opts).bind(cfg.memory_dir, e.shard, d)
              for e in manifest.shards]
    router = RouterDeployment.options(name="router").bind(shards, manifest.metric)
    return Ingress.options(name="ingress").bind(d, router)

"""Ray Serve deployments: the HTTP ingress (any number of replicas) and, for large memories, one deployment
per index shard.

```
HTTP -> HAProxy (or Serve's proxy) -> Ingress replica 1..N (FastAPI; each opens the memory and follows its
                                      committed state; concurrent queries batched by pipeline.serve.batching)
                         memory.search -> small memory: the shards, in RAM, searched in this process
                                       -> large memory: ShardFanout ─┬─> shard-0 deployment (@serve.batch)
                                                                     ├─> shard-1 deployment
                                                                     └─> ...  neighbors.merge in the ingress
```
Why this shape: a query costs the ingress ~1 ms of Python; every extra Ray hop costs about as much again, and
the old router deployment between ingress and shards added one hop and no work, so the ingress fans out to
the shard handles itself. Below `serve.local_search_max_items` items the shards are searched in the ingress: no
hop at all (each replica holds the index in RAM: faiss searches memory-mapped IVF lists ~100x slower). Above it, only the shard
deployments hold RAM proportional to the memory; they batch concurrent queries into one faiss call.
Ingress replicas keep no state of their own: each opens the memory through the memory layer, which checks
the committed state on every query, so an edit acknowledged by one replica is seen by the next query on
any replica. Shards receive the manifest version with each query and load that version's file on first use,
keeping the previous one while queries for it may still be in flight, so compaction never stops queries.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipeline.config import Config, from_dict, to_dict
from pipeline.index.neighbors import Neighbors, merge
from pipeline.index.shard import ExcludeShipper

log = logging.getLogger("vmem.serve")
BATCH_WAIT_S = 0.002  # how long a shard waits to fill a batch: small next to a search (3-5 ms)


def _options(cfg: Config, replicas: int) -> Dict[str, Any]:
    """Serve's deployment options: a fixed replica count, or autoscaling between 1 and max_replicas starting
    at it; the access log as configured; a short graceful shutdown so `vmem serve` stops within seconds."""
    sc = cfg.serve
    opts: Dict[str, Any] = {"logging_config": {"enable_access_log": sc.access_log},
                            "graceful_shutdown_wait_loop_s": 0.5, "graceful_shutdown_timeout_s": 3}
    if sc.autoscaling:
        opts["autoscaling_config"] = {"min_replicas": 1, "initial_replicas": max(1, replicas),
                                      "max_replicas": max(sc.max_replicas, replicas), "target_ongoing_requests": 4}
    else:
        opts["num_replicas"] = max(1, replicas)
    return opts


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class ShardDeployment:
    """Searches shard `shard_no` of whichever manifest version a query names (`ShardSearcher` inside)."""

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
        with self.lock:  # one load per version even when many queries arrive at once
            s = self.searchers.get(version)
            if s is None:
                from pipeline.index.manifest import ManifestStore
                from pipeline.index.shard import ShardSearcher

                m = ManifestStore(self.memory_dir).load(version)
                entries = [e for e in m.shards if e.shard == self.shard_no]
                if not entries:
                    raise RuntimeError(f"manifest v{version} has no shard {self.shard_no}; restart `vmem serve`")
                s = ShardSearcher(self.memory_dir, entries[0], metric=m.metric, nprobe=m.nprobe,
                                  mmap=self.cfg.serve.mmap_shards, rerank_k=m.rerank_k)
                # Keep the newest two versions: queries against the previous one may still be in flight.
                self.searchers = {v: x for v, x in self.searchers.items() if v >= version - 1}
                self.searchers[version] = s
                log.info("shard %d: loaded manifest version %d", self.shard_no, version)
        return s

    def _search_group(self, queries: List[dict]) -> List[Neighbors]:
        """One faiss call for queries that share version, k, nprobe and exclude set; split per query."""
        q0 = queries[0]
        xq = np.concatenate([q["xq"] for q in queries]) if len(queries) > 1 else q0["xq"]
        out = self._searcher(q0["version"]).search(xq, q0["k"], nprobe=q0["nprobe"], exclude=q0["exclude"])
        parts, row = [], 0
        for q in queries:
            n = q["xq"].shape[0]
            parts.append(out.rows(row, row + n))
            row += n
        return parts

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=BATCH_WAIT_S)
    async def search(self, queries: List[dict]) -> List[Neighbors]:
        """Top-k of this shard for each query dict {version, xq, k, nprobe, exclude}, as `Neighbors`."""
        groups: Dict[Tuple, List[int]] = {}
        for i, q in enumerate(queries):
            ex = q["exclude"]
            groups.setdefault((q["version"], q["k"], q["nprobe"], None if ex is None else ex.version), []).append(i)
        results: List[Optional[Neighbors]] = [None] * len(queries)

        def run():  # faiss releases the GIL: the replica's event loop keeps collecting the next batch
            for members in groups.values():
                for i, part in zip(members, self._search_group([queries[i] for i in members])):
                    results[i] = part

        await asyncio.to_thread(run)
        return results


class ShardFanout:
    """The index layer's Router contract (`.search(xq, k, nprobe, exclude) -> Neighbors`) answered by the
    shard deployments: called from the ingress's worker threads, it sends the query to every shard handle and
    merges their top-k exactly (`neighbors.merge`).

    The tombstone ids go to the object store once per exclude version (`ExcludeShipper`), so shards fetch and
    build their faiss selector once per set, not once per query.
    """

    def __init__(self, shards: List[DeploymentHandle], version: int, metric: str):
        self.shards = shards
        self.version = version
        self.keep_max = metric == "ip"
        self._exclude = ExcludeShipper()

    def search(self, xq: np.ndarray, k: int, nprobe: Optional[int] = None, exclude=None) -> Neighbors:
        q = {"version": self.version, "xq": np.ascontiguousarray(xq, dtype=np.float32), "k": int(k),
             "nprobe": nprobe, "exclude": self._exclude(exclude)}
        parts = [r.result() for r in [h.search.remote(q) for h in self.shards]]
        return merge(parts, k, keep_max=self.keep_max)

    def close(self) -> None:
        """Nothing to release here: the shard deployments outlive any one manifest version."""


def served_memory(cfg: Config, shards: Optional[List[DeploymentHandle]]):
    """The memory an ingress replica serves: its shards searched in this process (read into RAM unless
    `serve.mmap_shards`), or by the shard deployments (`shards` handles).

    Votes, the forget list, the delta and overlays stay in the memory layer (read from the state tables);
    each manifest version gets its own router (`router_factory`), so compaction switches the shards too.
    """
    from pipeline.index.router import Router
    from pipeline.memory.memory import VisualMemory

    def router(manifest):
        if shards:
            return ShardFanout(shards, manifest.version, manifest.metric)
        # One OpenMP thread: a server's parallelism is its concurrent requests, and OpenMP teams spinning
        # on a busy machine cost more than a single query's search.
        return Router(cfg.memory_dir, use_ray=False, manifest=manifest, omp_threads=1, mmap=cfg.serve.mmap_shards)

    # upkeep=False: the replica's `serve.upkeep` thread maintains the tables (and compacts) after every write.
    return VisualMemory.open(cfg.memory_dir, cfg=cfg, router_factory=router, upkeep=False)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress()
class Ingress:
    """The HTTP API (`pipeline.serve.api.create_api`) over the memory (see `served_memory`)."""

    def __init__(self, cfg: dict, shards: Optional[List[DeploymentHandle]] = None):
        from pipeline import storage

        self.cfg = from_dict(cfg)
        storage.configure(self.cfg.storage)
        self.memory = served_memory(self.cfg, shards)

    def __serve_build_asgi_app__(self):
        from pipeline.serve.api import create_api

        return create_api(self.cfg, self.memory)


def searches_in_ingress(cfg: Config, count: int) -> bool:
    """Whether a memory of `count` items is searched inside the ingress replicas (no shard deployments)."""
    return count <= cfg.serve.local_search_max_items


def build_app(cfg: Config):
    """The Serve application for `cfg`: ingress replicas, plus one deployment per shard of the current
    manifest when the memory is too large to search in the ingress. Returns a `ray.serve.Application`."""
    from pipeline.index.manifest import ManifestStore

    manifest = ManifestStore(cfg.memory_dir).load()  # NotFound with a hint when nothing is built yet
    d = to_dict(cfg)
    shards = None
    if not searches_in_ingress(cfg, manifest.count):
        shards = [ShardDeployment.options(name=f"shard-{e.shard:03d}", **_options(cfg, cfg.serve.shard_replicas))
                  .bind(cfg.memory_dir, e.shard, d) for e in manifest.shards]
    return Ingress.options(name="ingress", **_options(cfg, cfg.serve.ingress_replicas)).bind(d, shards)

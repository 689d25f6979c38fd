"""The router: one `ShardSearcher` Ray actor per shard, queries fanned out concurrently, exact top-k merge.

`Router(memory_dir, version=None).search(xq, k, nprobe=None, exclude=None, rerank_k=None) -> Neighbors` (the
contract in docs/design.md). Every shard answers its own top-k (with the same trained quantizer, nprobe and
re-rank depth), and `neighbors.merge` keeps the global best k, so the result equals one IVF index holding every
vector (with re-ranking: its exact top-k among the candidates the shards' codes proposed). Ids are
external int64 ids (-1 = no result); metadata comes from the shard that holds each hit.

If a shard actor dies (node lost, OOM, `ray.kill`), the router recreates it from the manifest and re-asks
it; the query still returns the full, correct result. `use_ray=False` runs the searchers in-process (build-time
recall measurement, tools, tests of the merge itself).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from pipeline.embed.parts import check_vectors
from pipeline.errors import UserError
from pipeline.index.manifest import Manifest, ManifestStore
from pipeline.index.neighbors import META, Neighbors, merge, merge_topk
from pipeline.index.shard import ExcludeSet, ExcludeShipper, ShardSearcher
from pipeline.index.train import shard_of

log = logging.getLogger("vmem.index")

__all__ = ["Router", "Neighbors", "ExcludeSet", "merge_topk"]

MAX_RETRIES = 2


class Router:
    """Fan-out search over the shards of one memory version (see module docstring)."""

    def __init__(self, memory_dir: str, version: Optional[int] = None, nprobe: Optional[int] = None,
                 use_ray: bool = True, omp_threads: Optional[int] = None, gpu: bool = False,
                 manifest: Optional[Manifest] = None, actor_options: Optional[Dict[str, Any]] = None,
                 mmap: bool = True, rerank_k: Optional[int] = None):
        self.memory_dir = memory_dir
        self.store = ManifestStore(memory_dir)
        self.manifest = manifest or self.store.load(version)
        self.version = self.manifest.version
        self.nprobe = int(nprobe or self.manifest.nprobe)
        self.rerank_k = int(self.manifest.rerank_k if rerank_k is None else rerank_k)
        bare = [s.shard for s in self.manifest.shards if not s.vectors_path]
        if self.rerank_k and bare:  # their scores stay approximate beside re-ranked exact ones
            log.warning("memory v%s re-ranks %d candidates but shard(s) %s have no re-rank vectors file (written "
                        "by an older compaction?): rebuild or compact to restore exact re-ranking", self.version,
                        self.rerank_k, bare)
        self.keep_max = self.manifest.metric == "ip"
        self.use_ray = use_ray
        n = max(1, self.manifest.num_shards)
        # mmap=False reads the shards into RAM: faiss searches memory-mapped IVF lists far slower (measured
        # 1 ms against 12 us for one query on IVF64,Flat), which matters to servers, not to batch jobs.
        self._kwargs = dict(metric=self.manifest.metric, nprobe=self.nprobe, gpu=gpu, mmap=mmap,
                            rerank_k=self.rerank_k,
                            omp_threads=omp_threads or max(1, (os.cpu_count() or 1) // n))
        # num_cpus=0: searchers are long-lived and mostly idle; they must never block Ray tasks from running.
        self._actor_options = {"num_cpus": 0, **(actor_options or {})}
        self._ship_exclude = ExcludeShipper()
        self.restarts = 0
        self.searchers: List[Any] = [self._make(i) for i in range(self.manifest.num_shards)]
        if use_ray:
            import ray

            ray.get([s.ping.remote() for s in self.searchers])  # fail now (missing/corrupt file), not mid-query

    def _make(self, i: int):
        entry = self.manifest.shards[i].__dict__
        if not self.use_ray:
            return ShardSearcher(self.memory_dir, entry, **self._kwargs)
        import ray

        actor_cls = ray.remote(ShardSearcher)
        return actor_cls.options(**self._actor_options).remote(self.memory_dir, entry, **self._kwargs)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def count(self) -> int:
        return self.manifest.count

    def _exclude_for_actors(self, exclude: Optional[ExcludeSet]) -> Optional[ExcludeSet]:
        return self._ship_exclude(exclude) if self.use_ray else exclude

    def search(self, xq: np.ndarray, k: int, nprobe: Optional[int] = None,
               exclude: Optional[ExcludeSet] = None, rerank_k: Optional[int] = None) -> Neighbors:
        """Global top-k for each row of `xq` (nq, dim): ids, scores, metadata. Exact merge over all shards.

        `rerank_k` (default: the manifest's) = candidates per shard re-ranked exactly; 0 turns re-ranking off.
        """
        if int(k) <= 0:
            raise UserError(f"k must be > 0, got {k}")
        xq = check_vectors(xq, self.dim, what="query vectors")
        nprobe = int(nprobe or self.nprobe)
        rerank_k = self.rerank_k if rerank_k is None else int(rerank_k)
        if not self.use_ray:
            parts = [s.search(xq, k, nprobe, exclude, rerank_k=rerank_k) for s in self.searchers]
        else:
            parts = self._search_ray(xq, k, nprobe, self._exclude_for_actors(exclude), rerank_k)
        return merge(parts, k, keep_max=self.keep_max)

    def _search_ray(self, xq, k, nprobe, exclude, rerank_k) -> List[Neighbors]:
        import ray
        from ray.exceptions import RayActorError

        xq_ref = ray.put(xq)
        pending = {i: s.search.remote(xq_ref, k, nprobe, exclude, rerank_k=rerank_k)
                   for i, s in enumerate(self.searchers)}
        parts: Dict[int, Neighbors] = {}
        for i, ref in pending.items():
            for attempt in range(MAX_RETRIES + 1):
                try:
                    parts[i] = ray.get(ref)
                    break
                except RayActorError as e:
                    if attempt == MAX_RETRIES:
                        raise
                    log.warning("shard %d searcher died (%s): recreating it and retrying", i,
                                type(e).__name__)
                    self.searchers[i] = self._make(i)
                    self.restarts += 1
                    ref = self.searchers[i].search.remote(xq_ref, k, nprobe, exclude, rerank_k=rerank_k)
        return [parts[i] for i in range(len(self.searchers))]

    def lookup(self, ids: Sequence[int]) -> Dict[str, np.ndarray]:
        """Metadata (labels, label_names, keys, sources) of ids, asked from the shard each id routes to."""
        ids = np.asarray(ids, dtype=np.int64)
        route = shard_of(ids, len(self.searchers))
        out = {name: np.full(len(ids), fill, dtype) for name, fill, dtype in META}
        for s in range(len(self.searchers)):
            sel = np.flatnonzero(route == s)
            if len(sel) == 0:
                continue
            if self.use_ray:
                import ray

                got = ray.get(self.searchers[s].lookup.remote(ids[sel]))
            else:
                got = self.searchers[s].lookup(ids[sel])
            for name in out:
                out[name][sel] = got[name]
        return out

    def close(self) -> None:
        """Stop the shard actors (in-process searchers are just dropped)."""
        if self.use_ray:
            import ray

            for s in self.searchers:
                try:
                    ray.kill(s)
                except Exception:  # already dead
                    pass
        self.searchers = []

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

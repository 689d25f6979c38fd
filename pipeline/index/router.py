"""The router: fan a query out to the shards of one manifest version and merge their top-k exactly.

`Router(memory_dir, version=None).search(xq, k, nprobe=None, exclude=None, rerank_k=None) -> Neighbors` (the
contract in docs/design.md). Every shard answers its own top-k (with the same trained quantizer, nprobe and
re-rank depth), and `neighbors.merge` keeps the global best k, so the result equals one IVF index holding every
vector (with re-ranking: its exact top-k among the candidates the shards' codes proposed). Ids are
external int64 ids (-1 = no result); metadata comes from the shard that holds each hit.

Where the shards live decides how they are searched:
- on this node (the default, `use_ray=False`): `ShardSearcher`s in this process. The probed inverted lists are
  found once for all shards (they share the trained quantizer: `coarse_assign`), then a few queries go to
  every shard at once on threads (faiss releases the GIL), a batch shard after shard with faiss's OpenMP over
  its rows. Measured (`benchmarks/fanout.py`): 4 shards answer as fast as one index holding every vector.
- on other nodes (`use_ray=True`): one `ShardSearcher` Ray actor per shard. If an actor dies (node lost, OOM,
  `ray.kill`), the router recreates it from the manifest and re-asks it; the query still returns the full,
  correct result.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence

import faiss

import numpy as np

from pipeline.embed.parts import check_vectors
from pipeline.errors import UserError
from pipeline.index.manifest import Manifest, ManifestStore
from pipeline.index.neighbors import META, Neighbors, merge, merge_topk
from pipeline.index.shard import ExcludeSet, ExcludeShipper, ShardSearcher, coarse_assign
from pipeline.index.train import shard_of

log = logging.getLogger("vmem.index")

__all__ = ["Router", "Neighbors", "ExcludeSet", "merge_topk"]

MAX_RETRIES = 2
# Up to this many queries, in-process shards are searched on one thread each (a query's IVF scan runs on one
# core); bigger batches go shard after shard, each spread over the cores by faiss's OpenMP, query by query.
FEW_QUERIES = 8


def shared_quantizer(searchers: Sequence[ShardSearcher]) -> Optional[faiss.IndexIVF]:
    """The IVF index whose coarse quantizer every shard shares (equal centroids), else None. Every shard of a
    build and its compactions is populated from one trained index, so this holds; the check is cheap insurance
    (nlist x dim floats, once per manifest) against a memory assembled otherwise."""
    ivfs = [s.ivf for s in searchers]
    if any(i is None for i in ivfs):
        return None
    try:
        cents = [i.quantizer.reconstruct_n(0, i.quantizer.ntotal) for i in ivfs]
    except RuntimeError:  # a quantizer that cannot give its centroids back (e.g. some HNSW ones)
        return None
    return ivfs[0] if all(c.shape == cents[0].shape and np.array_equal(c, cents[0]) for c in cents) else None


class Router:
    """Fan-out search over the shards of one memory version (see module docstring)."""

    def __init__(self, memory_dir: str, version: Optional[int] = None, nprobe: Optional[int] = None,
                 use_ray: bool = False, omp_threads: Optional[int] = None, gpu: bool = False,
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
        # Actors in their own processes split the cores; in-process shards share the OpenMP pool, which a
        # batch of queries uses across its rows.
        self._kwargs = dict(metric=self.manifest.metric, nprobe=self.nprobe, gpu=gpu, mmap=mmap,
                            rerank_k=self.rerank_k,
                            omp_threads=omp_threads or max(1, (os.cpu_count() or 1) // (n if use_ray else 1)))
        # num_cpus=0: searchers are long-lived and mostly idle; they must never block Ray tasks from running.
        self._actor_options = {"num_cpus": 0, **(actor_options or {})}
        self._ship_exclude = ExcludeShipper()
        self.restarts = 0
        self.searchers: List[Any] = [self._make(i) for i in range(self.manifest.num_shards)]
        # Shards in this process are searched at once on threads (faiss releases the GIL), one merge after.
        self._ivf = shared_quantizer(self.searchers) if not use_ray and len(self.searchers) > 1 else None
        self._pool = ThreadPoolExecutor(len(self.searchers), thread_name_prefix="vmem-shard") \
            if not use_ray and len(self.searchers) > 1 else None
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
        if self.use_ray:
            return merge(self._search_ray(xq, k, nprobe, self._exclude_for_actors(exclude), rerank_k), k,
                         keep_max=self.keep_max)
        # The shards share the trained quantizer: the probed lists are found once, not once per shard.
        assign = coarse_assign(self._ivf, xq, nprobe) if self._ivf is not None else None
        search = lambda s: s.search_ids(xq, k, nprobe, exclude, rerank_k=rerank_k, assign=assign)  # noqa: E731
        if self._pool is not None and len(xq) <= FEW_QUERIES:
            parts = list(self._pool.map(search, self.searchers))
        else:
            parts = [search(s) for s in self.searchers]
        D, I = merge_topk([p[0] for p in parts], [p[1] for p in parts], k, keep_max=self.keep_max)
        return Neighbors(D, I, **self._gather(I))

    def _gather(self, I: np.ndarray) -> Dict[str, np.ndarray]:
        """Metadata of the merged top-k, each id looked up once, in the shard that holds it."""
        flat = I.reshape(-1)
        out = {name: np.full(flat.shape, fill, dtype) for name, fill, dtype in META}
        for s in self.searchers:
            s.fill_metadata(flat, out)
        return {name: a.reshape(I.shape) for name, a in out.items()}

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
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self.searchers = []

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Which faiss index a memory uses: the IVF rule applied to autofaiss's choice, and what a key costs in bytes.

The design is sharded IVF with ONE trained quantizer shared by every shard (so per-shard results merge into
exactly what one big index would return, and an item can be added to any shard without retraining). autofaiss
chooses from a memory budget and may answer with a non-IVF index (HNSW, Flat) on small data, and with an
IVF-PQ whose code caps recall even when the budget could afford more. `resolve_index_key` applies one rule:

  b = budget / n   (bytes the budget allows per item; 8 of them go to the int64 id in the inverted lists)
  1. an explicit key (config `index.index_key`) is used as given; it must be an IVF family key;
  2. `IVF{nlist},Flat`  if b >= 4*d + 8        (exact distances inside the probed lists)
  3. `IVF{nlist},SQ8`   if b >= d + 8          (8-bit scalar codes: recall@10 ~0.99 at a quarter of Flat)
  4. autofaiss's key    if it is IVF-PQ        (its OPQ/PQ choice for budgets below one byte per dimension;
                                                 its list count capped like nlist below)
  5. `IVF{nlist},PQ{m}x8` otherwise, m the largest divisor of d (<= d/2... down to 4) with m + 8 <= b.

nlist = autofaiss's recommendation for n (about 4*sqrt(n), 2^14..2^17 beyond 1M), capped so the training
sample holds at least 39 points per list (faiss's k-means minimum).

`choose_index` puts the size rule in front (IVF only where it pays): when an exhaustive scan of all n float
vectors takes at most half of `index.max_latency_ms` (measured on this machine over more vectors than CPU
caches hold: `scan_ms_per_item`), the memory gets ONE list: `IVF1,Flat` (exact search) when the budget holds
float vectors, else `IVF1,SQ8` with exact re-ranking. When only PQ codes fit the budget the memory is large
for it: IVF + re-rank (a full PQ scan per query would cost far more than probing a few lists). A one-list IVF
*is* a flat index with ids (same scan, same distances), and keeps what the memory relies on: one shared
trained index, `remove_ids`, id selectors, inverted lists to verify erasure.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

import faiss

from pipeline.errors import UserError
from pipeline.index.units import to_autofaiss

ID_BYTES = 8  # each item's int64 id is stored beside its code in the inverted lists
MIN_POINTS_PER_LIST = 39


def is_ivf(key: str) -> bool:
    return re.search(r"(^|,)IVF\d+", key) is not None


def metric_of(metric: str) -> int:
    if metric not in ("ip", "l2"):
        raise UserError(f"unknown metric {metric!r}: choose ip or l2")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def nlist_for(n: int, train_n: Optional[int] = None) -> int:
    """Number of inverted lists for n items (autofaiss's rule), capped by the training sample size."""
    from autofaiss.external.optimize import get_optimal_nb_clusters

    nlist = int(get_optimal_nb_clusters(max(int(n), 1))[0])
    return max(1, min(nlist, nlist_cap(train_n)))


def nlist_cap(train_n: Optional[int]) -> int:
    """Most lists a training sample of train_n points supports (None = no cap)."""
    return 1 << 62 if train_n is None else max(1, int(train_n) // MIN_POINTS_PER_LIST)


def _largest_pq(d: int, max_code: float) -> Optional[int]:
    for m in range(min(d, 256), 3, -1):
        if d % m == 0 and m <= max_code:
            return m
    return None


def resolve_index_key(auto_key: Optional[str], n: int, d: int, budget_bytes: int,
                      train_n: Optional[int] = None, explicit_key: Optional[str] = None) -> str:
    """The IVF key this memory will use (rule in the module docstring)."""
    if explicit_key:
        if not is_ivf(explicit_key):
            raise UserError(f"index.index_key={explicit_key!r} is not an IVF index: the memory shares one trained "
                            f"IVF quantizer across shards; use e.g. 'IVF1024,PQ32x8' or 'IVF256,Flat'")
        return explicit_key
    nlist = nlist_for(n, train_n)
    per_item = budget_bytes / max(int(n), 1)
    if per_item >= 4 * d + ID_BYTES:
        return f"IVF{nlist},Flat"
    if per_item >= d + ID_BYTES:
        return f"IVF{nlist},SQ8"
    if auto_key and is_ivf(auto_key) and "PQ" in auto_key:
        return re.sub(r"IVF(\d+)", lambda m: f"IVF{min(int(m.group(1)), nlist_cap(train_n))}", auto_key, count=1)
    m = _largest_pq(d, per_item - ID_BYTES)
    if m is None:
        raise UserError(f"a memory budget of {budget_bytes} bytes for {n} items of dimension {d} leaves "
                        f"{per_item:.1f} bytes per item: not even a 4-byte PQ code fits; raise "
                        f"index.max_index_memory")
    return f"IVF{nlist},PQ{m}x8"


def code_is_exact(key: str) -> bool:
    """Whether the key stores float vectors (`...,Flat` codes): its distances are exact, re-ranking adds nothing."""
    return key.replace(" ", "").endswith(",Flat") and not key.startswith(("OPQ", "PCA"))


def scan_ms_per_item(d: int, probe_bytes: int = 256 << 20, repeats: int = 3) -> float:
    """Milliseconds one query needs per stored item in an exhaustive inner-product scan of float vectors
    (measured on 1 thread over `probe_bytes` of vectors: more than CPU caches hold, as a real memory's are)."""
    import faiss

    n = max(1000, int(probe_bytes) // (4 * int(d)))
    xb = np.ones((n, int(d)), dtype=np.float32)  # values do not change the scan's speed
    q = np.ones((1, int(d)), dtype=np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        faiss.knn(q, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)  # first touch of the pages
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            faiss.knn(q, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
            best = min(best, time.perf_counter() - t)
    finally:
        faiss.omp_set_num_threads(threads)
    return best * 1000 / n


@dataclass
class IndexChoice:
    """The key a build uses, how it was chosen (`kind`: flat | scan | ivf | explicit) and why, in words."""
    key: str
    kind: str
    reason: str
    rerank: bool  # shards store re-rank vectors (exact similarities decide the top k)

    def to_dict(self) -> dict:
        return {"key": self.key, "kind": self.kind, "reason": self.reason, "rerank": self.rerank}


def _rerank_on(setting: str, key: str) -> bool:
    return setting == "true" or (setting == "auto" and not code_is_exact(key))


def choose_index(auto_key: Optional[str], n: int, d: int, budget_bytes: int, max_latency_ms: float,
                 train_n: Optional[int] = None, explicit_key: Optional[str] = None, rerank: str = "auto",
                 scan_ms: Optional[float] = None) -> IndexChoice:
    """The index of an n x d memory (rules in the module docstring); `scan_ms` = ms per item (default measured)."""
    per_item = budget_bytes / max(int(n), 1)
    if explicit_key:
        key = resolve_index_key(None, n, d, budget_bytes, train_n, explicit_key)
        return IndexChoice(key, "explicit", "index.index_key is set", _rerank_on(rerank, key))
    per_scan = scan_ms_per_item(d) if scan_ms is None else float(scan_ms)
    est = per_scan * n
    scan = f"an exhaustive scan of {n:,} x {d} takes ~{est:.2f} ms/query here"
    fits_scan = est <= max_latency_ms / 2
    if fits_scan and per_item >= d + ID_BYTES:
        if per_item >= 4 * d + ID_BYTES:
            key, kind, code = "IVF1,Flat", "flat", "float vectors fit the budget: exact search"
        else:
            key, kind, code = "IVF1,SQ8", "scan", "8-bit codes fit the budget (float vectors do not): re-rank"
        reason = f"{scan} <= half of index.max_latency_ms ({max_latency_ms:g}): one list (no IVF); {code}"
        return IndexChoice(key, kind, reason, _rerank_on(rerank, key))
    key = resolve_index_key(auto_key, n, d, budget_bytes, train_n)
    if fits_scan:  # a full PQ scan per query would cost ~nlist / nprobe times an IVF's work for the same recall
        reason = (f"{scan}, but only PQ codes fit the budget ({per_item:.0f} bytes per item): IVF with "
                  f"{key_cost(key, d).nlist} lists and re-rank, not a full scan of the codes per query")
        return IndexChoice(key, "ivf", reason, _rerank_on(rerank, key))
    key = resolve_index_key(auto_key, n, d, budget_bytes, train_n)
    reason = (f"{scan} > half of index.max_latency_ms ({max_latency_ms:g}): IVF with "
              f"{key_cost(key, d).nlist} lists; codes from {per_item:.0f} budget bytes per item")
    return IndexChoice(key, "ivf", reason, _rerank_on(rerank, key))


def autofaiss_key(n: int, d: int, budget_bytes: int) -> Optional[str]:
    """autofaiss's first choice of key for n x d under a budget (no training: its selection rule only)."""
    from autofaiss.external.optimize import get_optimal_index_keys_v2

    keys = get_optimal_index_keys_v2(int(n), int(d), to_autofaiss(budget_bytes))
    return keys[0] if keys else None


@dataclass
class KeyCost:
    """Memory of an IVF index: `bytes_per_item` * n + `fixed_bytes` (quantizer, transforms, list heads)."""
    key: str
    code_size: int
    bytes_per_item: int
    fixed_bytes: int
    nlist: int

    def total(self, n: int) -> int:
        return int(n) * self.bytes_per_item + self.fixed_bytes


def key_cost(key: str, d: int, metric: str = "ip") -> KeyCost:
    """What `key` costs: faiss builds the (empty, untrained) index so code sizes are faiss's own numbers."""
    try:
        index = faiss.index_factory(int(d), key, metric_of(metric))
    except RuntimeError as e:
        raise UserError(f"faiss cannot build index key {key!r} for dimension {d}: {str(e).splitlines()[-1]}") from e
    ivf = faiss.extract_index_ivf(index)
    fixed = ivf.nlist * ivf.d * 4 + ivf.nlist * 48  # centroids + one (codes, ids) vector pair per list
    hnsw = re.search(r"IVF\d+_HNSW(\d+)", key)
    if hnsw:
        fixed += ivf.nlist * int(hnsw.group(1)) * 2 * 4  # the quantizer's graph links
    if isinstance(index, faiss.IndexPreTransform):  # OPQ / PCA matrices
        for i in range(index.chain.size()):
            vt = index.chain.at(i)
            fixed += vt.d_in * vt.d_out * 4
    return KeyCost(key, int(ivf.code_size), int(ivf.code_size) + ID_BYTES, int(fixed), int(ivf.nlist))


def bytes_per_shard(cost: KeyCost, n: int, num_shards: int) -> int:
    """RAM one shard searcher needs: its share of the items plus a full copy of the shared quantizer."""
    return cost.total(math.ceil(int(n) / max(int(num_shards), 1)))

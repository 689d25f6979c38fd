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

Measured choice (faiss >= 1.15). Given a sample of the memory's vectors (`choose_index(sample=...)`, the build
passes one), an IVF memory's code is chosen by measurement instead of the static rule above:
`candidate_keys` lists, for each code family, the largest code that fits the budget (bytes from faiss
itself): `Flat`, `SQ8`, multi-bit RaBitQ `RaBitQ{b}` (b = 1..9 bits per dimension; 1-bit is `RaBitQ`), its
fast-scan form `RaBitQfs{b}`, PQ fast-scan `PQ{m}x4fs` and `PQ{m}x8` (autofaiss's OPQ key when it gave one).
`measure_candidates` indexes the sample under each, with and without the re-rank stage, and finds the
cheapest setting (nprobe, re-rank depth) whose recall at the vote's depth K (and at 10) reaches the target;
`pick` takes, recall first, the candidate that reaches the target at the lowest CPU time per query (fewer
bytes on a tie), else the best recall. The re-rank stage stays on where it pays: the winner needed it, or
reached the target without it by less than `RERANK_MARGIN`.
faiss 1.15 has no IVF scalar-quantizer fast-scan index (the factory refuses `SQ4fs`/`SQ8fs`; there is no
IndexIVFScalarQuantizerFastScan class): its IVF fast-scan indexes are `PQ{m}x4fs` and `RaBitQfs{b}`, both
candidates here. RaBitQ needs no codebook training (a random rotation + the IVF k-means), supports
`remove_ids`, id selectors, `search_preassigned`, serialization and memory-mapped reads like the other keys
(tests/test_index_keys.py), so compacting memories may use it; the GPU wheel (faiss-gpu-cu12 1.12) cannot read
multi-bit RaBitQ or RaBitQ fast-scan indexes, so `choose_index(gpu=True)` leaves RaBitQ out.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import numpy as np

import faiss

from pipeline.errors import UserError
from pipeline.index.units import to_autofaiss

ID_BYTES = 8  # each item's int64 id is stored beside its code in the inverted lists
MIN_POINTS_PER_LIST = 39
Sample = Union[np.ndarray, Callable[[], np.ndarray]]  # vectors, or a function that reads them when needed


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
    measured: Optional[List[dict]] = None  # kind "measured": one row per candidate (`measure_candidates`)

    def to_dict(self) -> dict:
        out = {"key": self.key, "kind": self.kind, "reason": self.reason, "rerank": self.rerank}
        if self.measured is not None:
            out["measured"] = self.measured
        return out


def _rerank_on(setting: str, key: str) -> bool:
    return setting == "true" or (setting == "auto" and not code_is_exact(key))


def choose_index(auto_key: Optional[str], n: int, d: int, budget_bytes: int, max_latency_ms: float,
                 train_n: Optional[int] = None, explicit_key: Optional[str] = None, rerank: str = "auto",
                 scan_ms: Optional[float] = None, sample: Optional[Sample] = None, target: float = 0.95,
                 K: int = 10, metric: str = "ip", gpu: bool = False) -> IndexChoice:
    """The index of an n x d memory (rules in the module docstring); `scan_ms` = ms per item (default measured).

    `sample` (vectors of the memory, or a function returning them, called only when needed): an IVF memory's
    code is then measured among `candidate_keys` (recall at `K` and 10 against `target` first, then CPU time
    per query); without it the static rule decides."""
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
    why_ivf = (f"{scan}, but only compressed codes fit the budget ({per_item:.0f} bytes per item): IVF, not a "
               f"full scan of the codes per query" if fits_scan else
               f"{scan} > half of index.max_latency_ms ({max_latency_ms:g}): IVF")
    if sample is not None:
        keys = candidate_keys(n, d, budget_bytes, train_n, auto_key=auto_key, gpu=gpu)
        xs = (sample() if callable(sample) else sample) if len(keys) > 1 else None
        if xs is not None and len(xs) >= MIN_MEASURE_SAMPLE:
            rows = measure_candidates(xs, keys, K, target, metric=metric, rerank=rerank)
            best = pick(rows)
            got = (f"reaches recall {best['recall']:.3f} >= {target:g} at K={K}" if best["reached"] else
                   f"no candidate reaches recall {target:g} at K={K}: best recall {best['recall']:.3f}")
            reason = (f"{why_ivf}; measured {len(rows)} codes that fit {per_item:.0f} budget bytes per item on "
                      f"{best['sample']:,} sample vectors: {best['key']} {got}, {best['ms_per_query']:.3f} CPU "
                      f"ms/query (nprobe {best['nprobe']}/{best['sample_nlist']}, re-rank {best['rerank_k']})")
            return IndexChoice(best["key"], "measured", reason, _rerank_pays(rerank, best, target), rows)
    key = resolve_index_key(auto_key, n, d, budget_bytes, train_n)
    if fits_scan:  # a full PQ scan per query would cost ~nlist / nprobe times an IVF's work for the same recall
        reason = (f"{scan}, but only PQ codes fit the budget ({per_item:.0f} bytes per item): IVF with "
                  f"{key_cost(key, d).nlist} lists and re-rank, not a full scan of the codes per query")
        return IndexChoice(key, "ivf", reason, _rerank_on(rerank, key))
    reason = f"{why_ivf} with {key_cost(key, d).nlist} lists; codes from {per_item:.0f} budget bytes per item"
    return IndexChoice(key, "ivf", reason, _rerank_on(rerank, key))


# ---------------------------------------------------------------- measured choice among code families

RERANK_MARGIN = 0.02    # re-rank stays on unless the codes alone beat the target by this much on the sample
MEASURE_BASE = 20000    # sample vectors indexed per candidate (the rest of a bigger sample is not used)
MEASURE_QUERIES = 200   # sample vectors used as queries (not indexed)
RABITQ_MAX_BITS = 9     # faiss 1.15: RaBitQ codes have 1..9 bits per dimension
MIN_MEASURE_SAMPLE = 2 * MIN_POINTS_PER_LIST + 2  # fewer vectors: the static rule decides


def _divisors_desc(d: int, most: int) -> List[int]:
    return [m for m in range(min(d, most), 0, -1) if d % m == 0]


def candidate_keys(n: int, d: int, budget_bytes: int, train_n: Optional[int] = None,
                   auto_key: Optional[str] = None, gpu: bool = False) -> List[str]:
    """The IVF keys a measured choice compares: per code family the largest code that fits the budget.

    Families: Flat, SQ8, RaBitQ{b} and RaBitQfs{b} (not with `gpu`: the GPU wheel cannot read them),
    PQ{m}x4fs (m | d, at least 2 dimensions per sub-quantizer), and below SQ8's bytes PQ{m}x8 (autofaiss's
    IVF-PQ key when it gave one): above them SQ8 holds every dimension at 8 bits for the same bytes, and PQ
    codebook training is the slowest part of a build. Empty when not even a PQ4 code fits."""
    nlist = nlist_for(n, train_n)
    code = budget_bytes / max(int(n), 1) - ID_BYTES
    ivf = f"IVF{nlist}"
    out: List[str] = []

    def fits(key: str) -> bool:
        return key_cost(key, d).code_size <= code

    for key in (f"{ivf},Flat", f"{ivf},SQ8"):
        if fits(key):
            out.append(key)
    if not gpu:
        for fs in ("", "fs"):
            for b in range(RABITQ_MAX_BITS, 0, -1):
                key = f"{ivf},RaBitQ{fs}{b if b > 1 else ''}"
                if fits(key):
                    out.append(key)
                    break
    for m in _divisors_desc(d, d // 2):
        if m % 2 == 0 and m / 2 <= code:  # 4-bit fast-scan codes pack two sub-quantizers per byte
            out.append(f"{ivf},PQ{m}x4fs")
            break
    if f"{ivf},SQ8" not in out:
        if auto_key and is_ivf(auto_key) and "PQ" in auto_key and "fs" not in auto_key:
            key = re.sub(r"IVF(\d+)", lambda g: f"IVF{min(int(g.group(1)), nlist_cap(train_n))}", auto_key, count=1)
            if fits(key):
                out.append(key)
        if not any(re.search(r",PQ\d+(x8)?$", k) for k in out):
            for m in _divisors_desc(d, min(256, d // 2)):
                if m <= code:
                    out.append(f"{ivf},PQ{m}x8")
                    break
    return out


def family_of(key: str) -> str:
    """The code family of an IVF key: flat, sq8, rabitq, rabitq-fs, pq4fs, pq (OPQ/PQ), other."""
    code = key.split(",")[-1]
    for pattern, fam in ((r"Flat$", "flat"), (r"SQ8$", "sq8"), (r"RaBitQfs\d*$", "rabitq-fs"),
                         (r"RaBitQ\d*$", "rabitq"), (r"PQ\d+x4fs", "pq4fs"), (r"PQ\d+", "pq")):
        if re.search(pattern, code):
            return fam
    return "other"


def _recall(I: np.ndarray, gt: np.ndarray, k: int) -> float:
    k = min(k, I.shape[1], gt.shape[1])
    return float(np.mean([len(np.intersect1d(a[:k], b[:k])) for a, b in zip(I, gt)]) / k)


def measure_candidates(xs: np.ndarray, keys: Sequence[str], K: int, target: float, metric: str = "ip",
                       rerank: str = "auto", queries: int = MEASURE_QUERIES, base: int = MEASURE_BASE,
                       seed: int = 0) -> List[dict]:
    """One row per key: its cheapest setting on the sample that reaches `target` (recall at min(K, 10) and at
    K against exact search), else its best one.

    The sample is split into `queries` query vectors and at most `base` indexed vectors; each key is built
    with the sample's own list count (`sample_nlist`: the comparison is between codes, not list counts),
    searched over nprobe 1, 2, 4, ... and re-rank depths (0 = codes decide; max(K, 50) x 1 and x 4 when
    `rerank` is auto, without 0 when it is "true", none for exact codes or "false"). `ms_per_query` is CPU
    time on one thread (process time, so other processes on the machine do not inflate it), re-ranking
    included. Row fields: key (the full-size key), family, bytes_per_item (faiss's code + id), nprobe,
    rerank_k, recall, reached, plain_recall (best recall without re-rank), ms_per_query, sample,
    sample_nlist."""
    from pipeline.index.rerank import rerank as rerank_fn

    xs = np.ascontiguousarray(xs, dtype=np.float32)
    if len(xs) < MIN_MEASURE_SAMPLE:
        raise UserError(f"a measured index choice needs a sample of at least {MIN_MEASURE_SAMPLE} "
                        f"vectors, got {len(xs)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(xs))
    nq = min(int(queries), len(xs) // 4)
    xq = xs[order[:nq]]
    xb = xs[order[nq:nq + int(base)]]
    ids = np.arange(len(xb), dtype=np.int64)  # sorted, as the re-rank stage needs
    d = xs.shape[1]
    K = max(1, min(int(K), len(xb)))
    kk = max(K, min(10, len(xb)))
    mt = metric_of(metric)
    gt = faiss.knn(xq, xb, kk, metric=mt)[1]
    nlist_s = max(1, min(nlist_for(len(xb)), len(xb) // MIN_POINTS_PER_LIST))
    ladder = [1 << i for i in range(int(math.log2(nlist_s)) + 1)]
    if ladder[-1] != nlist_s:
        ladder.append(nlist_s)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    rows = []
    try:
        for key in keys:
            skey = re.sub(r"IVF\d+", f"IVF{nlist_s}", key, count=1)
            index = faiss.index_factory(d, skey, mt)
            index.train(xb)
            index.add_with_ids(xb, ids)
            base_depth = max(K, 50)
            if code_is_exact(key) or rerank == "false":
                depths = [0]
            else:
                depths = ([0] if rerank != "true" else []) + [min(base_depth, len(xb)), min(4 * base_depth, len(xb))]
            best, best_any, plain = None, None, 0.0
            for depth in dict.fromkeys(depths):
                for nprobe in ladder:
                    params = faiss.SearchParametersIVF(nprobe=nprobe)
                    t0 = time.process_time()
                    _, I = index.search(xq, max(kk, depth), params=params)
                    if depth:
                        _, I = rerank_fn(xq, I, ids, xb, kk, metric)
                    ms = (time.process_time() - t0) * 1000 / len(xq)
                    r = min(_recall(I, gt, min(K, 10)), _recall(I, gt, K))
                    row = {"nprobe": nprobe, "rerank_k": depth, "recall": r, "ms_per_query": ms}
                    if depth == 0:
                        plain = max(plain, r)
                    if best_any is None or r > best_any["recall"]:
                        best_any = row
                    if r >= target:
                        if best is None or ms < best["ms_per_query"]:
                            best = row
                        break  # more lists only cost more
            cost = key_cost(key, d, metric)
            chosen = best or best_any
            rows.append({"key": key, "family": family_of(key), "bytes_per_item": cost.bytes_per_item,
                         **chosen, "reached": best is not None, "plain_recall": plain,
                         "sample": len(xb), "sample_nlist": nlist_s})
    finally:
        faiss.omp_set_num_threads(threads)
    return rows


def pick(rows: Sequence[dict]) -> dict:
    """Recall first: among rows that reached the target the lowest CPU time per query (then fewer bytes);
    when none did, the best recall (then fewer bytes)."""
    reached = [r for r in rows if r["reached"]]
    if reached:
        return min(reached, key=lambda r: (r["ms_per_query"], r["bytes_per_item"]))
    return max(rows, key=lambda r: (r["recall"], -r["bytes_per_item"]))


def _rerank_pays(setting: str, row: dict, target: float) -> bool:
    """Whether a measured winner keeps the re-rank stage: forced by the setting, or (auto) its codes are not
    exact and it needed re-ranking, or reached the target without it by less than RERANK_MARGIN."""
    if setting in ("true", "false"):
        return setting == "true"
    if code_is_exact(row["key"]):
        return False
    return row["rerank_k"] > 0 or row["plain_recall"] < target + RERANK_MARGIN


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

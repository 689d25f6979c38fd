"""Recall of the approximate search against exact search, and the choice of nprobe from it.

`recall_table` searches held-out queries at increasing nprobe (1, 2, 4, ... up to nlist) and reports, for
each, recall@10 and recall@100 (fraction of the exact top-k ids found in the approximate top-k), the p50
latency of a single-query search and the batch throughput. `choose_nprobe` takes the smallest nprobe whose
recall@10 reaches the target within the latency limit (else the best recall within the limit, with a warning).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Iterable, List, Tuple

import faiss
import numpy as np

from pipeline.index.keys import metric_of

log = logging.getLogger("vmem.index")


def exact_knn(xq: np.ndarray, chunks: Iterable[Tuple[np.ndarray, np.ndarray]], k: int,
              metric: str = "ip") -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k (D, external ids) of `xq` over (xb, ids) chunks: brute force, merged chunk by chunk."""
    from pipeline.index.router import merge_topk

    keep_max = metric == "ip"
    mt = metric_of(metric)
    D = I = None
    for xb, ids in chunks:
        kk = min(k, len(xb))
        Dc, Ic = faiss.knn(np.ascontiguousarray(xq, np.float32), np.ascontiguousarray(xb, np.float32), kk,
                           metric=mt)
        Ic = np.where(Ic >= 0, np.asarray(ids, np.int64)[np.maximum(Ic, 0)], -1)
        if D is None:
            D, I = merge_topk([Dc], [Ic], k, keep_max)
        else:
            D, I = merge_topk([D, Dc], [I, Ic], k, keep_max)
    assert D is not None, "no base vectors"
    return D, I


def recall_at(I: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k."""
    k = min(k, I.shape[1], gt.shape[1])
    hits = [len(np.intersect1d(a[:k][a[:k] >= 0], b[:k][b[:k] >= 0])) for a, b in zip(I, gt)]
    return float(np.mean(hits) / k)


def nprobe_candidates(nlist: int) -> List[int]:
    out, p = [], 1
    while p < nlist:
        out.append(p)
        p *= 2
    return out + [nlist]


def recall_table(search: Callable[[np.ndarray, int, int], np.ndarray], xq: np.ndarray, gt: np.ndarray,
                 nlist: int, target: float = 0.95, latency_queries: int = 20) -> List[Dict[str, float]]:
    """Rows {nprobe, recall@10, recall@100, p50_ms, qps}; `search(xq, k, nprobe) -> I`.

    Stops once two successive rows have recall@10 >= min(0.999, target + 0.04), or once recall@10 has gained
    less than 0.002 over two doublings (the codes cap recall): beyond that higher nprobe only costs time.
    """
    rows = []
    kmax = min(100, gt.shape[1])
    for nprobe in nprobe_candidates(nlist):
        t0 = time.perf_counter()
        I = search(xq, kmax, nprobe)
        batch_s = time.perf_counter() - t0
        lat = []
        for q in xq[:latency_queries]:
            t1 = time.perf_counter()
            search(q[None, :], 10, nprobe)
            lat.append((time.perf_counter() - t1) * 1000)
        rows.append({"nprobe": nprobe, "recall@10": recall_at(I, gt, 10), "recall@100": recall_at(I, gt, 100),
                     "p50_ms": float(np.median(lat)) if lat else 0.0, "qps": len(xq) / max(batch_s, 1e-9)})
        enough = min(0.999, target + 0.04)
        if len(rows) > 1 and rows[-1]["recall@10"] >= enough and rows[-2]["recall@10"] >= enough:
            break
        if len(rows) > 2 and rows[-1]["recall@10"] - rows[-3]["recall@10"] < 0.002:
            break
    return rows


def choose_nprobe(rows: List[Dict[str, float]], target: float, max_latency_ms: float) -> int:
    """Smallest nprobe with recall@10 >= target and p50 <= max_latency_ms; else the best recall in budget."""
    ok = [r for r in rows if r["p50_ms"] <= max_latency_ms] or rows[:1]
    for r in ok:
        if r["recall@10"] >= target:
            return int(r["nprobe"])
    best = max(ok, key=lambda r: r["recall@10"])
    log.warning("no nprobe reaches recall@10 %.3f within %.1f ms (best %.3f at nprobe %d): the index codes cap "
                "recall; raise index.max_index_memory or set a finer index.index_key", target, max_latency_ms,
                best["recall@10"], best["nprobe"])
    return int(best["nprobe"])


def format_table(rows: List[Dict[str, float]], chosen: int) -> str:
    lines = ["nprobe  recall@10  recall@100  p50 ms/query  batch QPS"]
    for r in rows:
        mark = "  <- chosen" if r["nprobe"] == chosen else ""
        lines.append(f"{r['nprobe']:>6}  {r['recall@10']:>9.4f}  {r['recall@100']:>10.4f}  {r['p50_ms']:>12.2f}"
                     f"  {r['qps']:>9.0f}{mark}")
    return "\n".join(lines)

"""Recall of the approximate search against exact search, where votes happen, and the choice of settings.

Votes read up to K = max(memory.k, eval.ks) neighbours, so recall is measured at K as well as at 10.
`settings_table` searches held-out queries over a grid of settings (nprobe 1, 2, 4, ... up to nlist; re-rank
depth `rerank_k` from `rerank_ladder`) and reports, for each: recall@10 and recall@K (fraction of the exact
top-k ids found), `recall` = the smaller of the two, `vote_agree` = the lowest rate, over the vote depths
k <= K, at which the plurality vote of the ANN neighbours equals the vote of the exact neighbours, the p50
latency of a single-query search and the batch throughput.

`choose_setting` takes the cheapest setting whose `recall` reaches the target within the latency budget
(lowest p50 among those not dominated by one with fewer lists and fewer candidates); when none does, the
BEST recall within the budget (never a lower one; over budget only when nothing fits), and says so;
`strict=True` raises a UserError instead.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import faiss
import numpy as np

from pipeline.errors import UserError
from pipeline.index.keys import metric_of

log = logging.getLogger("vmem.index")


def exact_knn(xq: np.ndarray, chunks: Iterable[Tuple[np.ndarray, np.ndarray]], k: int,
              metric: str = "ip") -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k (D, external ids) of `xq` over (xb, ids) chunks: brute force, merged chunk by chunk."""
    from pipeline.index.neighbors import merge_topk

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


def rerank_ladder(K: int, items_per_shard: int, enabled: bool, fixed: int = 0) -> List[int]:
    """Re-rank depths to try: [0] without re-ranking, [fixed] when configured, else max(K, 50) * 1, 2, 4, 8, 16
    (each at most the shard size: deeper than every item adds nothing)."""
    if not enabled:
        return [0]
    if fixed:
        return [int(fixed)]
    base = max(int(K), 50)
    cap = max(int(items_per_shard), base)
    return sorted({min(base << i, cap) for i in range(5)})


def plurality(labels: np.ndarray) -> np.ndarray:
    """Plurality vote per row of `labels` (nq, k) (-1 = no neighbour): the paper's tie rule, the class that
    reached the top count first (scanning ranks) wins; -1 for rows without neighbours."""
    nq, k = labels.shape
    classes, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(nq, k)
    counts = np.zeros((nq, len(classes)), np.int32)
    best = np.zeros(nq, np.int32)
    winner = np.full(nq, -1, np.int64)
    rows = np.arange(nq)
    for r in range(k):
        lab = labels[:, r]
        c = dense[:, r]
        counts[rows, c] += lab >= 0
        cnt = counts[rows, c]
        take = (lab >= 0) & (cnt > best)
        best = np.where(take, cnt, best)
        winner = np.where(take, lab, winner)
    return winner


def vote_agreement(ann_labels: np.ndarray, exact_labels: np.ndarray, ks: Sequence[int]) -> Dict[int, float]:
    """Per k: the fraction of queries whose plurality vote over the first k ANN neighbours equals the vote
    over the first k exact neighbours."""
    return {int(k): float(np.mean(plurality(ann_labels[:, :k]) == plurality(exact_labels[:, :k]))) for k in ks}


Search = Callable[[np.ndarray, int, int, int], Tuple[np.ndarray, np.ndarray]]


def measure(search: Search, xq: np.ndarray, gt: np.ndarray, gt_labels: np.ndarray, nprobe: int, rerank_k: int,
            ks: Sequence[int], k_latency: int = 10, latency_queries: int = 20) -> Dict[str, float]:
    """One row of the settings table; `search(xq, k, nprobe, rerank_k) -> (I, labels)`."""
    K = gt.shape[1]
    t0 = time.perf_counter()
    I, labels = search(xq, K, nprobe, rerank_k)
    batch_s = time.perf_counter() - t0
    lat = []
    for q in xq[:latency_queries]:
        t1 = time.perf_counter()
        search(q[None, :], k_latency, nprobe, rerank_k)
        lat.append((time.perf_counter() - t1) * 1000)
    agree = vote_agreement(labels, gt_labels, [k for k in ks if k <= K] or [K])
    worst_k = min(agree, key=agree.get)
    r10, rK = recall_at(I, gt, 10), recall_at(I, gt, K)
    return {"nprobe": int(nprobe), "rerank_k": int(rerank_k), "K": int(K), "recall@10": r10, f"recall@{K}": rK,
            "recall": min(r10, rK), "vote_agree": agree[worst_k], "vote_agree_k": int(worst_k),
            "p50_ms": float(np.median(lat)) if lat else 0.0, "qps": len(xq) / max(batch_s, 1e-9)}


def settings_table(search: Search, xq: np.ndarray, gt: np.ndarray, gt_labels: np.ndarray, nlist: int,
                   ladder: Sequence[int], ks: Sequence[int], target: float = 0.95,
                   k_latency: int = 10) -> List[Dict[str, float]]:
    """Rows of `measure` over nprobe x re-rank depth (see module docstring).

    Early stops (each only skips settings that cost more and cannot gain): at one nprobe, deeper re-ranking
    stops once recall reaches min(0.999, target + 0.04) or gains < 0.002; nprobe stops once two successive
    values reach that, or once the best recall gained < 0.002 over two doublings (the codes cap recall).
    """
    enough = min(0.999, target + 0.04)
    rows: List[Dict[str, float]] = []
    best_per_nprobe: List[float] = []
    for nprobe in nprobe_candidates(nlist):
        here: List[float] = []
        for rk in ladder:
            row = measure(search, xq, gt, gt_labels, nprobe, rk, ks, k_latency)
            rows.append(row)
            here.append(row["recall"])
            if row["recall"] >= enough or (len(here) > 1 and here[-1] - here[-2] < 0.002):
                break
        best_per_nprobe.append(max(here))
        b = best_per_nprobe
        if len(b) > 1 and b[-1] >= enough and b[-2] >= enough:
            break
        if len(b) > 2 and b[-1] - b[-3] < 0.002:
            break
    return rows


def choose_setting(rows: List[Dict[str, float]], target: float, max_latency_ms: float,
                   strict: bool = False) -> Tuple[Dict[str, float], str]:
    """(chosen row, status) per the module docstring; status says whether the target was met and how."""
    def recall(r):
        return r.get("recall", r["recall@10"])

    in_budget = [r for r in rows if r["p50_ms"] <= max_latency_ms]
    pool = in_budget or rows
    ok = [r for r in pool if recall(r) >= target]
    if ok:
        # A setting with both fewer lists and fewer candidates than another costs less whatever one noisy
        # latency sample says: compare p50 only among the settings no other one dominates.
        def dominated(r):
            return any(o is not r and o["nprobe"] <= r["nprobe"] and o.get("rerank_k", 0) <= r.get("rerank_k", 0)
                       for o in ok)
        front = [r for r in ok if not dominated(r)] or ok
        best = min(front, key=lambda r: (r["p50_ms"], r["nprobe"], r.get("rerank_k", 0)))
        return best, "target met"
    best = max(pool, key=lambda r: (recall(r), -r["p50_ms"]))
    where = "within" if in_budget else "and no setting is within"
    status = (f"below target: best recall {recall(best):.4f} < {target} {where} the {max_latency_ms:g} ms budget "
              f"(nprobe {best['nprobe']}, rerank_k {best.get('rerank_k', 0)})")
    advice = ("the index codes cap recall: raise index.max_index_memory (finer codes), turn on index.rerank / "
              "raise index.rerank_k, raise index.max_latency_ms, or lower index.target_recall")
    if strict:
        raise UserError(f"index.strict_recall is true and no search setting reaches recall {target}: {status}; "
                        f"{advice}")
    log.warning("%s; %s", status, advice)
    return best, status


def choose_nprobe(rows: List[Dict[str, float]], target: float, max_latency_ms: float) -> int:
    """nprobe of `choose_setting`'s choice."""
    return int(choose_setting(rows, target, max_latency_ms)[0]["nprobe"])


def format_table(rows: List[Dict[str, float]], chosen=None) -> str:
    """The settings table as text; marks rows flagged `chosen` (else rows whose nprobe equals `chosen`)."""
    flagged = any(r.get("chosen") for r in rows)
    K = int(rows[0].get("K", 100)) if rows else 100
    deep = K != 10  # a recall@K column only when votes read deeper than 10
    lines = [f"nprobe  rerank_k  recall@10{f'  recall@{K:<3d}' if deep else ''}  vote agree (k)  p50 ms/query"
             f"  batch QPS"]
    for r in rows:
        mark = r.get("chosen") if flagged else r["nprobe"] == chosen
        agree = f"{r['vote_agree']:.4f} ({r['vote_agree_k']})" if "vote_agree" in r else "-"
        rk = r.get(f"recall@{K}", r.get("recall@100", float("nan")))
        lines.append(f"{r['nprobe']:>6}  {r.get('rerank_k', 0):>8}  {r['recall@10']:>9.4f}"
                     f"{f'  {rk:>10.4f}' if deep else ''}  {agree:>14}  {r['p50_ms']:>12.2f}  {r['qps']:>9.0f}"
                     f"{'  <- chosen' if mark else ''}")
    return "\n".join(lines)

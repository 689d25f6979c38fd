"""Rerank study: what the reranker (`memory.reranker`, e.g. `encoder`) buys in accuracy and costs in latency.

The first `n` query images of `cfg.eval.split` are classified one at a time (latency per query), each from
the same search, without and with the reranker; accuracy per vote method at k. The neighbours' images come
from an in-RAM map of the memory's WebDataset shards read once up front, so the latency counts re-embedding,
not tar scans (`Snapshot.load_image` reads a tar member per call).
"""
from __future__ import annotations

import csv
import io
import itertools
import time
from typing import Callable, Dict, List, Sequence

import logging

import numpy as np

from pipeline import storage
from pipeline.memory import rerankers
from pipeline.memory.snapshot import Snapshot

log = logging.getLogger("vmem.eval")


def query_images(cfg, n: int):
    """(images as bytes, labels) of the first `n` samples of the eval split's shards."""
    from pipeline.data.shards import iter_split_samples

    samples = list(itertools.islice(iter_split_samples(cfg.shards_dir(cfg.eval.split)), n))
    return [s["image"] for s in samples], np.array([s["label"] for s in samples], np.int64)


def shard_images(cfg, snap: Snapshot) -> Dict[int, bytes]:
    """id -> image bytes of every sample of the split the memory was built from (one pass over its shards)."""
    from pipeline.data.shards import iter_split_samples

    split = snap.base.manifest.build.get("split") or "train"
    if not storage.exists(cfg.shards_dir(split)):
        return {}
    return {int(s["id"]): s["image"] for s in iter_split_samples(cfg.shards_dir(split))}


def rerank_study(snap: Snapshot, embed: Callable, images: List[bytes], yq: np.ndarray, k: int,
                 methods: Sequence[str], reranker: rerankers.Reranker, load_image) -> dict:
    """Accuracy per method and latency per query (ms, mean and p50) without / with `reranker`; `embed(images)`
    gives the memory encoder's unit vectors of query images."""
    n = max(k, snap.cfg.memory.rerank_k)
    preds: Dict[str, Dict[str, list]] = {"none": {m: [] for m in methods}, "reranked": {m: [] for m in methods}}
    ms: Dict[str, list] = {"none": [], "reranked": []}
    moved = []
    for q, im in enumerate(images):
        if q and q % 50 == 0:
            log.info("rerank study: %d/%d queries", q, len(images))
        t0 = time.perf_counter()
        nb = snap.search(embed([im]), n)
        t1 = time.perf_counter()
        order, weights = reranker.rerank([im], None, nb, load_image)
        rb = rerankers.reorder(nb, order, weights, k)
        t2 = time.perf_counter()
        ms["none"].append(1000 * (t1 - t0))
        ms["reranked"].append(1000 * (t2 - t0))
        moved.append(int(np.setdiff1d(rb.I[0], nb.I[0, :k]).size))
        for name, x in (("none", nb.first(k)), ("reranked", rb)):
            for m in methods:
                preds[name][m].append(int(snap.vote(x, m).label[0]))
    acc = {name: {m: float(np.mean(np.array(p) == yq)) for m, p in d.items()} for name, d in preds.items()}
    lat = {name: {"mean_ms": float(np.mean(v)), "p50_ms": float(np.median(v))} for name, v in ms.items()}
    return {"study": "rerank", "n": len(images), "k": k, "candidates": n, "accuracy": acc, "latency": lat,
            "mean_new_neighbours": float(np.mean(moved)), "encoder": getattr(reranker, "encoder", None)
            and reranker.encoder.name}


def format_rerank(r: dict) -> str:
    lines = [f"rerank study: {r['n']} query images one at a time, {r['candidates']} candidates re-ranked by "
             f"{r['encoder'] or 'the reranker'}, vote over the first k={r['k']}; on average "
             f"{r['mean_new_neighbours']:.1f} of the k voters are new after re-ranking",
             f"{'':10s} " + " ".join(f"{m:>10s}" for m in r["accuracy"]["none"]) + f" {'mean ms':>9s} {'p50 ms':>8s}"]
    for name in ("none", "reranked"):
        lines.append(f"{name:10s} " + " ".join(f"{100 * a:10.2f}" for a in r["accuracy"][name].values())
                     + f" {r['latency'][name]['mean_ms']:9.1f} {r['latency'][name]['p50_ms']:8.1f}")
    return "\n".join(lines)


def rerank_csv(r: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["reranker", "method", "k", "candidates", "accuracy", "mean_ms", "p50_ms", "n"])
    for name in ("none", "reranked"):
        for m, a in r["accuracy"][name].items():
            w.writerow([name, m, r["k"], r["candidates"], f"{a:.6f}", f"{r['latency'][name]['mean_ms']:.3f}",
                        f"{r['latency'][name]['p50_ms']:.3f}", r["n"]])
    return buf.getvalue()


def run_rerank(cfg, snap: Snapshot, embed: Callable, n: int, out_dir: str) -> dict:
    """The rerank study with the configured reranker (default `encoder`) on `n` eval images; writes rerank.csv."""
    name = cfg.memory.reranker or "encoder"
    rr = rerankers.create_reranker(name, cfg, snap.base.image_size)
    images, yq = query_images(cfg, n)
    cache = shard_images(cfg, snap)
    r = rerank_study(snap, lambda ims: embed(images=ims), images, yq, cfg.memory.k, ("plurality", "rank", "softmax"),
                     rr, lambda i: cache[int(i)] if int(i) in cache else snap.load_image(i))
    r["reranker"] = name
    storage.atomic_write_bytes(storage.join(out_dir, "rerank.csv"), rerank_csv(r).encode())
    return r

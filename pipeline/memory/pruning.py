"""Memory pruning (paper): the memory queries itself, self-match dropped, and counts for each item v = how
often it appears as a neighbour of an item with a different label.

- hard pruning: tombstone items with v >= threshold, v counted over `hard_k` (100) neighbours;
- soft pruning: gamma = 1 if v == 0 else 1.75 / (1 + v), v counted over `soft_k` (10) neighbours, committed
  as a versioned overlay that the soft_* vote methods read.

The self-queries run as a Ray job mapped over the shards (plus one task for the delta): each task opens the
memory at its newest version, reconstructs its shard's vectors, searches the whole memory with them
and returns only the non-zero counts it saw. No process holds all vectors or all metadata: the driver holds
the counts of items with v > 0 (gamma of every other item is 1, which is what the overlay returns for ids it
does not list).
"""
from __future__ import annotations

import logging
from typing import Optional

import faiss
import numpy as np
from tqdm import tqdm

from pipeline.config import from_dict, to_dict
from pipeline.errors import NotFound
from pipeline.index.shard import index_ids, read_index, read_meta
from pipeline.memory import deletes
from pipeline.memory.overlays import save_gamma
from pipeline.memory.snapshot import Follower, Snapshot
from pipeline.memory.state import MemoryState
from pipeline.runtime import init_ray, phase

log = logging.getLogger("vmem.pruning")


def soft_gamma(v: np.ndarray) -> np.ndarray:
    """gamma(v) = 1 if v == 0 else 1.75 / (1 + v)."""
    v = np.asarray(v, dtype=np.float64)
    return np.where(v == 0, 1.0, 1.75 / (1.0 + v))


def wrong_label_counts(q_ids: np.ndarray, q_labels: np.ndarray, I: np.ndarray, labels: np.ndarray, k: int):
    """v contributions: for each query, drop its self match (else the last column), keep k neighbours, and
    count neighbours whose label differs from the query's. Returns the ids of those neighbours (one per count)."""
    self_hit = I == q_ids[:, None]
    # Rows without a self match (ANN missed it) drop their last column instead, keeping exactly k.
    drop = np.where(self_hit.any(axis=1), self_hit.argmax(axis=1), I.shape[1] - 1)
    keep = np.ones(I.shape, bool)
    keep[np.arange(len(I)), drop] = False
    I2 = I[keep].reshape(len(I), -1)[:, :k]
    L2 = labels[keep].reshape(len(I), -1)[:, :k]
    wrong = (L2 != q_labels[:, None]) & (I2 >= 0)
    return I2[wrong]


def shard_vectors(index) -> tuple:
    """(ids, xb) stored in a populated shard index (IVF: reconstructed by id; IDMap: in id-map order)."""
    ids = index_ids(index)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is None:
        inner = faiss.downcast_index(index).index
        return ids, inner.reconstruct_n(0, inner.ntotal) if len(ids) else np.zeros((0, index.d), np.float32)
    # A hashtable direct map lets faiss reconstruct by external id (ids are not 0..n-1).
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    return ids, index.reconstruct_batch(ids) if len(ids) else np.zeros((0, index.d), np.float32)


def live_labels(snap: Snapshot) -> dict:
    """id -> current label of every live item (shard metadata + delta, deleted ids out, relabels in)."""
    base = snap.base
    label_of = {}
    for s in base.manifest.shards:
        meta = read_meta(base.store.url(s.meta_path), s.meta_sha256)
        label_of.update(zip(meta.column("id").to_pylist(), meta.column("label").to_pylist()))
    d_ids = snap.delta.ids()
    label_of.update(zip(d_ids.tolist(), snap.delta.metadata(d_ids)["labels"].tolist()))
    for i in snap.forgotten.tolist():
        label_of.pop(int(i), None)
    for i, it in snap.interventions.items.items():
        if "label" in it and int(i) in label_of:
            label_of[int(i)] = int(it["label"])
    return label_of


def memory_vectors(snap: Snapshot):
    """(ids, labels, xb) of every live item: shard vectors reconstructed from the indexes, plus the delta.
    Labels are the current ones (relabels applied)."""
    base = snap.base
    ids_all, xb_all = [], []
    for s in base.manifest.shards:
        ids, xb = shard_vectors(read_index(base.store.url(s.path), s.sha256, mmap=False))
        ids_all.append(ids)
        xb_all.append(xb)
    d_ids, d_xb = snap.delta.vectors()
    ids = np.concatenate([*ids_all, d_ids])
    xb = np.vstack([*xb_all, d_xb]).astype(np.float32)
    _, first = np.unique(ids, return_index=True)  # a folded row can still be in the delta for a moment
    live = np.zeros(len(ids), bool)
    live[first] = True
    live &= ~np.isin(ids, snap.forgotten)
    ids, xb = ids[live], xb[live]
    label_of = live_labels(snap)
    return ids, np.array([label_of[int(i)] for i in ids], np.int64), xb


def _counts(ids: np.ndarray) -> tuple:
    u, c = np.unique(np.asarray(ids, np.int64), return_counts=True)
    return u, c


def _prune_part(memory_dir: str, cfg: dict, shard: Optional[int], kmax: int, soft_k: int, hard_k: int, nprobe,
                batch_size: int, attempts: int = 3) -> dict:
    """One Ray task: self-query the live items of one shard (`None`: the delta); non-zero counts only.

    The task follows the memory's newest version instead of pinning the driver's, so a compaction that
    commits and erases while it runs never leaves it reading swept files (it starts again instead)."""
    for attempt in range(attempts):
        try:
            return _prune_part_once(memory_dir, cfg, shard, kmax, soft_k, hard_k, nprobe, batch_size)
        except (NotFound, FileNotFoundError):
            if attempt == attempts - 1:
                raise


def _prune_part_once(memory_dir: str, cfg: dict, shard: Optional[int], kmax: int, soft_k: int, hard_k: int,
                     nprobe, batch_size: int) -> dict:
    follower = Follower(memory_dir, from_dict(cfg), MemoryState(memory_dir))
    snap = follower.current
    try:
        if shard is None:
            ids, xb = snap.delta.vectors()
            labels = snap.delta.metadata(ids)["labels"]
        elif shard >= snap.base.num_shards:  # a rebuild changed the shard count meanwhile
            return {"items": 0, "soft": _counts([]), "hard": _counts([])}
        else:
            e = snap.base.manifest.shards[shard]
            ids, xb = shard_vectors(read_index(snap.base.store.url(e.path), e.sha256, mmap=False))
            meta = read_meta(snap.base.store.url(e.meta_path), e.meta_sha256)
            pos = np.searchsorted(meta.column("id").to_numpy(), ids)  # meta is sorted by id
            labels = meta.column("label").to_numpy()[pos]
        live = ~np.isin(ids, snap.forgotten)
        ids, xb, labels = ids[live], xb[live], labels[live]
        labels = snap.interventions.relabel(ids[None], labels[None], labels[None].astype(object))[0][0]
        soft, hard = [], []
        for s in range(0, len(ids), batch_size):
            nb = snap.search(xb[s:s + batch_size], kmax + 1, nprobe=nprobe)
            q_ids, q_labels = ids[s:s + batch_size], labels[s:s + batch_size]
            soft.append(wrong_label_counts(q_ids, q_labels, nb.I, nb.labels, soft_k))
            hard.append(wrong_label_counts(q_ids, q_labels, nb.I, nb.labels, hard_k))
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
        return {"items": int(len(ids)), "soft": _counts(cat(soft)), "hard": _counts(cat(hard))}
    finally:
        follower.close()


def _sum_counts(parts: list) -> tuple:
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    c = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    u, inv = np.unique(ids, return_inverse=True)
    return u, np.bincount(inv, weights=c, minlength=len(u)).astype(np.int64)


def prune(state: MemoryState, snap: Snapshot, hard: bool = True, soft: bool = True, soft_k: Optional[int] = None,
          hard_k: int = 100, threshold: Optional[int] = None, batch_size: int = 4096, nprobe: Optional[int] = None,
          dry_run: bool = False) -> dict:
    """Self-query the memory on Ray (a task per shard), apply hard and/or soft pruning. Returns a report whose
    `ids`, `v_soft`, `v_hard` list the items with a non-zero count (every other item has v = 0)."""
    import ray  # lazy: importing Ray costs about a second, and only pruning needs it here

    cfg = snap.cfg
    soft_k = int(soft_k or cfg.memory.prune_k)
    threshold = int(threshold if threshold is not None else cfg.memory.hard_prune_threshold)
    if not ray.is_initialized():
        init_ray(cfg)
    kmax = max(soft_k, hard_k if hard else 0)
    task = ray.remote(_prune_part)
    parts = [*range(snap.base.num_shards), None]
    with phase(f"pruning self-query (k={kmax}+1) on Ray, {len(parts)} tasks"):
        refs = [task.remote(snap.memory_dir, to_dict(cfg), p, kmax, soft_k, hard_k, nprobe, batch_size)
                for p in parts]
        results = [ray.get(r) for r in tqdm(refs, desc="self-query shards", disable=len(refs) < 3)]
    n_items = sum(r["items"] for r in results)
    s_ids, s_v = _sum_counts([r["soft"] for r in results])
    h_ids, h_v = _sum_counts([r["hard"] for r in results])
    ids = np.union1d(s_ids, h_ids)
    v_soft = np.zeros(len(ids), np.int64)
    v_soft[np.searchsorted(ids, s_ids)] = s_v
    v_hard = np.zeros(len(ids), np.int64)
    v_hard[np.searchsorted(ids, h_ids)] = h_v
    report = {"items": int(n_items), "soft_k": soft_k, "hard_k": hard_k, "threshold": threshold,
              "v_soft_mean": float(v_soft.sum() / max(n_items, 1)), "items_with_v_gt0": int((v_soft > 0).sum())}
    if soft:
        keep = v_soft > 0
        gamma = soft_gamma(v_soft[keep])
        report["gamma_version"] = None if dry_run else save_gamma(state, ids[keep], v_soft[keep], gamma)
        report["gamma_mean"] = float((gamma.sum() + (n_items - keep.sum())) / max(n_items, 1))
    if hard:
        victims = ids[v_hard >= threshold]
        report["hard_pruned"] = int(len(victims))
        if not dry_run and len(victims):
            deletes.forget(state, snap, victims.tolist(), reason="hard_prune")
    if not dry_run:
        state.record("prune", f"soft={soft} hard={hard}: {report.get('hard_pruned', 0)} pruned, "
                                  f"{int((v_soft > 0).sum())} item(s) with gamma < 1")
    report["v_soft"] = v_soft
    report["v_hard"] = v_hard
    report["ids"] = ids
    return report

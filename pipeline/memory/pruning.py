"""Memory pruning (paper): the memory queries itself, self-match dropped, and counts for each item v = how
often it appears as a neighbour of an item with a different label.

- hard pruning: tombstone items with v >= threshold, v counted over `hard_k` (100) neighbours;
- soft pruning: gamma = 1 if v == 0 else 1.75 / (1 + v), v counted over `soft_k` (10) neighbours, committed
  as a versioned overlay that the soft_* vote methods read.

The self-queries run as Ray tasks, one per batch of the memory's vectors (shard vectors reconstructed from the
shard indexes, plus the delta), each opening the memory's searchers in its worker.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from pipeline.memory.overlays import save_gamma
from pipeline.runtime import phase

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
    import faiss

    from pipeline.index.shard import index_ids

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


def live_labels(mem) -> dict:
    """id -> current label of every live item (shard metadata + delta, forgotten ids out, relabels in)."""
    from pipeline.index.shard import read_meta

    base = mem.base
    label_of = {}
    for s in base.manifest.shards:
        meta = read_meta(base.store.url(s.meta_path), s.meta_sha256)
        label_of.update(zip(meta.column("id").to_pylist(), meta.column("label").to_pylist()))
    label_of.update({int(i): m["label"] for i, m in mem.delta.meta.items()})
    for i in mem.forgotten.tolist():
        label_of.pop(int(i), None)
    for i, it in mem.interventions.items.items():
        if "label" in it and int(i) in label_of:
            label_of[int(i)] = int(it["label"])
    return label_of


def memory_vectors(mem):
    """(ids, labels, xb) of every live item: shard vectors reconstructed from the indexes, plus the delta.
    Labels are the current ones (relabels applied)."""
    from pipeline.index.shard import read_index, read_meta

    base = mem.base
    ids_all, xb_all, label_of = [], [], {}
    for s in base.manifest.shards:
        ids, xb = shard_vectors(read_index(base.store.url(s.path), s.sha256, mmap=False))
        ids_all.append(ids)
        xb_all.append(xb)
        meta = read_meta(base.store.url(s.meta_path), s.meta_sha256)
        label_of.update(zip(meta.column("id").to_pylist(), meta.column("label").to_pylist()))
    d_ids, d_xb = mem.delta.vectors()
    label_of.update({int(i): mem.delta.meta[int(i)]["label"] for i in d_ids})
    ids = np.concatenate([*ids_all, d_ids])
    xb = np.vstack([*xb_all, d_xb]).astype(np.float32)
    _, first = np.unique(ids, return_index=True)  # a folded row can still be in the delta for a moment
    live = np.zeros(len(ids), bool)
    live[first] = True
    live &= ~np.isin(ids, mem.forgotten)
    ids, xb = ids[live], xb[live]
    labels = np.array([label_of[int(i)] for i in ids], np.int64).reshape(1, -1)
    labels = mem.interventions.relabel(ids.reshape(1, -1), labels, labels.astype(object))[0][0]
    return ids, labels.astype(np.int64), xb


def _self_query_task(memory_dir: str, version: int, q_ids, q_labels, xq, k: int, nprobe):
    """One Ray task: open the memory read-only (pinned version) and search k+1 neighbours of the batch."""
    from pipeline.memory.memory import VisualMemory

    mem = VisualMemory(memory_dir, version=version, follow=False)
    nb = mem.search(embeddings=xq, k=k + 1, nprobe=nprobe)
    mem.close()
    return q_ids, q_labels, nb.I, nb.labels


def prune(mem, hard: bool = True, soft: bool = True, soft_k: Optional[int] = None, hard_k: int = 100,
          threshold: Optional[int] = None, batch_size: int = 4096, nprobe: Optional[int] = None,
          dry_run: bool = False) -> dict:
    """Self-query the memory on Ray, count v per item, apply hard and/or soft pruning. Returns a report."""
    import ray

    cfg_mem = mem.cfg.memory if mem.cfg is not None else None
    soft_k = int(soft_k or getattr(cfg_mem, "prune_k", 10))
    threshold = int(threshold if threshold is not None else getattr(cfg_mem, "hard_prune_threshold", 128))
    if not ray.is_initialized():
        if mem.cfg is not None:
            from pipeline.runtime import init_ray

            init_ray(mem.cfg)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    ids, labels, xb = memory_vectors(mem)
    kmax = max(soft_k, hard_k if hard else 0)
    task = ray.remote(_self_query_task)
    v_soft = np.zeros(len(ids), np.int64)
    v_hard = np.zeros(len(ids), np.int64)
    order = np.argsort(ids)
    sorted_ids = ids[order]

    def count(into, nbr_ids):
        if len(nbr_ids):
            p = np.searchsorted(sorted_ids, nbr_ids)
            ok = (p < len(sorted_ids)) & (sorted_ids[np.clip(p, 0, len(sorted_ids) - 1)] == nbr_ids)
            np.add.at(into, order[p[ok]], 1)

    with phase(f"pruning self-query of {len(ids)} items (k={kmax}+1) on Ray"):
        refs = [task.remote(mem.memory_dir, mem.version, ids[s:s + batch_size], labels[s:s + batch_size],
                            xb[s:s + batch_size], kmax, nprobe) for s in range(0, len(ids), batch_size)]
        from tqdm import tqdm

        for ref in tqdm(refs, desc="self-query batches", disable=len(refs) < 2):
            q_ids, q_labels, I, L = ray.get(ref)
            count(v_soft, wrong_label_counts(q_ids, q_labels, I, L, soft_k))
            if hard:
                count(v_hard, wrong_label_counts(q_ids, q_labels, I, L, hard_k))
    report = {"items": int(len(ids)), "soft_k": soft_k, "hard_k": hard_k, "threshold": threshold,
              "v_soft_mean": float(v_soft.mean()) if len(ids) else 0.0,
              "items_with_v_gt0": int((v_soft > 0).sum())}
    if soft:
        gamma = soft_gamma(v_soft)
        report["gamma_version"] = None if dry_run else save_gamma(mem.state, ids, v_soft, gamma)
        report["gamma_mean"] = float(gamma.mean()) if len(ids) else 1.0
    if hard:
        victims = ids[v_hard >= threshold]
        report["hard_pruned"] = int(len(victims))
        if not dry_run and len(victims):
            mem.forget(victims.tolist(), reason="hard_prune")
    if not dry_run:
        mem.state.record("prune", f"soft={soft} hard={hard}: {report.get('hard_pruned', 0)} pruned, "
                                  f"gamma over {len(ids)} item(s)")
        mem.refresh()
    report["v_soft"] = v_soft
    report["v_hard"] = v_hard
    report["ids"] = ids
    return report

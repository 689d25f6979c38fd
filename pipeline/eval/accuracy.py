"""accuracy@k of every vote method over a query split, for the ANN memory and for exact (flat) search.

One search with k = max(ks) per search kind; accuracy at smaller k votes over the first k neighbours (the
top-k of a top-K list is the top-k). Printed like the paper's tables (rows = methods, columns = k) and written
as CSV + a PNG plot (accuracy vs k per method) under `<workdir>/eval/`.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.index.neighbors import Neighbors
from pipeline.memory.snapshot import Snapshot, open_snapshot
from pipeline.runtime import phase

log = logging.getLogger("vmem.eval")


@dataclass
class AccuracyTable:
    ks: List[int]
    rows: Dict[Tuple[str, str], List[float]]  # (search, method) -> accuracy per k
    n_queries: int

    def format(self) -> str:
        """The paper's table shape: one row per method and search, accuracy (%) per k, then max over k."""
        head = f"{'search':7s} {'method':15s} " + " ".join(f"k={k:<4d}" for k in self.ks) + "  max"
        lines = [f"top-1 accuracy (%) on {self.n_queries} queries", head, "-" * len(head)]
        for (search, method), accs in self.rows.items():
            lines.append(f"{search:7s} {method:15s} " + " ".join(f"{100 * a:6.2f}" for a in accs)
                         + f"  {100 * max(accs):5.2f}")
        return "\n".join(lines)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["search", "method", "k", "accuracy"])
        for (search, method), accs in self.rows.items():
            for k, a in zip(self.ks, accs):
                w.writerow([search, method, k, f"{a:.6f}"])
        return buf.getvalue()

    def get(self, method: str, k: int, search: str = "ann") -> float:
        return self.rows[(search, method)][self.ks.index(k)]


def exact_neighbors(snap: Snapshot, xq: np.ndarray, k: int, xb: Optional[np.ndarray] = None,
                    ids: Optional[np.ndarray] = None) -> Neighbors:
    """Brute-force top-k over the memory's live items, from given float vectors `xb`/`ids` (else the shards'
    reconstructed vectors) plus the delta. In-process: for memories that fit; see `exact_neighbors_job`."""
    from pipeline.memory.pruning import memory_vectors

    if xb is None:
        ids, _, xb = memory_vectors(snap)
    ids, xb = live_with_delta(snap, ids, xb)
    return exact_neighbors_of(snap, xq, k, xb, ids)


def live_with_delta(snap: Snapshot, ids: np.ndarray, xb: np.ndarray, label_of: Optional[dict] = None):
    """(ids, xb) of the live ones of the given vectors plus the delta's live items not among them."""
    from pipeline.memory.pruning import live_labels

    label_of = live_labels(snap) if label_of is None else label_of
    live = np.array([int(i) in label_of for i in ids], bool)
    d_ids, d_xb = snap.delta.vectors()
    fresh = ~np.isin(d_ids, ids) & np.array([int(i) in label_of for i in d_ids], bool)
    return (np.concatenate([np.asarray(ids, np.int64)[live], d_ids[fresh]]),
            np.vstack([np.asarray(xb, np.float32)[live], d_xb[fresh]]))


def exact_neighbors_of(snap: Snapshot, xq: np.ndarray, k: int, xb: np.ndarray, ids: np.ndarray) -> Neighbors:
    """Brute-force top-k over exactly the vectors `xb` (ids `ids`), labelled with the memory's current labels."""
    from pipeline.index.recall import exact_knn
    from pipeline.memory.pruning import live_labels

    label_of = live_labels(snap)
    D, I = exact_knn(xq, [(xb, ids)], k)
    valid = I >= 0
    labels = np.full(I.shape, -1, np.int64)
    labels[valid] = [label_of.get(int(i), -1) for i in I[valid]]
    empty = np.full(I.shape, "", dtype=object)
    return Neighbors(np.where(valid, D, -np.inf), I, labels, empty.copy(), empty.copy(), empty.copy())


def _exact_part(emb_dir: str, shard: int, num_shards: int, xq: np.ndarray, k: int, dead: np.ndarray,
                relabels: Dict[int, int], batch_rows: int):
    """One Ray task: exact top-k of `xq` over the float embeddings of one shard's live items."""
    from pipeline.embed.parts import embeddings_of, iter_embedding_batches
    from pipeline.index.recall import exact_knn

    labels = {}

    def chunks():
        for b in iter_embedding_batches(emb_dir, batch_rows, columns=["id", "label", "embedding"]):
            bid = b.column("id").to_numpy()
            keep = (bid % num_shards == shard) & ~np.isin(bid, dead)
            if keep.any():
                sub = b.filter(pa.array(keep))
                labels.update(zip(sub.column("id").to_pylist(), sub.column("label").to_pylist()))
                yield embeddings_of(sub), sub.column("id").to_numpy()

    D, I = exact_knn(xq, chunks(), k)
    L = np.array([relabels.get(int(i), labels.get(int(i), -1)) for i in I.reshape(-1)], np.int64).reshape(I.shape)
    return D, I, L


def exact_neighbors_job(snap: Snapshot, emb_dir: str, xq: np.ndarray, k: int, batch_rows: int = 65536) -> Neighbors:
    """Exact top-k over the live items as a Ray job mapped over the shards (each task reads the float vectors
    of its shard's items from the embedding parts), merged exactly with the delta in the driver: no process
    holds every vector. Items the parts do not hold (adds) come from the delta."""
    import ray

    from pipeline.index.neighbors import merge_topk

    relabels = {i: int(it["label"]) for i, it in snap.interventions.items.items() if "label" in it}
    dead_ref = ray.put(snap.forgotten)
    xq_ref = ray.put(np.ascontiguousarray(xq, np.float32))
    task = ray.remote(_exact_part)
    parts = ray.get([task.remote(emb_dir, s, snap.base.num_shards, xq_ref, k, dead_ref, relabels, batch_rows)
                     for s in range(snap.base.num_shards)])
    d_ids, d_xb = snap.delta.vectors()
    live = ~np.isin(d_ids, snap.forgotten)
    if live.any():
        from pipeline.index.recall import exact_knn

        Dd, Id = exact_knn(xq, [(d_xb[live], d_ids[live])], k)
        stored = dict(zip(d_ids.tolist(), snap.delta.metadata(d_ids)["labels"].tolist()))
        Ld = np.array([relabels.get(int(i), stored.get(int(i), -1)) for i in Id.reshape(-1)],
                      np.int64).reshape(Id.shape)
        parts.append((Dd, Id, Ld))
    D, I = merge_topk([p[0] for p in parts], [p[1] for p in parts], k)
    label_of = {int(i): int(l) for p in parts for i, l in zip(p[1].reshape(-1), p[2].reshape(-1)) if i >= 0}
    labels = np.array([label_of.get(int(i), -1) for i in I.reshape(-1)], np.int64).reshape(I.shape)
    empty = np.full(I.shape, "", dtype=object)
    return Neighbors(np.where(I >= 0, D, -np.inf), I, labels, empty.copy(), empty.copy(), empty.copy())


def accuracy_from_neighbors(snap: Snapshot, nb: Neighbors, yq: np.ndarray, ks: Sequence[int], methods: Sequence[str],
                            **params) -> Dict[str, List[float]]:
    out = {}
    for method in methods:
        out[method] = [float(np.mean(snap.vote(nb.first(k), method, **params).label == yq)) for k in ks]
    return out


def accuracy_table(snap: Snapshot, xq: np.ndarray, yq: np.ndarray, ks: Sequence[int], methods: Sequence[str],
                   exact: bool = True, exact_xb: Optional[np.ndarray] = None,
                   exact_ids: Optional[np.ndarray] = None, nprobe: Optional[int] = None,
                   exact_emb_dir: Optional[str] = None) -> AccuracyTable:
    """accuracy@k per method for ANN search (and exact search when `exact`: over the embedding parts of
    `exact_emb_dir` as a Ray job, else over `exact_xb`/`exact_ids` or the shards' vectors in-process)."""
    ks = sorted(int(k) for k in ks)
    rows: Dict[Tuple[str, str], List[float]] = {}
    with phase(f"eval: ANN search of {len(xq)} queries, k={ks[-1]}"):
        nb = snap.search(xq, ks[-1], nprobe=nprobe)
    for m, accs in accuracy_from_neighbors(snap, nb, yq, ks, methods).items():
        rows[("ann", m)] = accs
    if exact:
        with phase("eval: exact (flat) search"):
            nb = (exact_neighbors_job(snap, exact_emb_dir, xq, ks[-1]) if exact_emb_dir
                  else exact_neighbors(snap, xq, ks[-1], exact_xb, exact_ids))
        for m, accs in accuracy_from_neighbors(snap, nb, yq, ks, methods).items():
            rows[("exact", m)] = accs
    return AccuracyTable(ks, rows, len(xq))


def methods_of(snap: Snapshot, base: Sequence[str]) -> List[str]:
    """The configured methods, plus their soft variants when the memory has soft-pruning weights."""
    return list(base) + ([f"soft_{m}" for m in base if not m.startswith("soft_")] if snap.gamma is not None
                         else [])


def load_queries(cfg):
    """(xq, yq) of the `cfg.eval.split` embeddings, the first `cfg.eval.max_queries` of them when set."""
    from pipeline.embed.parts import embeddings_of, read_embeddings

    q = read_embeddings(cfg.embeddings_dir(cfg.eval.split), ["label", "embedding"])
    if cfg.eval.max_queries:
        q = q.slice(0, cfg.eval.max_queries)
    return embeddings_of(q), q.column("label").to_numpy()


def build_embeddings(cfg, snap: Snapshot) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, labels, xb) of the embeddings split the memory was built from, or None when it is not on disk."""
    from pipeline.embed.parts import embeddings_of, read_embeddings

    src = snap.base.manifest.build.get("split")
    if not src or not storage.exists(cfg.embeddings_dir(src)):
        return None
    t = read_embeddings(cfg.embeddings_dir(src), ["id", "label", "embedding"])
    return t.column("id").to_numpy(), t.column("label").to_numpy(), embeddings_of(t)


def memory_embeddings(cfg, snap: Snapshot) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, xb) of the memory: the build's float embeddings if on disk, else reconstructed vectors."""
    from pipeline.memory.pruning import live_labels, memory_vectors

    built = build_embeddings(cfg, snap)
    if built is None:
        return memory_vectors(snap)
    label_of = live_labels(snap)
    ids, xb = live_with_delta(snap, built[0], built[2], label_of)  # deleted items out, adds in
    return ids, np.array([label_of[int(i)] for i in ids], np.int64), xb


def evaluate(cfg, snap=None, exact: bool = True, out_dir: Optional[str] = None) -> AccuracyTable:
    """`vmem eval`: accuracy@k table over `cfg.eval.split` on `snap` (default: the memory's newest committed
    state); writes accuracy.csv and accuracy.png."""
    from pipeline.eval.plots import plot_accuracy

    snap = snap or open_snapshot(cfg)
    xq, yq = load_queries(cfg)
    methods = methods_of(snap, cfg.eval.methods)
    src = snap.base.manifest.build.get("split")
    emb_dir = cfg.embeddings_dir(src) if src and storage.exists(cfg.embeddings_dir(src)) else None
    if exact and emb_dir:  # exact over the original float vectors, a Ray task per shard
        from pipeline.runtime import init_ray

        init_ray(cfg)
    table = accuracy_table(snap, xq, yq, cfg.eval.ks, methods, exact=exact, exact_emb_dir=emb_dir)
    out_dir = out_dir or storage.join(cfg.workdir, "eval")
    storage.atomic_write_bytes(storage.join(out_dir, "accuracy.csv"), table.to_csv().encode())
    plot_accuracy(table, storage.join(out_dir, "accuracy.png"))
    return table

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

from pipeline import storage
from pipeline.memory.results import Neighbors
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


def exact_neighbors(mem, xq: np.ndarray, k: int, xb: Optional[np.ndarray] = None,
                    ids: Optional[np.ndarray] = None) -> Neighbors:
    """Brute-force top-k over the memory's live items (given float vectors `xb`/`ids`, else reconstructed)."""
    from pipeline.memory.pruning import live_vectors, memory_vectors

    if xb is None:
        ids, _, xb = memory_vectors(mem)
    else:
        ids, xb = live_vectors(mem, [ids], [xb])
    return exact_neighbors_of(mem, xq, k, xb, ids)


def exact_neighbors_of(mem, xq: np.ndarray, k: int, xb: np.ndarray, ids: np.ndarray) -> Neighbors:
    """Brute-force top-k over exactly the vectors `xb` (ids `ids`), labelled from the memory."""
    from pipeline.index.recall import exact_knn
    from pipeline.memory.pruning import item_labels

    D, I = exact_knn(xq, [(xb, ids)], k)
    valid = I >= 0
    labels = np.full(I.shape, -1, np.int64)
    labels[valid] = item_labels(mem, I[valid])
    empty = np.full(I.shape, "", dtype=object)
    return Neighbors(np.where(valid, D, -np.inf), I, labels, empty.copy(), empty.copy(), empty.copy())


def accuracy_from_neighbors(mem, nb: Neighbors, yq: np.ndarray, ks: Sequence[int], methods: Sequence[str],
                            **params) -> Dict[str, List[float]]:
    out = {}
    for method in methods:
        out[method] = [float(np.mean(mem.vote(nb.take(k), method, **params).label == yq)) for k in ks]
    return out


def accuracy_table(mem, xq: np.ndarray, yq: np.ndarray, ks: Sequence[int], methods: Sequence[str],
                   exact: bool = True, exact_xb: Optional[np.ndarray] = None,
                   exact_ids: Optional[np.ndarray] = None, nprobe: Optional[int] = None) -> AccuracyTable:
    """accuracy@k per method for ANN search (and exact search when `exact`)."""
    ks = sorted(int(k) for k in ks)
    rows: Dict[Tuple[str, str], List[float]] = {}
    with phase(f"eval: ANN search of {len(xq)} queries, k={ks[-1]}"):
        nb = mem.search(embeddings=xq, k=ks[-1], nprobe=nprobe)
    for m, accs in accuracy_from_neighbors(mem, nb, yq, ks, methods).items():
        rows[("ann", m)] = accs
    if exact:
        with phase("eval: exact (flat) search"):
            nb = exact_neighbors(mem, xq, ks[-1], exact_xb, exact_ids)
        for m, accs in accuracy_from_neighbors(mem, nb, yq, ks, methods).items():
            rows[("exact", m)] = accs
    return AccuracyTable(ks, rows, len(xq))


def methods_of(mem, base: Sequence[str]) -> List[str]:
    """The configured methods, plus their soft variants when the memory has soft-pruning weights."""
    return list(base) + ([f"soft_{m}" for m in base if not m.startswith("soft_")] if mem.gamma is not None
                         else [])


def load_queries(cfg):
    """(xq, yq) of the `cfg.eval.split` embeddings, the first `cfg.eval.max_queries` of them when set."""
    from pipeline.embed.parts import embeddings_of, read_embeddings

    q = read_embeddings(cfg.embeddings_dir(cfg.eval.split), ["label", "embedding"])
    if cfg.eval.max_queries:
        q = q.slice(0, cfg.eval.max_queries)
    return embeddings_of(q), q.column("label").to_numpy()


def build_embeddings(cfg, mem) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, labels, xb) of the embeddings split the memory was built from, or None when it is not on disk."""
    from pipeline.embed.parts import embeddings_of, read_embeddings

    src = mem.base.manifest.build.get("split")
    if not src or not storage.exists(cfg.embeddings_dir(src)):
        return None
    t = read_embeddings(cfg.embeddings_dir(src), ["id", "label", "embedding"])
    return t.column("id").to_numpy(), t.column("label").to_numpy(), embeddings_of(t)


def memory_embeddings(cfg, mem) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, xb) of the memory: the build's float embeddings if on disk, else reconstructed vectors."""
    from pipeline.memory.pruning import item_labels, live_vectors, memory_vectors

    built = build_embeddings(cfg, mem)
    if built is None:
        return memory_vectors(mem)
    ids, _, xb = built
    in_base, _ = mem.base.rows(ids)  # items compacted away since the build are not in the memory
    ids, xb = live_vectors(mem, [ids[in_base]], [xb[in_base]])
    return ids, item_labels(mem, ids), xb


def evaluate(cfg, mem=None, exact: bool = True, out_dir: Optional[str] = None) -> AccuracyTable:
    """`vmem eval`: accuracy@k table over `cfg.eval.split`; writes accuracy.csv and accuracy.png."""
    from pipeline.eval.plots import plot_accuracy
    from pipeline.memory.memory import VisualMemory

    mem = mem or VisualMemory.open(cfg.memory_dir, cfg=cfg)
    xq, yq = load_queries(cfg)
    methods = methods_of(mem, cfg.eval.methods)
    xb = ids = None
    if exact:  # exact over the original float vectors when the build's embeddings are there
        ids, _, xb = build_embeddings(cfg, mem) or (None, None, None)
    table = accuracy_table(mem, xq, yq, cfg.eval.ks, methods, exact=exact, exact_xb=xb, exact_ids=ids)
    out_dir = out_dir or storage.join(cfg.workdir, "eval")
    storage.atomic_write_bytes(storage.join(out_dir, "accuracy.csv"), table.to_csv().encode())
    plot_accuracy(table, storage.join(out_dir, "accuracy.png"))
    return table

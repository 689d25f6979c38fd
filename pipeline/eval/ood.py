"""OOD study: hold one class out of the memory and ask whether the OOD score flags its test images.

For each class c, "the memory without c" is an exact inner-product search (faiss IndexFlatIP) over the
memory's embeddings minus those of class c, not a rebuild of the sharded index per class: the score depends
only on the neighbours' distances, which exact search gives. Queries of class c are out-of-distribution
(positives), the other queries in-distribution. Reported per class: AUROC and FPR at 95% TPR of the paper's
score (mean cosine distance to the first `n` neighbours) and, for comparison, of 1 - the winner's plurality
vote share at k.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from pipeline.memory import confidence as C
from pipeline.memory.votes import vote

HOW = "memory without class c = exact faiss IndexFlatIP search over the embeddings minus class c (no rebuild)"


def auroc(score_pos: np.ndarray, score_neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting 1/2 (the Mann-Whitney U statistic / (n+ n-))."""
    s = np.concatenate([score_pos, score_neg])
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]  # average ranks of ties
    n1, n0 = len(score_pos), len(score_neg)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def fpr_at_tpr(score_pos: np.ndarray, score_neg: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of negatives flagged at the highest threshold that flags `tpr` of the positives (score >= t)."""
    t = np.quantile(score_pos, 1.0 - tpr, method="lower")
    return float(np.mean(score_neg >= t))


@dataclass
class OodRow:
    label: int
    n_ood: int
    n_id: int
    auroc: float
    fpr95: float
    auroc_share: float
    fpr95_share: float


def ood_scores_without(xb: np.ndarray, yb: np.ndarray, xq: np.ndarray, label: int, n: int = 100, k: int = 10):
    """(OOD score, 1 - plurality share at k) of each query against the memory minus class `label`."""
    import faiss

    keep = yb != label
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(np.ascontiguousarray(xb[keep], dtype=np.float32))
    D, I = index.search(np.ascontiguousarray(xq, dtype=np.float32), max(n, k))
    d = np.where(I >= 0, 1.0 - D, np.nan)
    labels = np.where(I[:, :k] >= 0, yb[keep][np.clip(I[:, :k], 0, None)], -1)
    v = vote("plurality", d[:, :k], labels)
    share = C.of_votes(v)["share"]
    return C.ood_score(d, n), 1.0 - share


def ood_study(xb: np.ndarray, yb: np.ndarray, xq: np.ndarray, yq: np.ndarray, n: int = 100, k: int = 10,
              labels: Optional[Sequence[int]] = None) -> List[OodRow]:
    """One `OodRow` per held-out class (every class of the queries unless `labels` is given)."""
    rows = []
    for c in (np.unique(yq) if labels is None else labels):
        score, unshare = ood_scores_without(xb, yb, xq, int(c), n, k)
        pos = yq == c
        if not pos.any() or pos.all():
            continue
        rows.append(OodRow(int(c), int(pos.sum()), int((~pos).sum()), auroc(score[pos], score[~pos]),
                           fpr_at_tpr(score[pos], score[~pos]), auroc(unshare[pos], unshare[~pos]),
                           fpr_at_tpr(unshare[pos], unshare[~pos])))
    return rows


def mean_row(rows: List[OodRow]) -> dict:
    return {f: float(np.mean([getattr(r, f) for r in rows])) for f in ("auroc", "fpr95", "auroc_share",
                                                                        "fpr95_share")}


def format_ood(rows: List[OodRow], n: int, k: int) -> str:
    lines = [f"OOD study: each class held out in turn; {HOW}",
             f"score = mean cosine distance to the first {n} neighbours (the paper's); "
             f"baseline = 1 - plurality vote share at k={k}",
             f"{'class':>5s} {'ood':>5s} {'id':>6s} {'AUROC':>7s} {'FPR@95':>7s} {'AUROC(1-share)':>15s} "
             f"{'FPR@95(1-share)':>16s}"]
    for r in rows:
        lines.append(f"{r.label:5d} {r.n_ood:5d} {r.n_id:6d} {r.auroc:7.3f} {r.fpr95:7.3f} {r.auroc_share:15.3f} "
                     f"{r.fpr95_share:16.3f}")
    m = mean_row(rows)
    lines.append(f"{'mean':>5s} {'':5s} {'':6s} {m['auroc']:7.3f} {m['fpr95']:7.3f} {m['auroc_share']:15.3f} "
                 f"{m['fpr95_share']:16.3f}")
    return "\n".join(lines)


def ood_csv(rows: List[OodRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["label", "n_ood", "n_id", "auroc", "fpr95", "auroc_1_minus_share", "fpr95_1_minus_share"])
    for r in rows:
        w.writerow([r.label, r.n_ood, r.n_id, f"{r.auroc:.6f}", f"{r.fpr95:.6f}", f"{r.auroc_share:.6f}",
                    f"{r.fpr95_share:.6f}"])
    return buf.getvalue()


def plot_ood(rows: List[OodRow], out: str) -> str:
    """AUROC per held-out class, the paper's score beside 1 - vote share."""
    from pipeline.figures import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r.auroc for r in rows], 0.4, label="mean distance to neighbours")
    ax.bar(x + 0.2, [r.auroc_share for r in rows], 0.4, label="1 - vote share")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, [str(r.label) for r in rows])
    ax.set_xlabel("held-out class")
    ax.set_ylabel("AUROC")
    ax.set_ylim(0, 1.15)  # room above the bars for the legend
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.set_title("OOD detection of a class held out of the memory")
    fig.tight_layout()
    return save_png(fig, out, dpi=100)

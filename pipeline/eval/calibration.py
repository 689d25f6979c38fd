"""Calibration of vote confidence per vote method: ECE before/after a fitted map, reliability diagrams.

The queries are split in two halves (a fixed permutation): a map from the winner's vote share to P(correct)
(Platt scaling by default, see `pipeline.memory.confidence`) is fitted on the validation half and ECE is measured on the other half, raw share ("before") vs
mapped ("after"). The maps, with the 95th percentile of the validation OOD score as the OOD threshold, are
stored with the memory version (`pipeline.memory.trust`), so classify reports a calibrated `probability`.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np

from pipeline import storage
from pipeline.figures import pyplot, save_png
from pipeline.memory import confidence as C
from pipeline.memory.trust import Calibration, apply_map, fit_map, save_calibration

BINS = 10


@dataclass
class CalibrationReport:
    k: int
    n_val: int
    n_test: int
    rows: Dict[str, dict]  # method -> {ece_before, ece_after, accuracy, bins_before, bins_after}
    calibration: Calibration
    kind: str = "platt"

    def format(self) -> str:
        lines = [f"calibration of the winner's vote share at k={self.k} ({self.kind} map fitted on {self.n_val} "
                 f"validation queries, ECE on {self.n_test} held-out queries, {BINS} bins)",
                 f"{'method':15s} {'accuracy':>8s} {'ECE before':>10s} {'ECE after':>9s}"]
        for m, r in self.rows.items():
            lines.append(f"{m:15s} {100 * r['accuracy']:8.2f} {100 * r['ece_before']:10.2f} "
                         f"{100 * r['ece_after']:9.2f}")
        thr = self.calibration.ood_threshold
        lines.append(f"OOD threshold (95th percentile of validation OOD scores): {thr:.4f}" if thr is not None
                     else "OOD threshold: none")
        return "\n".join(lines)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["method", "k", "accuracy", "ece_before", "ece_after", "n_val", "n_test"])
        for m, r in self.rows.items():
            w.writerow([m, self.k, f"{r['accuracy']:.6f}", f"{r['ece_before']:.6f}", f"{r['ece_after']:.6f}",
                        self.n_val, self.n_test])
        return buf.getvalue()


def split_halves(n: int, seed: int = 0):
    """(val, test) index arrays: a fixed random half each."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def calibrate(snap, nb, yq: np.ndarray, methods: Sequence[str], ood_neighbors: int = 100,
              kind: str = "platt") -> CalibrationReport:
    """Fit and measure the calibration of every method on searched neighbours `nb` (k = its width)."""
    k = nb.I.shape[1]
    val, test = split_halves(len(yq))
    rows, maps = {}, {}
    for method in methods:
        v = snap.vote(nb, method)
        share = C.of_votes(v)["share"]
        correct = (v.label == yq).astype(np.float64)
        fitted = fit_map(kind, share[val], correct[val], k)
        after = apply_map(fitted, share[test], k)
        rows[method] = {"accuracy": float(correct[test].mean()),
                        "ece_before": C.ece(share[test], correct[test], BINS),
                        "ece_after": C.ece(after, correct[test], BINS),
                        "bins_before": C.reliability(share[test], correct[test], BINS),
                        "bins_after": C.reliability(after, correct[test], BINS)}
        maps[method] = {**fitted, "n_fit": int(len(val)),
                        "ece_before": rows[method]["ece_before"], "ece_after": rows[method]["ece_after"]}
    ood = C.ood_score(nb.distances, ood_neighbors)[val]
    thr = float(np.nanpercentile(ood, 95)) if np.isfinite(ood).any() else None
    cal = Calibration(version=snap.version, k=k, ood_neighbors=ood_neighbors, ood_threshold=thr, methods=maps)
    return CalibrationReport(k, len(val), len(test), rows, cal, kind)


def plot_reliability(report: CalibrationReport, out: str) -> str:
    """One panel per method: accuracy vs confidence per bin, before (raw share) and after calibration."""
    plt = pyplot()
    n = len(report.rows)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, (m, r) in zip(axes[0], report.rows.items()):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        for key, label, style in (("bins_before", "raw share", "o-"), ("bins_after", "calibrated", "s--")):
            b = r[key]
            keep = b["count"] > 0
            ax.plot(b["confidence"][keep], b["accuracy"][keep], style, ms=3,
                    label=f"{label} (ECE {100 * r['ece' + key[4:]]:.1f})")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("accuracy")
    fig.suptitle(f"reliability at k={report.k} ({report.n_test} held-out queries)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out, dpi=100)


def run_calibration(snap, xq: np.ndarray, yq: np.ndarray, methods: Sequence[str], k: int, out_dir: str,
                    ood_neighbors: int = 100, save: bool = True) -> CalibrationReport:
    """Search, calibrate every method, write calibration.csv + reliability.png, store the maps with the memory."""
    nb = snap.search(xq, k)
    report = calibrate(snap, nb, yq, methods, ood_neighbors)
    storage.atomic_write_bytes(storage.join(out_dir, "calibration.csv"), report.to_csv().encode())
    plot_reliability(report, storage.join(out_dir, "reliability.png"))
    if save:
        save_calibration(snap.memory_dir, report.calibration)
    return report


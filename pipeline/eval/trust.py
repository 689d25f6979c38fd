"""`vmem eval` beyond accuracy: calibration (ECE, reliability diagram), the OOD study, and the trust studies
(`--study paper | ood | rerank`). Outputs go to `<workdir>/eval/` as CSV + PNG (+ JSON for studies)."""
from __future__ import annotations

from typing import Optional

from pipeline import storage
from pipeline.errors import UserError

TRUST_STUDIES = ("paper", "ood", "rerank")


def _out(cfg, out_dir: Optional[str]) -> str:
    return out_dir or storage.join(cfg.workdir, "eval")


def evaluate_trust(cfg, snap, xq=None, yq=None, out_dir: Optional[str] = None, ood: bool = True) -> str:
    """Calibrate every vote method (stored with the memory version) and run the OOD study; the printed report."""
    from pipeline.eval.accuracy import load_queries, memory_embeddings, methods_of
    from pipeline.eval.calibration import run_calibration
    from pipeline.eval.ood import format_ood, ood_csv, ood_study, plot_ood
    from pipeline.memory.trust import calibration_url
    from pipeline.runtime import phase

    out = _out(cfg, out_dir)
    if xq is None:
        xq, yq = load_queries(cfg)
    with phase("eval: calibration"):
        cal = run_calibration(snap, xq, yq, methods_of(snap, cfg.eval.methods), cfg.memory.k, out,
                              cfg.memory.ood_neighbors)
    text = [cal.format(), f"calibration stored with the memory: {calibration_url(snap.memory_dir, snap.version)}",
            f"written: {out}/calibration.csv, reliability.png"]
    if ood:
        ids, yb, xb = memory_embeddings(cfg, snap)
        with phase("eval: OOD study (one held-out class at a time)"):
            rows = ood_study(xb, yb, xq, yq, n=cfg.memory.ood_neighbors, k=cfg.memory.k)
        storage.atomic_write_bytes(storage.join(out, "ood.csv"), ood_csv(rows).encode())
        plot_ood(rows, storage.join(out, "ood.png"))
        text += ["", format_ood(rows, cfg.memory.ood_neighbors, cfg.memory.k), f"written: {out}/ood.csv, ood.png"]
    return "\n".join(text)


def run_trust_study(cfg, name: str, label: Optional[int] = None, n: int = 200,
                    out_dir: Optional[str] = None) -> str:
    """`vmem eval --study paper|ood|rerank` on `cfg`'s memory; returns the printed report."""
    from pipeline.eval.accuracy import load_queries, memory_embeddings
    from pipeline.memory.memory import VisualMemory

    if name not in TRUST_STUDIES:
        raise UserError(f"unknown study {name!r}: choose one of {', '.join(TRUST_STUDIES)}")
    out = _out(cfg, out_dir)
    storage.configure(cfg.storage)
    mem = VisualMemory.open(cfg.memory_dir, cfg=cfg)
    try:
        if name == "rerank":
            from pipeline.eval.rerank import format_rerank, run_rerank

            r = run_rerank(cfg, mem.snapshot(), mem.embed, n, out)
            storage.atomic_write_json(storage.join(out, "study-rerank.json"), r)
            return format_rerank(r) + f"\nwritten: {out}/rerank.csv"
        xq, yq = load_queries(cfg)
        if name == "ood":
            return evaluate_trust(cfg, mem.snapshot(), xq, yq, out)
        ids, yb, xb = memory_embeddings(cfg, mem.snapshot())
    finally:
        mem.close()
    return _paper(cfg, xq, yq, xb, yb, ids, label, out)


def _paper(cfg, xq, yq, xb, yb, ids, label, out: str) -> str:
    from pipeline.eval.paper import format_paper, paper_study, write_paper
    from pipeline.runtime import init_ray

    init_ray(cfg)  # pruning queries the memory against itself on Ray
    claims = paper_study(cfg.memory_dir, xq, yq, cfg.eval.ks, xb, yb, ids, label,  # studies work on copies
                         hard_threshold=cfg.memory.hard_prune_threshold, ood_n=cfg.memory.ood_neighbors)
    write_paper(claims, out)
    return format_paper(claims) + f"\nwritten: {out}/paper.csv, paper.json"

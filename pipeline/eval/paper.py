"""`vmem eval --study paper`: each qualitative claim of the paper, our numbers, and a verdict.

Claims (paper.md) and the test applied to our numbers (decided before measuring; printed with the verdict):
1. large_k: Rank and Softmax hold accuracy at large k where Plurality decays -- HOLDS when Plurality's drop
   from its best k to the largest k exceeds both Rank's and Softmax's (INCONCLUSIVE when Plurality drops by
   less than 0.5 points: nothing decays to hold against). Exact search over the build embeddings.
2. soft_pruning: soft pruning does not hurt and may help -- HOLDS when no method loses more than 0.5 points.
3. add_class: adding a held-out class raises its accuracy from 0 without lowering the others by more than 0.5
   points -- HOLDS when the class goes from 0 to > 0 and the other classes lose <= 0.5 points.
4. delete_class: deleting a class drops it to 0 and leaves the others unchanged -- HOLDS when no deleted id is
   returned, no query is labelled with the class (before and after compaction) and the others lose <= 0.5
   points (deleting a class can only remove wrong votes for the others; a gain is reported as is).
5. ood: the OOD score separates a held-out class -- HOLDS when the mean AUROC over held-out classes >= 0.7.
The studies run on scratch copies (pipeline.eval.studies); the user's memory is never modified.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from typing import List, Optional, Sequence



from pipeline import storage
from pipeline.eval import studies as S
from pipeline.eval.ood import HOW, mean_row, ood_study

TOL = 0.005  # 0.5 points
MIN_AUROC = 0.7


def _pts(x: float) -> str:
    return f"{100 * x:.2f}"


def _claim(name: str, text: str, numbers: dict, verdict: str, detail: str) -> dict:
    return {"claim": name, "text": text, "verdict": verdict, "detail": detail, "numbers": numbers}


def claim_large_k(snap, xq, yq, ks: Sequence[int], xb, ids) -> dict:
    from pipeline.eval.accuracy import accuracy_from_neighbors, exact_neighbors_of

    ks = sorted(int(k) for k in ks)
    nb = exact_neighbors_of(snap, xq, ks[-1], xb, ids)
    acc = accuracy_from_neighbors(snap, nb, yq, ks, ("plurality", "softmax", "rank"))
    drop = {m: max(a) - a[-1] for m, a in acc.items()}
    if drop["plurality"] < TOL:
        verdict = "INCONCLUSIVE"
    else:
        verdict = "HOLDS" if drop["rank"] < drop["plurality"] and drop["softmax"] < drop["plurality"] else "FAILS"
    detail = "; ".join(f"{m} best {_pts(max(a))} -> k={ks[-1]} {_pts(a[-1])} (drop {_pts(drop[m])})"
                       for m, a in acc.items())
    return _claim("large_k", "Rank and Softmax hold accuracy at large k where Plurality decays",
                  {"ks": ks, "accuracy": acc, "drop": drop}, verdict, detail)


def claim_soft_pruning(r: dict) -> dict:
    delta = {m: r["soft"][m] - r["none"][m] for m in S.BASE_METHODS}
    verdict = "HOLDS" if min(delta.values()) >= -TOL else "FAILS"
    detail = "; ".join(f"{m} {_pts(r['none'][m])} -> soft {_pts(r['soft'][m])} ({100 * delta[m]:+.2f})"
                       for m in S.BASE_METHODS)
    helped = [m for m, d in delta.items() if d > 0]
    detail += f"; helped: {', '.join(helped) or 'none'}"
    return _claim("soft_pruning", "soft pruning does not hurt and may help", {**r, "delta": delta}, verdict, detail)


def claim_add_class(r: dict) -> dict:
    b, a = r["before"], r["after"]
    lost = b["others"] - a["others"]
    verdict = "HOLDS" if b["class"] == 0 and a["class"] > 0 and lost <= TOL else "FAILS"
    detail = (f"class {r['label']} ({r['added']} items): {_pts(b['class'])} -> {_pts(a['class'])}; others "
              f"{_pts(b['others'])} -> {_pts(a['others'])} ({-100 * lost:+.2f}); {r['method']} k={r['k']}")
    return _claim("add_class", "adding a held-out class raises its accuracy from 0 without lowering the others "
                  "by more than 0.5 points", r, verdict, detail)


def claim_delete_class(r: dict, others_before: float) -> dict:
    phases = ("before_compaction", "after_compaction")
    clean = all(r[p]["deleted_ids_returned"] == 0 and r[p]["queries_labelled_with_it"] == 0 for p in phases)
    after = r["after_compaction"]["accuracy_others"]
    verdict = "HOLDS" if clean and others_before - after <= TOL else "FAILS"
    detail = (f"class {r['label']} ({r['deleted']} items): queries labelled with it "
              f"{r['before_compaction']['queries_labelled_with_it']}/{r['after_compaction']['queries_labelled_with_it']}"
              f" (before/after compaction), deleted ids returned "
              f"{r['before_compaction']['deleted_ids_returned']}/{r['after_compaction']['deleted_ids_returned']}; "
              f"others {_pts(others_before)} -> {_pts(after)} ({100 * (after - others_before):+.2f})")
    return _claim("delete_class", "deleting a class drops it to 0 and leaves the others unchanged",
                  {**r, "others_before": others_before}, verdict, detail)


def claim_ood(rows) -> dict:
    m = mean_row(rows)
    verdict = "HOLDS" if m["auroc"] >= MIN_AUROC else "FAILS"
    detail = (f"mean over {len(rows)} held-out classes: AUROC {m['auroc']:.3f}, FPR@95%TPR {m['fpr95']:.3f} "
              f"(1 - vote share: AUROC {m['auroc_share']:.3f}, FPR@95 {m['fpr95_share']:.3f}); {HOW}")
    return _claim("ood", f"the OOD score separates a held-out class (mean AUROC >= {MIN_AUROC})",
                  {"mean": m, "rows": [r.__dict__ for r in rows]}, verdict, detail)


def paper_study(mem_dir: str, xq, yq, ks: Sequence[int], xb, yb, ids, label: Optional[int] = None,
                hard_threshold: Optional[int] = None, ood_n: int = 100,
                ood_labels: Optional[Sequence[int]] = None) -> List[dict]:
    """Run the five claims on scratch copies of the memory at `mem_dir`; returns one dict per claim."""
    from pipeline.memory.memory import VisualMemory

    label = int(label if label is not None else yq[0])
    claims = []
    mem = VisualMemory.open(mem_dir)
    claims.append(claim_large_k(mem.snapshot(), xq, yq, ks, xb, ids))
    mem.close()
    copies = []
    try:
        copies.append(S.scratch_copy(mem_dir))
        claims.append(claim_soft_pruning(S.study_pruning(copies[-1], xq, yq, threshold=hard_threshold)))
        copies.append(S.scratch_copy(mem_dir))
        claims.append(claim_add_class(S.study_add_class(copies[-1], xq, yq, label)))
        copies.append(S.scratch_copy(mem_dir))
        mem = VisualMemory.open(copies[-1])
        others_before = S.accuracy(mem.snapshot(), xq, yq, 10, "plurality", yq != label)
        mem.close()
        claims.append(claim_delete_class(S.study_delete_class(copies[-1], xq, yq, label), others_before))
    finally:
        for c in copies:
            shutil.rmtree(os.path.dirname(c), ignore_errors=True)
    claims.append(claim_ood(ood_study(xb, yb, xq, yq, n=ood_n, labels=ood_labels)))
    return claims


def format_paper(claims: List[dict]) -> str:
    lines = ["The paper's claims, checked on this memory"]
    for i, c in enumerate(claims, 1):
        lines += [f"{i}. {c['text']}", f"   ours: {c['detail']}", f"   verdict: {c['verdict']}"]
    return "\n".join(lines)


def paper_csv(claims: List[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["claim", "verdict", "detail"])
    for c in claims:
        w.writerow([c["claim"], c["verdict"], c["detail"]])
    return buf.getvalue()


def write_paper(claims: List[dict], out_dir: str) -> None:
    storage.atomic_write_bytes(storage.join(out_dir, "paper.csv"), paper_csv(claims).encode())
    storage.atomic_write_bytes(storage.join(out_dir, "paper.json"),
                               json.dumps(claims, indent=1, default=float).encode())

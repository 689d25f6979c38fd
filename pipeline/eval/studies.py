"""Studies of the paper's claims on a scratch copy of a memory (the user's memory is never modified).

- `add_class`: hold one class out (delete + compact), measure, add it back through `add()`, measure again;
- `delete_class`: delete a class; its ids are never returned and no query is labelled with it, before and
  after compaction;
- `pruning`: accuracy per method with no pruning, hard pruning (tombstones) and soft pruning (soft_* votes).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Callable, Dict, Optional

import numpy as np

from pipeline import storage
from pipeline.errors import UserError
from pipeline.memory import deletes
from pipeline.memory.memory import VisualMemory
from pipeline.memory.pruning import memory_vectors
from pipeline.memory.snapshot import Snapshot

log = logging.getLogger("vmem.eval")
BASE_METHODS = ("plurality", "distance", "softmax", "rank")


def scratch_copy(memory_dir: str) -> str:
    """A local copy of the memory directory in a temp folder (studies mutate it)."""
    dest = tempfile.mkdtemp(prefix="vmem-study-")
    target = os.path.join(dest, "memory")
    if storage.is_remote(memory_dir):
        fs, path = storage.filesystem(memory_dir)
        fs.get(path.rstrip("/") + "/", target, recursive=True)
    else:
        shutil.copytree(memory_dir, target)
    return target


def accuracy(snap: Snapshot, xq, yq, k, method, mask=None) -> float:
    pred = snap.vote(snap.search(xq, k), method).label
    sel = np.ones(len(yq), bool) if mask is None else mask
    return float(np.mean(pred[sel] == yq[sel])) if sel.any() else float("nan")


def study_add_class(mem_dir: str, xq, yq, label: int, k: int = 10, method: str = "rank") -> dict:
    """Hold `label` out of the memory, then add its items back; accuracy on that class and overall."""
    mem = VisualMemory.open(mem_dir)
    ids, labels, xb = memory_vectors(mem.snapshot())
    sel = labels == label
    if not sel.any():
        raise UserError(f"class {label} has no items in the memory")
    items = [mem.get_item(int(i)) for i in ids[sel]]
    mem.delete(label=label)
    mem.compact()
    cls = yq == label
    before = {"class": accuracy(mem.snapshot(), xq, yq, k, method, cls), "others": accuracy(mem.snapshot(), xq, yq, k, method, ~cls),
              "all": accuracy(mem.snapshot(), xq, yq, k, method)}
    # Deletion is final (the forget list refuses the old keys), so the class comes back under new keys.
    mem.add(embeddings=xb[sel], labels=[label] * int(sel.sum()), keys=[f"{it['key']}#re-added" for it in items],
            label_names=[it["label_name"] for it in items], sources=[it["source"] for it in items])
    after = {"class": accuracy(mem.snapshot(), xq, yq, k, method, cls), "others": accuracy(mem.snapshot(), xq, yq, k, method, ~cls),
             "all": accuracy(mem.snapshot(), xq, yq, k, method)}
    mem.close()
    return {"study": "add_class", "label": int(label), "added": int(sel.sum()), "k": k, "method": method,
            "before": before, "after": after}


def study_delete_class(mem_dir: str, xq, yq, label: int, k: int = 50, method: str = "plurality") -> dict:
    """Delete `label`; check no id of it is returned and no query is labelled with it, before/after compaction."""
    mem = VisualMemory.open(mem_dir)
    dead = np.array(deletes.select(mem.snapshot(), label=label), np.int64)
    n = mem.delete(label=label)
    out = {"study": "delete_class", "label": int(label), "deleted": int(n), "k": k}
    for phase_name in ("before_compaction", "after_compaction"):
        snap = mem.snapshot()
        nb = snap.search(xq, k)
        pred = snap.vote(nb.first(min(k, 10)), method).label
        out[phase_name] = {"deleted_ids_returned": int(np.isin(nb.I, dead).sum()),
                           "queries_labelled_with_it": int((pred == label).sum()),
                           "neighbours_with_label": int((nb.labels == label).sum()),
                           "accuracy_others": float(np.mean(pred[yq != label] == yq[yq != label]))}
        if phase_name == "before_compaction":
            out["compaction"] = {k2: v for k2, v in (mem.compact() or {}).items() if k2 != "erasure"}
    mem.close()
    return out


def study_pruning(mem_dir: str, xq, yq, k: int = 10, threshold: Optional[int] = None) -> dict:
    """Accuracy per method: none, hard pruning (v over 100 nbrs >= threshold), soft pruning (gamma over 10)."""
    mem = VisualMemory.open(mem_dir)
    none = {m: accuracy(mem.snapshot(), xq, yq, k, m) for m in BASE_METHODS}
    rep_soft = mem.prune(hard=False, soft=True)
    soft = {m: accuracy(mem.snapshot(), xq, yq, k, f"soft_{m}") for m in BASE_METHODS}
    rep_hard = mem.prune(hard=True, soft=False, threshold=threshold)
    hard = {m: accuracy(mem.snapshot(), xq, yq, k, m) for m in BASE_METHODS}
    mem.close()
    return {"study": "pruning", "k": k, "none": none, "hard": hard, "soft": soft,
            "hard_pruned": rep_hard["hard_pruned"], "threshold": rep_hard["threshold"],
            "items_with_v_gt0": rep_soft["items_with_v_gt0"]}


def format_study(r: dict) -> str:
    if r["study"] == "pruning":
        lines = [f"pruning study (k={r['k']}, hard threshold {r['threshold']}: {r['hard_pruned']} items pruned)",
                 f"{'method':12s} {'none':>7s} {'hard':>7s} {'soft':>7s}"]
        for m in BASE_METHODS:
            lines.append(f"{m:12s} {100 * r['none'][m]:7.2f} {100 * r['hard'][m]:7.2f} {100 * r['soft'][m]:7.2f}")
        return "\n".join(lines)
    import json

    return json.dumps(r, indent=1, default=float)


STUDIES: Dict[str, Callable] = {"add_class": study_add_class, "delete_class": study_delete_class,
                                "pruning": study_pruning}


def run_study(cfg, name: str, label: Optional[int] = None) -> dict:
    """Run study `name` on a scratch copy of `cfg`'s memory with the `cfg.eval.split` queries."""
    from pipeline.eval.accuracy import load_queries
    from pipeline.runtime import init_ray

    if name not in STUDIES:
        raise UserError(f"unknown study {name!r}: choose one of {', '.join(STUDIES)}")
    xq, yq = load_queries(cfg)
    mem_dir = scratch_copy(cfg.memory_dir)
    try:
        if name == "pruning":
            init_ray(cfg)
            r = study_pruning(mem_dir, xq, yq, threshold=cfg.memory.hard_prune_threshold)
        else:
            r = STUDIES[name](mem_dir, xq, yq, int(label if label is not None else yq[0]))
    finally:
        shutil.rmtree(os.path.dirname(mem_dir), ignore_errors=True)
    storage.atomic_write_json(storage.join(cfg.workdir, "eval", f"study-{name}.json"), r)
    return r

"""Interventions: per-item, per-label and per-source vote multipliers and per-item label overrides.

Each call commits a new version of the interventions overlay (see `overlays.py`); votes and explanations
use the current one. A multiplier of 0 silences an item (or a whole label/source) without deleting it.
"""
from __future__ import annotations

from typing import Dict, Optional

from pipeline.errors import NotFound, UserError
from pipeline.memory.overlays import Interventions, load_interventions, save_interventions


def intervene(mem, item_weights: Optional[Dict[int, float]] = None, label_weights: Optional[Dict[int, float]] = None,
              source_weights: Optional[Dict[str, float]] = None,
              relabel: Optional[Dict[int, int]] = None, label_names: Optional[Dict[int, str]] = None,
              clear: bool = False) -> int:
    """Merge the given interventions into the current overlay (or start empty with `clear`); returns the version.

    `relabel` maps item id -> new label (its name from `label_names`, else the memory's name for that label).
    A weight of exactly 1.0 removes that entry.
    """
    iv = Interventions() if clear else load_interventions(mem.memory_dir)
    for i in list(item_weights or {}) + list(relabel or {}):
        if not mem._exists(int(i)):
            raise NotFound(f"cannot intervene on item {i}: it is not in the memory")
    for i, w in (item_weights or {}).items():
        it = iv.items.setdefault(int(i), {})
        it["weight"] = float(w)
    for i, lab in (relabel or {}).items():
        it = iv.items.setdefault(int(i), {})
        it["label"] = int(lab)
        it["label_name"] = (label_names or {}).get(int(lab)) or mem.base.label_name(int(lab))
    for lab, w in (label_weights or {}).items():
        iv.labels[int(lab)] = float(w)
    for src, w in (source_weights or {}).items():
        iv.sources[str(src)] = float(w)
    iv.items = {i: {k: v for k, v in it.items() if not (k == "weight" and v == 1.0)} for i, it in iv.items.items()}
    iv.items = {i: it for i, it in iv.items.items() if it}
    iv.labels = {k: v for k, v in iv.labels.items() if v != 1.0}
    iv.sources = {k: v for k, v in iv.sources.items() if v != 1.0}
    if not clear and not (item_weights or label_weights or source_weights or relabel):
        raise UserError("intervene needs item weights, label weights, source weights, relabels or clear")
    version = save_interventions(mem.memory_dir, iv)
    with mem._lock:
        mem.interventions = load_interventions(mem.memory_dir)
    return version

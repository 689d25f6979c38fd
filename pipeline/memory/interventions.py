"""Interventions: per-item, per-label and per-source vote multipliers and per-item label overrides.

Each call is one append to the state's overlay table (see `overlays.py`), visible to the next query in any
process. A multiplier of 0 silences an item (or a whole label/source) without deleting it; a weight of
exactly 1.0 removes that entry.
"""
from __future__ import annotations

from typing import Dict, Optional

from pipeline.errors import UserError
from pipeline.memory.snapshot import Snapshot
from pipeline.memory.state import MemoryState


def intervene(state: MemoryState, snap: Snapshot, item_weights: Optional[Dict[int, float]] = None, label_weights: Optional[Dict[int, float]] = None,
              source_weights: Optional[Dict[str, float]] = None,
              relabel: Optional[Dict[int, int]] = None, label_names: Optional[Dict[int, str]] = None,
              clear: bool = False) -> int:
    """Commit the given interventions (after a `clear` of all earlier ones if asked); returns the overlay
    table's new version. Unknown or deleted item ids raise NotFound."""
    if not clear and not (item_weights or label_weights or source_weights or relabel):
        raise UserError("intervene needs item weights, label weights, source weights, relabels or clear")
    snap.require_live([int(i) for i in list(item_weights or {}) + list(relabel or {})])
    rows = [{"kind": "clear"}] if clear else []
    rows += [{"kind": "item_weight", "target": int(i), "weight": float(w)} for i, w in (item_weights or {}).items()]
    rows += [{"kind": "item_label", "target": int(i), "label": int(lab),
              "label_name": (label_names or {}).get(int(lab)) or snap.label_name(int(lab))}
             for i, lab in (relabel or {}).items()]
    rows += [{"kind": "label_weight", "target": int(l), "weight": float(w)} for l, w in (label_weights or {}).items()]
    rows += [{"kind": "source_weight", "target": str(s), "weight": float(w)} for s, w in (source_weights or {}).items()]
    op = "clear" if clear and len(rows) == 1 else \
        ("relabel" if relabel and len(rows) == len(relabel) else "intervene")
    return state.set_overlays(rows, op=op, detail=f"{len(rows)} overlay row(s)")  # one commit, history with it

"""Rollback: undo the edits committed after a point of the edit history (`vmem versions`).

Undone: adds (the items go on the forget list with reason `rollback`, so they are erased like deletes),
relabels and interventions (their overlay rows are deleted), soft pruning (gamma goes back to the table
version current at that point, or is dropped when erasure has already removed that version). Never undone:
deletes: the forget list is final, so a rollback cannot bring back a deleted or erased item.
"""
from __future__ import annotations

import pyarrow as pa

from pipeline.errors import UserError
from pipeline.memory import deletes
from pipeline.memory.snapshot import Snapshot
from pipeline.memory.state import GAMMA, ITEMS, OVERLAYS, MemoryState


def rollback(state: MemoryState, snap: Snapshot, version: int) -> dict:
    """Undo what edit `version` (1-based, `vmem versions`) was followed by, except deletes; returns a report."""
    edits = state.edits()
    if not 1 <= int(version) <= len(edits):
        raise UserError(f"no version {version}: the memory has versions 1..{len(edits)} (see `vmem versions`)")
    cutoff = int(edits[int(version) - 1]["at"] * 1e9)
    later = [e for e in edits[int(version):]]
    added = state[ITEMS].read(["id"], f"vector IS NOT NULL AND added_at > {cutoff}").column("id").to_pylist()
    undone_adds = deletes.forget(state, snap, added, reason="rollback", detail=f"to version {version}") \
        if added else 0
    ov = state[OVERLAYS].read(["at"], f"at > {cutoff}").num_rows
    if ov:
        state[OVERLAYS].delete(f"at > {cutoff}")
    gamma_restored = None
    if any(e["op"] == "prune" for e in later):
        ds = state[GAMMA].dataset()
        older = [v["version"] for v in ds.versions() if v["timestamp"].timestamp() * 1e9 <= cutoff]
        t = ds.checkout_version(older[-1]).to_table() if older else state[GAMMA].schema.empty_table()
        state[GAMMA].overwrite(pa.Table.from_batches(t.to_batches(), schema=t.schema))
        gamma_restored = older[-1] if older else 0
    report = {"to_version": int(version), "edits_after": len(later), "adds_undone": undone_adds,
              "overlay_rows_removed": ov, "gamma_restored_from": gamma_restored,
              "deletes_kept": sum(1 for e in later if e["op"] in ("delete", "hard_prune"))}
    state.record("rollback", f"to version {version}: {undone_adds} add(s) undone, {ov} overlay row(s) removed")
    return report

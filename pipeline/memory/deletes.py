"""Deletes: what a delete selects, that it is final, and that a deleted key never comes back.

The same rules hold on every path (Python API, `vmem delete`, `DELETE /v1/items`), because every path calls
these functions:
- a delete names exactly one of: ids, a label, a source (`selection`);
- ids the memory never held are refused (NotFound); ids already deleted (erased or not) count as nothing;
- a label selects the live items whose *current* label (relabels applied) is that label; a source, the live
  items with that source;
- a delete is one append to the forget list (the commit point), final: searches exclude the ids inside faiss
  at once, compaction drops them, erasure removes every trace, a rebuild leaves them out, a rollback cannot
  bring them back, and an add of a deleted key is refused (by the state at commit time:
  `MemoryState.add_items`).
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence


from pipeline.errors import NotFound, UserError
from pipeline.memory.snapshot import Snapshot
from pipeline.memory.state import MemoryState


def selection(ids: Optional[Iterable[int]] = None, label: Optional[int] = None,
              source: Optional[str] = None) -> str:
    """Check that exactly one selector is given; returns its name ("ids", "label" or "source")."""
    given = [name for name, v in (("ids", ids), ("label", label), ("source", source)) if v is not None]
    if len(given) != 1:
        raise UserError(f"a delete names exactly one of ids, label or source (got "
                        f"{', '.join(given) if given else 'none'})")
    return given[0]


def select(snap: Snapshot, ids: Optional[Iterable[int]] = None, label: Optional[int] = None,
           source: Optional[str] = None) -> List[int]:
    """The ids a delete of `ids` / `label` / `source` applies to (see module docstring)."""
    what = selection(ids, label, source)
    if what == "ids":
        ids = [int(i) for i in ids]
        held = set(snap.state.items(ids, ["id"]).column("id").to_pylist())
        unknown = [i for i in ids if i not in held]
        if unknown:
            # An erased item has no row any more, only its salted digest on the forget list: a retried delete
            # of it (its first answer lost) counts as nothing, like a retry before erasure.
            gone = snap.state.is_forgotten(unknown)
            never = [i for i, g in zip(unknown, gone) if not g]
            if never:
                raise NotFound(f"{len(never)} id(s) are not in the memory, e.g. {never[:5]}")
        return [i for i in ids if i in held]
    if what == "source":
        return sorted(int(i) for i in snap.state.select(source=source))
    relabeled = {i: int(it["label"]) for i, it in snap.interventions.items.items() if "label" in it}
    cand = {int(i) for i in snap.state.select(label=label) if relabeled.get(int(i), int(label)) == int(label)}
    return sorted(cand | {i for i, lab in relabeled.items() if lab == int(label)})


def forget(state: MemoryState, snap: Snapshot, ids: Sequence[int], reason: str = "delete",
           detail: str = "") -> int:
    """Put the live ones of `ids` on the forget list (one commit); returns how many were live."""
    rows = snap.live_rows(sorted({int(i) for i in ids}), ["id", "key", "shard"])
    if rows.num_rows:
        # One commit, the history line with it; the line names no item: it must hold nothing erasure would
        # have to find.
        state.forget(rows.select(["id", "key", "shard"]), reason=reason,
                     detail=f"{rows.num_rows} item(s) {detail}".strip())
    return rows.num_rows

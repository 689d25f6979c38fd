"""Build (or rebuild) a memory from embeddings while keeping its state: the forget list and the adds.

A rebuild trains new faiss shards from the embedding parts, leaving out every item on the forget list (it
says how many); items added since the first build are not in the parts, so they stay in the item table and
are searched from the delta until the next compaction folds them into the new shards (their `indexed`
version is not in the new manifest's lineage). The item table gets a row for every newly built item.
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import pyarrow as pa

from pipeline.errors import DataError
from pipeline.index.build import build_index
from pipeline.index.build import scan_inputs
from pipeline.index.manifest import Manifest
from pipeline.embed.parts import iter_embedding_batches
from pipeline.memory.state import ITEM_SCHEMA, ITEMS, META_FIELDS, MemoryState, item_rows

log = logging.getLogger("vmem.memory")


def build_memory(cfg, split: str = "train", attempts: int = 3) -> Manifest:
    """Build the memory at `cfg.memory_dir` from the `split` embeddings, honouring its forget list.

    A concurrent erasure may rewrite the embedding parts under a running build; the index build notices (its
    item count no longer matches) and this starts again from the new parts, up to `attempts` times."""
    for attempt in range(attempts):
        try:
            return _build(cfg, split)
        except DataError as e:
            if "inputs changed" not in str(e) or attempt == attempts - 1:
                raise
            log.warning("embeddings changed during the build (%s): building again", e)
    raise AssertionError("unreachable")


def _build(cfg, split: str) -> Manifest:
    state = MemoryState(cfg.memory_dir)
    emb_dir = cfg.embeddings_dir(split)
    ids, _, _ = scan_inputs(emb_dir)
    forgotten = ids[state.is_forgotten(ids)] if state[ITEMS].exists() or state["forget"].exists() else ids[:0]
    if len(forgotten):
        print(f"build: leaving out {len(forgotten):,} deleted item(s) that {emb_dir} still holds")
    manifest = build_index(cfg, split, exclude=forgotten,
                           commit_guard=lambda m: _forget_guard(state, emb_dir, ids, forgotten))
    imported = import_items(state, emb_dir, manifest.version, forgotten)
    state.record("build", f"v{manifest.version}: {manifest.count:,} items from {split} "
                          f"({len(forgotten):,} deleted left out, {imported:,} new rows in the item table)")
    return manifest


@contextlib.contextmanager
def _forget_guard(state: MemoryState, emb_dir: str, ids: np.ndarray, excluded: np.ndarray):
    """Held across the build's commit: items deleted (and perhaps already erased) while the build ran are in
    its shards; under the erasure lease, put them back on the forget list by id, so they are excluded from the
    first query on and erased by the next compaction."""
    from pipeline.memory import erasure, lease

    # The erasure lease: a dead eraser is taken over at once, a live one is waited for (erasure by locator
    # takes seconds), one that stopped renewing after `lease.LEASE_S`.
    try:
        held = erasure.hold(state.memory_dir, "build", timeout_s=120)
    except lease.LeaseHeld as e:
        raise DataError(f"cannot commit the build: {e}; run `vmem build` again when that erasure is done") from None
    try:
        late = ids[state.is_forgotten(ids) & ~np.isin(ids, excluded)]
        if len(late):
            log.info("build: %d item(s) were deleted while it ran: keeping them deleted", len(late))
            rows = _part_rows(emb_dir, late)
            state.forget(rows, reason="delete")
        yield
    finally:
        held.release()


def _part_rows(emb_dir: str, ids: np.ndarray) -> pa.Table:
    """(id, key, shard) of every id in `ids`: from the embedding parts where they still hold it (erasure
    needs key and tar to find its image), empty strings where an erasure already removed it from them."""
    found = {}
    for batch in iter_embedding_batches(emb_dir, 1 << 16, columns=["id", "key", "shard"]):
        keep = np.isin(batch.column("id").to_numpy(), ids)
        if keep.any():
            for r in batch.filter(pa.array(keep)).to_pylist():
                found[int(r["id"])] = r
    rows = [found.get(int(i), {"id": int(i), "key": "", "shard": ""}) for i in ids]
    return pa.table({"id": pa.array([r["id"] for r in rows], pa.int64()), "key": [r["key"] for r in rows],
                     "shard": [r["shard"] for r in rows]})


def import_items(state: MemoryState, emb_dir: str, version: int, exclude: np.ndarray) -> int:
    """Append item-table rows for the embedding rows the table does not hold yet (metadata only: their vectors
    stay in the parts and the shards). Returns how many rows were added.

    One anti-join inside Lance (`merge_insert` on id, insert when not matched), fed the parts batch by batch:
    this process never holds the table's ids, and the rows are committed at once (a rebuild that adds
    nothing commits nothing but an empty merge)."""
    exclude = np.asarray(exclude, np.int64)

    def batches():
        for batch in iter_embedding_batches(emb_dir, 1 << 16, columns=["id", *META_FIELDS]):
            keep = ~np.isin(batch.column("id").to_numpy(), exclude)
            if keep.any():
                sub = batch.filter(pa.array(keep))
                yield from item_rows(sub.column("id").to_pylist(), sub.select(list(META_FIELDS)).to_pylist(),
                                     indexed=version).to_batches()

    added = state.import_items(pa.RecordBatchReader.from_batches(ITEM_SCHEMA, batches()))
    if added:
        state[ITEMS].index_ids()
    return added

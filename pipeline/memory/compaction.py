"""Compaction: fold the delta into the shards, drop forgotten vectors, commit manifest v+1, then erase.

Any process may compact at any time, beside any number of writers and readers:
  1. snapshot: the current manifest vN, the forget list and the delta (rows of the item table the shards do
     not hold), all read from committed versions;
  2. for each shard with changes: load it, `remove_ids` its forgotten ids and the delta ids routed to it (so a
     re-fold after a crash never duplicates), `add_with_ids` the delta items, and write the new files into a
     folder of its own (`shards/vN+1-<uuid>/`): untouched shards are referenced as they are;
  3. commit manifest vN+1 by creating its file exclusively: if another compaction (or a build) committed vN+1
     first, this one steps aside and removes its own files; nothing else was changed;
  4. mark the folded rows `indexed = N+1` and drop the forgotten ids' rows from the item table (edits made
     after the snapshot are untouched: they stay in the delta / forget list for the next compaction);
  5. erasure (`erasure.py`) once `memory.grace_period_s` has passed, so readers still on vN finish first.
A crash at any step leaves a readable memory with nothing lost: before 3 nothing visible changed; after 3
readers on vN+1 see the folded rows twice at most (deduplicated by id) until 4 runs again.

`VMEM_COMPACT_HANG_AT=<step>` (tests only) makes the process write `<memory>/.hang-<step>` and sleep at that
step, so a test can kill it there.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Dict, List, Optional

import faiss
import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.errors import NotFound
from pipeline.index import train as itrain
from pipeline.index.manifest import CommitConflict, ShardEntry, version_name
from pipeline.data.items import ITEM_FIELDS, META_COLUMNS
from pipeline.index.shard import (mark_writing, open_vectors, read_index, read_meta, read_shard_vectors,
                                  save_shard)
from pipeline.memory import erasure
from pipeline.memory.killpoints import hang_point
from pipeline.memory.snapshot import Snapshot
from pipeline.memory.state import ITEMS, MemoryState, id_filter, retry
from pipeline.runtime import phase

log = logging.getLogger("vmem.compaction")
def _meta_table(ids: np.ndarray, metas: Dict[int, dict], schema: pa.Schema) -> pa.Table:
    rows = {"id": pa.array(ids, pa.int64())}
    for f in ITEM_FIELDS:
        rows[f.name] = [metas[int(i)].get(f.name) if metas[int(i)].get(f.name) is not None else f.fill for i in ids]
    return pa.table(rows).select(list(META_COLUMNS)).cast(schema)


def compact(state: MemoryState, snap: Snapshot, force: bool = False,
            grace_s: Optional[float] = None) -> Optional[dict]:
    """Compact the memory whose committed state `snap` is (newest first: a compaction from an old snapshot
    steps aside at commit); returns a report dict, or None when there was nothing to do or another writer
    committed the next version first. Erasure runs at once when the grace period (`grace_s`, default
    `memory.grace_period_s`) is 0, else at the first compaction or `vmem compact` after it."""
    memory_dir, cfg = snap.memory_dir, snap.cfg
    grace = float(cfg.memory.grace_period_s if grace_s is None else grace_s)
    base, dead = snap.base, snap.forgotten.copy()
    d_ids, d_xb = snap.delta.vectors()
    keep = ~np.isin(d_ids, dead)
    d_ids, d_xb = d_ids[keep], d_xb[keep]
    if not force and not len(dead) and not len(d_ids):
        log.info("compaction: nothing to fold (no delta, no deletions)")
        return _not_committed(memory_dir, state, cfg, snap.base.manifest.version)  # the backlog that is due
    d_meta = _item_meta(state, d_ids)
    store, m = base.store, base.manifest
    t0 = time.perf_counter()
    new_version = m.version + 1
    tag = uuid.uuid4().hex[:8]
    marker = mark_writing(memory_dir, f"{version_name(new_version)}-{tag}")  # sweeps keep it meanwhile
    route = itrain.shard_of(d_ids, m.num_shards) if len(d_ids) else np.zeros(0, np.int64)
    hang_point(memory_dir, "start")
    entries: List[ShardEntry] = []
    removed_total = added_total = 0
    # Ids route to shards by `shard_of` (builds and compactions alike): a shard no deleted or added id routes
    # to is untouched without reading it.
    dead_shards = set(itrain.shard_of(dead, m.num_shards).tolist()) if len(dead) else set()
    folded = np.zeros(0, np.int64)  # delta ids a shard already holds (a compaction that died before marking)
    with phase(f"compaction of {memory_dir} v{m.version} -> v{new_version}"):
        try:
            for s in m.shards:
                if not force and s.shard not in dead_shards and not (route == s.shard).any():
                    entries.append(s)
                    continue
                meta = read_meta(store.url(s.meta_path), s.meta_sha256).select(list(META_COLUMNS))
                ids = meta.column("id").to_numpy()
                gone = np.isin(ids, dead)
                mine = route == s.shard
                if not force:  # folded already (same id, same vector): mark it, never remove and re-add it
                    held = mine & np.isin(d_ids, ids)
                    folded = np.union1d(folded, d_ids[held])
                    mine &= ~held
                if not gone.any() and not mine.any() and not force:
                    entries.append(s)  # untouched: v+1 references the same files
                    continue
                index = read_index(store.url(s.path), s.sha256, mmap=False)  # RAM copy: we modify it
                drop = np.ascontiguousarray(np.union1d(ids[gone], d_ids[mine]), dtype=np.int64)
                if len(drop):
                    removed_total += int(index.remove_ids(faiss.IDSelectorBatch(len(drop), faiss.swig_ptr(drop))))
                keep_meta = ~np.isin(ids, drop)
                parts = [meta.filter(pa.array(keep_meta))]
                # The re-rank file travels with its rows: kept rows (sorted by id, like the kept meta), then adds.
                old = read_shard_vectors(memory_dir, s, drop_ids=drop)
                vecs = None if old is None else [old[1]]
                if mine.any():
                    itrain.add_vectors(index, d_xb[mine], d_ids[mine])  # encoded with the shared trained quantizer
                    added_total += int(mine.sum())
                    parts.append(_meta_table(d_ids[mine], d_meta, parts[0].schema))
                    if vecs is not None:
                        vecs.append(d_xb[mine])
                dtype = open_vectors(store.url(s.vectors_path)).dtype.name if old is not None else "float32"
                entries.append(save_shard(memory_dir, new_version, s.shard, index, pa.concat_tables(parts), tag=tag,
                                          vectors=None if vecs is None else np.concatenate(vecs), rerank_dtype=dtype))
                hang_point(memory_dir, "shard")
        except (NotFound, FileNotFoundError) as e:
            # With no grace period an erasure sweeps the files of superseded versions at once: a compaction
            # whose snapshot another one superseded meanwhile finds them gone, and steps aside as at commit.
            if store.current_version() == m.version:
                raise
            _discard(store, m, entries, marker)
            log.info("compaction stepped aside: v%d was superseded while it ran (%s)", m.version, e)
            return None
        if not force and all(e is s for e, s in zip(entries, m.shards)) and store.current_version() != m.version:
            _discard(store, m, entries, marker)  # nothing to do from an old snapshot: the newer one decides
            return None
        if not force and all(e is s for e, s in zip(entries, m.shards)):
            # Nothing to fold or remove (another compaction did it, or the deleted ids only wait for their
            # erasure): no new version. Ids the backlog lacks (a compaction killed before scheduling) join it.
            storage.remove(marker)
            mark_folded(state, folded, m.version)
            known = erasure.pending_ids(memory_dir)
            missing = dead[~np.isin(dead, known)]
            if len(missing):
                erasure.schedule(memory_dir, m.version, missing, time.time() + grace)
            log.info("compaction: nothing to fold or remove in v%d (%d deleted id(s) wait for erasure)", m.version,
                     len(dead))
            return _not_committed(memory_dir, state, cfg, m.version)
        hang_point(memory_dir, "before_commit")
        names = dict(m.build.get("label_names", {}))
        names.update({str(d_meta[int(i)]["label"]): d_meta[int(i)]["label_name"] for i in d_ids.tolist()})
        new = m.next_version(shards=entries)
        new.version = new_version
        new.build = {**m.build, "label_names": names, "lineage": [*base.lineage, new_version],
                     "compaction": {"from": m.version, "removed": removed_total, "added": added_total,
                                    "at": time.time()}}
        try:
            store.commit(new)
        except CommitConflict as e:
            _discard(store, m, entries, marker)
            log.info("compaction stepped aside: %s", e)
            return None
        storage.remove(marker)
        hang_point(memory_dir, "after_commit")
        mark_folded(state, d_ids, new_version)
        mark_folded(state, folded, m.version)
        for f in id_filter(dead.tolist()):
            state[ITEMS].delete(f)
        state.record("compact", f"v{new_version}: folded {len(d_ids)} added item(s), removed "
                                    f"{removed_total} vector(s) of {len(dead)} deleted item(s)")
    seconds = time.perf_counter() - t0
    report = {"version": new_version, "parent": m.version, "committed": True, "removed": removed_total,
              "added": added_total,
              "erased_ids": int(len(dead)), "seconds": seconds,
              "items_per_s": (removed_total + added_total + sum(e.count for e in entries)) / max(seconds, 1e-9)}
    log.info("compaction committed v%d: removed %d, added %d in %.2f s", new_version, removed_total, added_total,
             seconds)
    hang_point(memory_dir, "before_erase")
    # One backlog: ids already pending (scheduled by an earlier compaction) are not scheduled again.
    known = erasure.pending_ids(memory_dir)
    erasure.schedule(memory_dir, new_version, dead[~np.isin(dead, known)], time.time() + grace)
    report.update(_erase_now(memory_dir, state, cfg))
    return report


def _discard(store, m, entries: List[ShardEntry], marker: str) -> None:
    """Remove the shard files this compaction wrote (it commits nothing) and its being-written marker."""
    for e_new in entries:
        if e_new not in m.shards:
            storage.remove(store.url(e_new.path))
            storage.remove(store.url(e_new.meta_path))
    storage.remove(marker)


def _not_committed(memory_dir: str, state: MemoryState, cfg, version: int) -> Optional[dict]:
    """No new version: drain the erasure backlog that is due; a report if that erased something, else None."""
    done = _erase_now(memory_dir, state, cfg)
    if not isinstance(done["erasure"], dict):
        return None
    return {"version": version, "parent": version, "committed": False, "removed": 0, "added": 0, **done}


def _erase_now(memory_dir: str, state: MemoryState, cfg) -> dict:
    """Drain the erasure backlog that is due: {"erasure": the report summary, or "deferred: <why>, retry at
    <time>", or None when nothing was pending; "erased_ids": how many ids were erased now}."""
    st = erasure.drain(memory_dir, state, cfg)
    if st["status"] == "erased":
        return {"erasure": st["report"], "erased_ids": int(st["report"]["erased_ids"])}
    if st["status"] == "deferred":
        text = erasure.deferred_text(st)
        log.warning("compaction: erasure %s", text)
        return {"erasure": text, "erased_ids": 0}
    return {"erasure": None, "erased_ids": 0}


def _item_meta(state: MemoryState, ids: np.ndarray) -> Dict[int, dict]:
    """id -> shard metadata columns of these items, read from the item table (the source of truth)."""
    t = state.items(ids.tolist(), list(META_COLUMNS)) if len(ids) else None
    return {} if t is None else {int(r["id"]): r for r in t.to_pylist()}


def mark_folded(state, ids: np.ndarray, version: int) -> None:
    """Record that the shards of `version` hold these delta rows (Lance retries the update on conflicts)."""
    for f in id_filter(ids.tolist()):
        retry(lambda: state[ITEMS].dataset().update({"indexed": str(int(version))},
                                                    where=f"({f}) AND vector IS NOT NULL"))

"""Compaction: fold the delta into the shards, drop tombstoned vectors, commit manifest v+1, erase the old.

Steps (each crash point leaves a readable memory with nothing lost, because nothing the current version
references is touched before the commit and nothing is erased before it):
  1. snapshot delta, tombstones and their log positions;
  2. for each shard with changes: load it, `remove_ids` its tombstoned ids, `add_with_ids` the delta items
     routed to it (id % num_shards; the IVF encodes them with the shared trained quantizer), write new
     `shards/vN+1/...` index + meta files atomically (untouched shards are referenced as they are);
  3. under the writer lock: carry log records appended since the snapshot into fresh logs of vN+1, commit
     manifest vN+1 (`CURRENT` replaced last), switch the open memory to it;
  4. after `memory.grace_period_s`: remove superseded shard files, old logs and blobs of deleted items, then
     verify every erased id is absent from every live file and write `erasure/report-vN+1.json`.

`VMEM_COMPACT_HANG_AT=<step>` (tests only) makes the process write `<memory>/.hang-<step>` and sleep at that
step, so a test can kill it there.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Dict, List, Optional

import faiss
import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.index import train as itrain
from pipeline.index.manifest import ManifestStore, ShardEntry, version_name
from pipeline.index.shard import META_COLUMNS, read_index, read_meta, save_shard
from pipeline.memory.base import blob_url, default_log_url
from pipeline.memory.logs import AppendLog
from pipeline.runtime import phase

log = logging.getLogger("vmem.compaction")
HANG_ENV = "VMEM_COMPACT_HANG_AT"


def _hang_point(memory_dir: str, step: str) -> None:
    if os.environ.get(HANG_ENV) == step:
        storage.atomic_write_bytes(storage.join(memory_dir, f".hang-{step}"), b"")
        while True:
            time.sleep(1)


def index_ids(index: faiss.Index) -> np.ndarray:
    """Every external id stored in an IVF index's inverted lists (what erasure verification scans)."""
    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    out = []
    for lst in range(ivf.nlist):
        n = inv.list_size(lst)
        if n:
            ptr = inv.get_ids(lst)
            out.append(faiss.rev_swig_ptr(ptr, n).copy())
            inv.release_ids(lst, ptr)
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def _meta_table(rows: Dict[str, list]) -> pa.Table:
    types = {"id": pa.int64(), "label": pa.int64()}
    return pa.table({c: pa.array(rows[c], types.get(c, pa.string())) for c in META_COLUMNS})


def compact(mem, force: bool = False) -> Optional[dict]:
    """Compact `mem` (a VisualMemory); returns a report dict, or None when there is nothing to do."""
    cfg_mem = mem.cfg.memory if mem.cfg is not None else None
    grace = float(getattr(cfg_mem, "grace_period_s", 0.0))
    _erase_due(mem.memory_dir)
    with mem._lock:
        mem.refresh()
        base, delta, tomb = mem.base, mem.delta, mem.tombstones
        dead = tomb.ids.copy()
        d_ids, d_xb = delta.vectors()
        d_meta = {i: dict(delta.meta[i]) for i in d_ids.tolist()}
        pos = (delta.position, tomb.position)
    if not force and not len(dead) and not len(d_ids):
        log.info("compaction: nothing to fold (no delta, no tombstones)")
        return None
    store, m = base.store, base.manifest
    t0 = time.perf_counter()
    new_version = store.next_version()
    keep_delta = ~np.isin(d_ids, dead)
    d_ids, d_xb = d_ids[keep_delta], d_xb[keep_delta]
    route = itrain.shard_of(d_ids, m.num_shards) if len(d_ids) else np.zeros(0, np.int64)
    _hang_point(mem.memory_dir, "start")
    entries: List[ShardEntry] = []
    removed_total = added_total = 0
    with phase(f"compaction of {mem.memory_dir} v{base.version} -> v{new_version}"):
        for s in m.shards:
            meta = read_meta(store.url(s.meta_path), s.meta_sha256).select(list(META_COLUMNS))
            ids = meta.column("id").to_numpy()
            gone = np.isin(ids, dead)
            mine = route == s.shard
            if not gone.any() and not mine.any() and not force:
                entries.append(s)  # untouched: v+1 references the same files
                continue
            index = read_index(store.url(s.path), s.sha256, mmap=False)  # RAM copy: we modify it
            if gone.any():
                sel_ids = np.ascontiguousarray(ids[gone], dtype=np.int64)
                removed_total += int(index.remove_ids(faiss.IDSelectorBatch(len(sel_ids), faiss.swig_ptr(sel_ids))))
            if mine.any():
                itrain.add_vectors(index, d_xb[mine], d_ids[mine])  # encoded with the shared trained quantizer
                added_total += int(mine.sum())
            parts = [meta.filter(pa.array(~gone))]
            if mine.any():
                rows = {"id": d_ids[mine].tolist()}
                for c in META_COLUMNS[1:]:
                    fill = -1 if c == "label" else ""
                    rows[c] = [d_meta[i].get(c) if d_meta[i].get(c) is not None else fill for i in rows["id"]]
                parts.append(_meta_table(rows).cast(parts[0].schema))
            entries.append(save_shard(mem.memory_dir, new_version, s.shard, index, pa.concat_tables(parts)))
            _hang_point(mem.memory_dir, "shard")
        _hang_point(mem.memory_dir, "before_commit")
        logs_rel = {name: f"logs/{version_name(new_version)}-{uuid.uuid4().hex[:8]}/{name}.jsonl"
                    for name in ("delta", "tombstones")}
        with mem._lock:
            # Records appended after the snapshot were not folded: they move to the new version's logs.
            tail_delta, _ = AppendLog(base.log_url("delta")).read(pos[0])
            tail_tomb, _ = AppendLog(base.log_url("tombstones")).read(pos[1])
            AppendLog(store.url(logs_rel["delta"])).append(tail_delta)
            AppendLog(store.url(logs_rel["tombstones"])).append(tail_tomb)
            new = m.next_version(shards=entries, logs=dict(logs_rel))
            new.version = new_version
            new.build = {**m.build, "compaction": {"from": base.version, "removed": removed_total,
                                                   "added": added_total, "at": time.time()}}
            store.commit(new)
            _hang_point(mem.memory_dir, "after_commit")
            old_manifest, old_logs = m, [base.log_url("delta"), base.log_url("tombstones")]
            mem._load(None)
    seconds = time.perf_counter() - t0
    live = {store.url(e.path) for e in entries} | {store.url(e.meta_path) for e in entries}
    superseded = sorted(({store.url(s.path) for s in old_manifest.shards} |
                         {store.url(s.meta_path) for s in old_manifest.shards}) - live) + old_logs
    stored = set(storage.listdir(storage.join(mem.memory_dir, "blobs")))
    blobs = [blob_url(mem.memory_dir, i) for i in dead.tolist() if f"{i}.png" in stored]
    report = {"version": new_version, "parent": base.version, "removed": removed_total, "added": added_total,
              "erased_ids": int(len(dead)), "seconds": seconds,
              "items_per_s": (removed_total + added_total + sum(e.count for e in entries)) / max(seconds, 1e-9),
              "superseded_files": len(superseded)}
    log.info("compaction committed v%d: removed %d, added %d in %.2f s", new_version, removed_total, added_total,
             seconds)
    pending = {"version": new_version, "due": time.time() + grace, "files": superseded + blobs,
               "ids": dead.tolist()}
    _hang_point(mem.memory_dir, "before_erase")
    storage.atomic_write_json(_pending_url(mem.memory_dir, new_version), pending)
    if grace <= 0:
        erasure = _erase(mem.memory_dir, pending)
        report["erasure"] = {k: erasure[k] for k in ("verified", "found", "ids_checked")}
        report["erasure"]["removed_files"] = len(erasure["removed_files"])
    else:
        threading.Timer(grace, _erase_due, args=(mem.memory_dir,)).start()
    return report


def _pending_url(memory_dir: str, version: int) -> str:
    return storage.join(memory_dir, "erasure", f"pending-{version_name(version)}.json")


def _erase_due(memory_dir: str) -> None:
    """Erase every pending file set whose grace period is over (also done at the start of each compaction)."""
    for name in storage.listdir(storage.join(memory_dir, "erasure")):
        if name.startswith("pending-") and name.endswith(".json"):
            pending = storage.read_json(storage.join(memory_dir, "erasure", name))
            if pending["due"] <= time.time():
                _erase(memory_dir, pending)


def _erase(memory_dir: str, pending: dict) -> dict:
    """Remove superseded files, then verify the erased ids are absent from every live file; write the report."""
    for url in pending["files"]:
        storage.remove(url)
    swept = sweep_unreferenced(memory_dir)
    report = verify_erased(memory_dir, np.asarray(pending["ids"], dtype=np.int64))
    report["removed_files"] = pending["files"] + swept
    report["erased_ids"] = pending["ids"]
    report["version"] = pending["version"]
    storage.atomic_write_json(storage.join(memory_dir, "erasure", f"report-{version_name(pending['version'])}.json"),
                              report)
    storage.remove(_pending_url(memory_dir, pending["version"]))
    if not report["verified"]:
        log.error("erasure verification FAILED: %s", report["found"])
    return report


def sweep_unreferenced(memory_dir: str) -> List[str]:
    """Remove shard/log files and blobs the current version does not reference (left by a killed compaction
    or an older version), so erasure is complete even after a crash. Returns the removed URLs."""
    store = ManifestStore(memory_dir)
    m = store.load()
    keep = {store.url(e.path) for e in m.shards} | {store.url(e.meta_path) for e in m.shards}
    keep |= {default_log_url(store, m, n) for n in ("delta", "tombstones")}
    removed = []
    for top in ("shards", "logs"):
        for sub in storage.listdir(store.url(top)):
            folder = storage.join(store.url(top), sub)
            names = storage.listdir(folder)
            dead = [storage.join(folder, n) for n in names if storage.join(folder, n) not in keep]
            for url in dead:
                storage.remove(url)
            removed += dead
            if len(dead) == len(names) and not storage.is_remote(folder):
                storage.remove(folder)
    blob_dir = storage.join(memory_dir, "blobs")
    blob_names = storage.listdir(blob_dir)
    if blob_names:
        live = set()
        for e in m.shards:
            live.update(read_meta(store.url(e.meta_path)).column("id").to_pylist())
        delta, _ = AppendLog(default_log_url(store, m, "delta")).read()
        live.update(int(r["id"]) for r in delta)
        for n in blob_names:
            if n.split(".")[0].isdigit() and int(n.split(".")[0]) not in live:
                storage.remove(storage.join(blob_dir, n))
                removed.append(storage.join(blob_dir, n))
    return removed


def verify_erased(memory_dir: str, ids: np.ndarray) -> dict:
    """Scan the current version's shard indexes (inverted-list ids), meta files and delta log for `ids`."""
    store = ManifestStore(memory_dir)
    m = store.load()
    found: Dict[str, int] = {}
    scanned = []
    for s in m.shards:
        idx = read_index(store.url(s.path), mmap=False)
        for url, present in ((s.path, index_ids(idx)), (s.meta_path, read_meta(store.url(s.meta_path))
                                                          .column("id").to_numpy())):
            hit = int(np.isin(ids, present).sum())
            scanned.append(url)
            if hit:
                found[url] = hit
    delta_records, _ = AppendLog(default_log_url(store, m, "delta")).read()
    hit = int(np.isin(ids, [int(r["id"]) for r in delta_records]).sum())
    scanned.append(m.logs.get("delta", "delta"))
    if hit:
        found["delta"] = hit
    blobs = [i for i in ids.tolist() if storage.exists(blob_url(memory_dir, i))]
    if blobs:
        found["blobs"] = len(blobs)
    return {"ids_checked": int(len(ids)), "scanned": scanned, "found": found, "verified": not found,
            "checked_at": time.time()}

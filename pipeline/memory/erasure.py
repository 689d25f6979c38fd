"""Erasure: after a compaction (and its grace period), remove every trace of the deleted items the project
wrote under the workdir, then check that it is so and write a report that lists every file checked.

What is erased, for the ids a compaction removed from the shards:
- image tars under `<workdir>/shards/` rewritten without the items' samples; embedding parts under
  `<workdir>/embeddings/` rewritten without their rows (both atomically, under the same names);
- the state tables: item rows, overlay rows (relabels, weights), gamma rows deleted; forget rows keep only a
  salted digest; then Lance compacts the touched fragments and removes every older table version;
- shard folders no version at or after the current one references; blobs (`memory/blobs/<id>.png`);
- local cached copies of remote files (`pipeline.storage.local_copy`) that were rewritten or removed.
Not erased by design: the forget list's salted digests (how a rebuild recognises a deleted item), and
the trained quantizer (centroids from a training sample, holding no item's vector or id).
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from datetime import timedelta
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.index.manifest import ManifestStore, version_name
from pipeline.index.shard import being_written
from pipeline.memory.base import blob_url
from pipeline.memory.state import FORGET, GAMMA, ITEMS, OVERLAYS, SCHEMAS, MemoryState, id_filter, retry

log = logging.getLogger("vmem.erasure")


def workdir_of(memory_dir: str, cfg=None) -> str:
    """The workdir whose shards/ and embeddings/ belong to this memory: the config's, else the parent of a
    memory dir named `memory` (the project's layout), else the memory dir alone (never an unrelated parent)."""
    if cfg is not None:
        return str(cfg.workdir).rstrip("/")
    parent, _, name = str(memory_dir).rstrip("/").rpartition("/")
    return parent if name == "memory" and parent else str(memory_dir).rstrip("/")


def _pending_url(memory_dir: str, version: int) -> str:
    return storage.join(memory_dir, "erasure", f"pending-{version_name(version)}.json")


def schedule(memory_dir: str, version: int, ids: np.ndarray, due: float) -> dict:
    """Record that `ids` (removed from the shards by compaction `version`) are to be erased at `due`."""
    pending = {"version": int(version), "due": float(due), "ids": [int(i) for i in ids]}
    storage.atomic_write_json(_pending_url(memory_dir, version), pending)
    return pending


def erase_due(memory_dir: str, state: MemoryState, cfg=None, now: Optional[float] = None) -> List[dict]:
    """Run every scheduled erasure whose grace period is over; returns their reports."""
    out = []
    for name in storage.listdir(storage.join(memory_dir, "erasure")):
        if name.startswith("pending-") and name.endswith(".json"):
            url = storage.join(memory_dir, "erasure", name)
            try:
                pending = storage.read_json(url)
            except FileNotFoundError:
                continue  # another process erased it meanwhile
            if pending["due"] <= (now if now is not None else time.time()):
                report = erase(memory_dir, state, pending, cfg)
                if report is not None:
                    out.append(report)
    return out


LOCK_STALE_S = 600.0  # a lock older than this belongs to an eraser that died: the next one takes over


def _lock_url(memory_dir: str) -> str:
    return storage.join(memory_dir, "erasure", "LOCK")


def acquire(memory_dir: str) -> bool:
    """Take the memory's erasure lock (one eraser at a time: two would race on the same table versions)."""
    url = _lock_url(memory_dir)
    for _ in range(2):
        try:
            storage.create_exclusive(url, json.dumps({"pid": os.getpid(), "at": time.time()}).encode())
            return True
        except storage.AlreadyExists:
            try:
                held = storage.read_json(url)
            except (FileNotFoundError, ValueError):
                continue
            if time.time() - float(held.get("at", 0)) < LOCK_STALE_S:
                return False
            storage.remove(url)  # stale
    return False


def erase(memory_dir: str, state: MemoryState, pending: dict, cfg=None, attempts: int = 3) -> Optional[dict]:
    """Erase the ids of `pending` from every artifact, verify, and write the report; returns its summary, or
    None when another process holds the erasure lock (it, or a later compaction, erases them)."""
    if not acquire(memory_dir):
        log.info("erasure of v%s: another process is erasing; leaving it to that one", pending["version"])
        return None
    try:
        return _erase_locked(memory_dir, state, pending, cfg, attempts)
    finally:
        release(memory_dir)


def release(memory_dir: str) -> None:
    storage.remove(_lock_url(memory_dir))


def _erase_locked(memory_dir: str, state: MemoryState, pending: dict, cfg, attempts: int) -> dict:
    ids = np.asarray(pending["ids"], dtype=np.int64)
    t0 = time.perf_counter()
    workdir = workdir_of(memory_dir, cfg)
    changed: List[str] = []
    blobs: List[str] = []
    if len(ids):
        rows = pa.concat_tables([state[FORGET].read(["id", "key", "shard"], f) for f in id_filter(ids.tolist())])
        changed += _rewrite_tars(rows)
        changed += _rewrite_parts(storage.join(workdir, "embeddings"), ids)
        blobs = [u for u in (blob_url(memory_dir, i) for i in ids.tolist()) if storage.exists(u)]
        for url in blobs:
            storage.remove(url)
    changed += sweep_superseded(memory_dir, pending["version"])
    for url in changed:
        storage.evict(url)
    # Writers keep committing while we erase (a fold rewriting rows read before our delete, an index built on
    # an older version): erase the tables and check again until nothing is found.
    for attempt in range(attempts):
        if len(ids):
            _erase_tables(state, ids)
        report = verify_erased(memory_dir, state, ids, workdir)
        if report["verified"]:
            break
        log.info("erasure of v%s: traces left by concurrent writers (%s), erasing again", pending["version"],
                 report["found"])
    # Counts, never ids: blob names are ids, and the report must hold nothing of an erased item.
    report.update({"version": pending["version"], "erased_ids": int(len(ids)), "rewritten_or_removed": changed,
                   "blobs_removed": len(blobs), "attempts": attempt + 1, "seconds": time.perf_counter() - t0})
    storage.atomic_write_json(storage.join(memory_dir, "erasure", f"report-{version_name(pending['version'])}.json"),
                              report)
    storage.remove(_pending_url(memory_dir, pending["version"]))
    if not report["verified"]:
        log.error("erasure verification FAILED: %s", report["found"])
    return {k: report[k] for k in ("verified", "found", "ids_checked", "files_checked")} | \
        {"rewritten_or_removed": len(changed) + len(blobs)}


def _rewrite_tars(rows: pa.Table) -> List[str]:
    """Rewrite each image tar that holds samples of the forgotten rows without those samples."""
    from pipeline.data.shards import tar_key

    by_tar: Dict[str, set] = {}
    for r in rows.to_pylist():
        if r["shard"]:
            by_tar.setdefault(r["shard"], set()).add(r["key"])
    changed = []
    for url, keys in by_tar.items():
        if storage.exists(url) and _rewrite_tar(url, keys, {tar_key(k) for k in keys}):
            changed.append(url)
    return changed


def _rewrite_tar(url: str, keys: set, tar_keys: set) -> bool:
    """Drop every member of the samples whose json key is in `keys` (or whose name is one of `tar_keys`)."""
    data = storage.read_bytes(url)
    members = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read() if m.isfile() else None))
    drop = set()
    for m, body in members:
        base, _, ext = m.name.rpartition(".")
        if ext == "json" and body is not None:
            try:
                if json.loads(body).get("key") in keys:
                    drop.add(base)
            except ValueError:
                pass
        if base.rsplit("/", 1)[-1] in tar_keys:
            drop.add(base)
    if not drop:
        return False
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for m, body in members:
            if m.name.rpartition(".")[0] not in drop:
                tar.addfile(m, io.BytesIO(body) if body is not None else None)
    storage.atomic_write_bytes(url, out.getvalue())
    return True


def _parquet_files(root: str) -> List[str]:
    return [u for u in _files(root) if u.endswith(".parquet")]


def _rewrite_parts(root: str, ids: np.ndarray) -> List[str]:
    """Rewrite each embeddings part under `root` that holds any of `ids` without those rows."""
    changed = []
    for url in _parquet_files(root):
        t = pq.read_table(io.BytesIO(storage.read_bytes(url)))
        if "id" not in t.column_names:
            continue
        hit = np.isin(t.column("id").to_numpy(), ids)
        if hit.any():
            buf = io.BytesIO()
            pq.write_table(t.filter(pa.array(~hit)), buf)
            storage.atomic_write_bytes(url, buf.getvalue())
            changed.append(url)
    return changed


def _erase_tables(state: MemoryState, ids: np.ndarray) -> None:
    """Delete the ids' rows everywhere but the forget list (which keeps a digest), then let Lance rewrite the
    touched fragments and remove every older version (the files that still hold the rows)."""
    targets = ",".join(f"'{int(i)}'" for i in ids.tolist())
    for f in id_filter(ids.tolist()):
        state[ITEMS].delete(f)
        state[GAMMA].delete(f)
        if state[FORGET].exists():
            retry(lambda: state[FORGET].dataset().update(
                {"id": "NULL", "key": "NULL", "shard": "NULL", "erased": "true"}, where=f))
    state[OVERLAYS].delete(f"kind IN ('item_weight', 'item_label') AND target IN ({targets})")
    for name in SCHEMAS:
        ds = state[name].dataset()
        if ds is None:
            continue
        table = state[name]
        retry(lambda: table.dataset().optimize.compact_files(materialize_deletions=True,
                                                             materialize_deletions_threshold=0.0))
        if name == ITEMS:
            retry(table.index_ids)  # a fresh index: the old one's files list erased ids
        # The delete/update transactions above name the ids in their predicates, and Lance keeps the newest
        # version's transaction: commit a config change on top, so that they belong to old versions...
        retry(lambda: table.dataset().update_config({"vmem.erased_at": str(time.time())}))
        # ... which this removes with every file only they reference.
        retry(lambda: table.dataset().cleanup_old_versions(older_than=timedelta(seconds=0)))


def sweep_superseded(memory_dir: str, erased_version: Optional[int] = None) -> List[str]:
    """Remove shard folders that only manifests older than `erased_version` reference (default: the current
    version). Readers of those versions had the grace period to finish; folders of newer versions, whose
    grace period may still run, and of a compaction still writing, are kept. Returns the removed URLs."""
    store = ManifestStore(memory_dir)
    current = store.current_version()
    if current is None:
        return []
    upto = current if erased_version is None else min(int(erased_version), current)
    keep, referenced = set(), set()
    for v in store.versions():
        folders = {e.path.split("/")[1] for e in store.load(v).shards}
        referenced |= folders
        if v >= upto:
            keep |= folders
    removed = []
    for sub in storage.listdir(store.url("shards")):
        try:
            v = int(sub[1:7])
        except ValueError:
            continue
        # Orphans (no manifest names them: a compaction that lost its race or was killed) of committed
        # version numbers can go at once; a folder of version current+1 may belong to a running compaction.
        if being_written(memory_dir, sub):
            continue  # a build or compaction that has not committed yet (or a killed one on another host)
        if sub not in keep and (v < upto or (v <= current and sub not in referenced)):
            url = storage.join(store.url("shards"), sub)
            removed += [storage.join(url, n) for n in storage.listdir(url)]
            try:
                storage.remove(url)
            except FileNotFoundError:
                pass  # a compaction that lost its race removed its own files meanwhile
    for legacy in ("logs", "overlays"):  # the file logs of earlier releases
        url = store.url(legacy)
        if storage.listdir(url):
            removed.append(url)
            storage.remove(url)
    return removed


def _files(root: str) -> List[str]:
    """Every file under `root` (local path or URL), as URLs."""
    fs, path = storage.filesystem(root)
    if not fs.exists(path):
        return []
    prefix = root[: len(root) - len(path)] if storage.is_remote(root) else ""
    return sorted(prefix + p for p in fs.find(path))


def _raw_hits(data: bytes, ids: np.ndarray, decimal: List[bytes]) -> np.ndarray:
    """Ids whose 8-byte little-endian form (at any alignment) or decimal string occurs in `data`."""
    hit = np.zeros(len(ids), bool)
    for off in range(8):
        n = (len(data) - off) // 8
        if n > 0:
            hit |= np.isin(ids, np.frombuffer(data, dtype="<i8", count=n, offset=off))
    for j, d in enumerate(decimal):
        if not hit[j] and d in data:
            hit[j] = True
    return hit


def _json_ints(obj) -> List[int]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int):
        return [obj]
    if isinstance(obj, str):
        return [int(obj)] if obj.lstrip("-").isdigit() and len(obj) < 21 else []
    if isinstance(obj, dict):
        return [i for k, v in obj.items() for i in _json_ints(k) + _json_ints(v)]
    if isinstance(obj, list):
        return [i for v in obj for i in _json_ints(v)]
    return []


def _structured_ids(url: str, data: bytes) -> List[int]:
    """Ids a file holds by its format: Parquet `id` columns, tar samples' json keys, faiss ids, JSON ints."""
    from pipeline.data.ids import stable_id
    from pipeline.index.shard import index_ids

    name = url.rsplit("/", 1)[-1]
    if name.endswith(".parquet"):
        t = pq.read_table(io.BytesIO(data))
        return t.column("id").drop_null().to_pylist() if "id" in t.column_names else []
    if name.endswith(".tar"):
        out = []
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    try:
                        key = json.loads(tar.extractfile(m).read()).get("key")
                    except ValueError:
                        continue
                    if key:
                        out.append(stable_id(key))
        return out
    if name.endswith(".index"):
        import faiss

        return index_ids(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))).tolist()
    if name.endswith((".json", ".jsonl")):
        out = []
        for line in data.splitlines() if name.endswith(".jsonl") else [data]:
            try:
                out += _json_ints(json.loads(line))
            except ValueError:
                pass
        return out
    return []


def verify_erased(memory_dir: str, state: MemoryState, ids: np.ndarray, workdir: str,
                  raw_scan_max_bytes: int = 256 << 20) -> dict:
    """Scan every file under the workdir (and the memory dir, if elsewhere) for `ids`: by format (Parquet id
    columns, tar samples, faiss ids, JSON), every version of every state table, and the raw bytes of every
    file (the id as 8-byte little-endian and as a decimal string). Returns the report: every file checked."""
    found: Dict[str, int] = {}
    checked: List[str] = []
    ids = np.asarray(ids, np.int64)
    # Raw bytes prove something only for distinctive ids: stable ids are 63-bit hashes, but a small id (tests,
    # user-chosen ids) matches counters, sizes and timestamps by chance, so those get the by-format checks only.
    distinct = np.abs(ids) >= (1 << 40)
    raw_ids = ids[distinct]
    decimal = [str(int(i)).encode() for i in raw_ids] if len(raw_ids) <= 10000 else []
    roots = [workdir] + ([] if storage.join(memory_dir, "").startswith(storage.join(workdir, "")) else [memory_dir])
    for url in [u for r in roots for u in _files(r)]:
        if "/erasure/pending-" in url:
            continue  # the schedule itself (ids to erase), removed once this report is written
        if not len(ids):
            checked.append(url)
            continue
        try:
            data = storage.read_bytes(url)
        except (FileNotFoundError, IsADirectoryError):
            continue  # removed meanwhile (a concurrent cleanup), or a link to a folder: nothing to read
        checked.append(url)
        hit = np.isin(ids, np.asarray(_structured_ids(url, data), dtype=np.int64))
        if len(data) <= raw_scan_max_bytes and len(raw_ids):
            hit[distinct] |= _raw_hits(data, raw_ids, decimal)
        if hit.any():
            found[url] = int(hit.sum())
    for name in SCHEMAS:  # Lance's own reader over every version still on disk (encoded columns included)
        ds = state[name].dataset()
        if ds is None or "id" not in ds.schema.names:
            continue
        for v in ds.versions():
            try:
                t = ds.checkout_version(v["version"]).to_table(columns=["id"])
            except (OSError, ValueError) as e:  # a concurrent erasure removed this version meanwhile
                if "not found" not in str(e).lower():
                    raise
                continue
            where = f"{state[name].url}@v{v['version']}"
            checked.append(where)
            hit = int(np.isin(ids, t.column("id").drop_null().to_numpy()).sum())
            if hit:
                found[where] = hit
    return {"ids_checked": int(len(ids)), "ids_raw_scanned": int(len(raw_ids)), "files_checked": checked,
            "found": found, "verified": not found, "checked_at": time.time()}

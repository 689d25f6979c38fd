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
import tarfile
import time
from datetime import timedelta
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.index.manifest import ManifestStore, version_name
from pipeline.memory.base import blob_url
from pipeline.memory.state import FORGET, GAMMA, ITEMS, OVERLAYS, SCHEMAS, MemoryState, id_filter, retry

log = logging.getLogger("vmem.erasure")


def workdir_of(memory_dir: str, cfg=None) -> str:
    """The workdir whose shards/ and embeddings/ belong to this memory."""
    if cfg is not None:
        return str(cfg.workdir).rstrip("/")
    return str(memory_dir).rstrip("/").rsplit("/", 1)[0]


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
                out.append(erase(memory_dir, state, pending, cfg))
    return out


def erase(memory_dir: str, state: MemoryState, pending: dict, cfg=None) -> dict:
    """Erase the ids of `pending` from every artifact (idempotent; safe to run twice or concurrently)."""
    ids = np.asarray(pending["ids"], dtype=np.int64)
    t0 = time.perf_counter()
    workdir = workdir_of(memory_dir, cfg)
    changed: List[str] = []
    if len(ids):
        rows = pa.concat_tables([state[FORGET].read(["id", "key", "shard"], f) for f in id_filter(ids.tolist())])
        changed += _rewrite_tars(rows)
        changed += _rewrite_parts(storage.join(workdir, "embeddings"), ids)
        _erase_tables(state, ids)
        for i in ids.tolist():
            url = blob_url(memory_dir, i)
            if storage.exists(url):
                storage.remove(url)
                changed.append(url)
    changed += sweep_superseded(memory_dir, pending["version"])
    for url in changed:
        storage.evict(url)
    report = verify_erased(memory_dir, state, ids, workdir)
    report.update({"version": pending["version"], "erased_ids": int(len(ids)), "rewritten_or_removed": changed,
                   "seconds": time.perf_counter() - t0})
    storage.atomic_write_json(storage.join(memory_dir, "erasure", f"report-{version_name(pending['version'])}.json"),
                              report)
    storage.remove(_pending_url(memory_dir, pending["version"]))
    if not report["verified"]:
        log.error("erasure verification FAILED: %s", report["found"])
    return {k: report[k] for k in ("verified", "found", "ids_checked", "files_checked")} | \
        {"rewritten_or_removed": len(changed)}


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
    fs, path = storage.filesystem(root)
    if not fs.exists(path):
        return []
    prefix = root[: len(root) - len(path)] if storage.is_remote(root) else ""
    return sorted(prefix + p for p in fs.find(path) if p.endswith(".parquet"))


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
        if sub not in keep and (v < upto or (v <= current and sub not in referenced)):
            url = storage.join(store.url("shards"), sub)
            removed += [storage.join(url, n) for n in storage.listdir(url)]
            storage.remove(url)
    for legacy in ("logs", "overlays"):  # the file logs of earlier releases
        url = store.url(legacy)
        if storage.listdir(url):
            removed.append(url)
            storage.remove(url)
    return removed


def verify_erased(memory_dir: str, state: MemoryState, ids: np.ndarray, workdir: str) -> dict:
    """Scan every Parquet file, image tar, faiss shard, state table version and blob for `ids`."""
    from pipeline.data.ids import stable_id
    from pipeline.index.shard import read_index
    from pipeline.index.shard import index_ids

    found: Dict[str, int] = {}
    checked: List[str] = []

    def check(name: str, present) -> None:
        checked.append(name)
        hit = int(np.isin(ids, np.asarray(present, dtype=np.int64)).sum()) if len(ids) else 0
        if hit:
            found[name] = hit

    for url in _parquet_files(storage.join(workdir, "embeddings")) + _parquet_files(memory_dir):
        t = pq.read_table(io.BytesIO(storage.read_bytes(url)), columns=None)
        if "id" in t.column_names:
            check(url, t.column("id").to_numpy())
    fs, root = storage.filesystem(storage.join(workdir, "shards"))
    if fs.exists(root):
        prefix = "s3://" if storage.is_remote(workdir) else ""
        for p in sorted(fs.find(root)):
            if p.endswith(".tar"):
                data = storage.read_bytes(prefix + p)
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
                    keys = []
                    for m in tar.getmembers():
                        if m.name.endswith(".json"):
                            try:
                                keys.append(json.loads(tar.extractfile(m).read()).get("key", ""))
                            except ValueError:
                                pass
                check(prefix + p, [stable_id(k) for k in keys if k])
    store = ManifestStore(memory_dir)
    for e in store.load().shards:
        check(store.url(e.path), index_ids(read_index(store.url(e.path), mmap=False)))
    for name in SCHEMAS:
        ds = state[name].dataset()
        if ds is None or "id" not in ds.schema.names:
            continue
        for v in ds.versions():
            try:
                t = ds.checkout_version(v["version"]).to_table(columns=["id"])
            except (OSError, ValueError) as e:  # a concurrent erasure removed this version meanwhile
                if "Not found" not in str(e) and "not found" not in str(e):
                    raise
                continue
            check(f"{state[name].url}@v{v['version']}", t.column("id").drop_null().to_numpy())
    ov = state[OVERLAYS].read(["target"])
    check(state[OVERLAYS].url, [int(x) for x in ov.column("target").to_pylist() if str(x).lstrip("-").isdigit()])
    blobs = [int(n.split(".")[0]) for n in storage.listdir(storage.join(memory_dir, "blobs")) if n[0].isdigit()]
    check(storage.join(memory_dir, "blobs"), blobs)
    return {"ids_checked": int(len(ids)), "files_checked": checked, "found": found, "verified": not found,
            "checked_at": time.time()}

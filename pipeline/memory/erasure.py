"""Erasure: after a compaction (and its grace period), remove every trace of the deleted items the project
wrote under the workdir, verify exactly the files that held them, and write a report naming each of them.

Erasure goes by locator, so its cost follows the number of erased items and the size of the files they were
in, never the size of the workdir:
- image tars: the forget row's `shard` column names the tar of each item's sample; only those tars are
  rewritten (without the samples) and read back;
- embedding parts: each split's `embeddings/<split>/_manifest.json` maps a tar to its part (one part per
  tar), so only those parts are rewritten; only ids whose tar no manifest names (parts written by another
  tool) cost a read of the `id` column of the parts no manifest covers;
- faiss shards: the compaction already wrote shards without the ids; the shard folders only older manifests
  reference are removed (`sweep_superseded`), and the shards that can hold an id (`shard_of(id)`) in every
  manifest still on disk are checked (faiss ids and meta `id` column);
- the state tables: item rows, overlay rows (relabels, weights), gamma rows deleted; forget rows keep only a
  salted digest; then Lance compacts the touched fragments and removes every older table version; each
  version left is checked with a filtered read;
- blobs (`memory/blobs/<id>.png`), and local cached copies of remote files that were rewritten or removed.
Not erased by design: the forget list's salted digests (how a rebuild recognises a deleted item), and the
trained quantizer (centroids from a training sample, holding no item's vector or id). The whole-workdir scan
(every file's raw bytes) is `vmem audit` (`pipeline.memory.audit`), run on demand.

One backlog, one eraser: each compaction appends its ids as a small file of its own under
`erasure/pending/` (appends never conflict); an eraser holding the erasure lease (`pipeline.memory.lease`:
a dead holder is taken over at once, a silent one after `lease.LEASE_S`) drains every entry that is due in
one pass (one rewrite of each affected file, one verification) and removes the entries it consumed, the only
files that name raw ids, once its report is written. A file that cannot be read (a truncated tar or part) is
reported by name and left for a later erasure (a pending entry with its locator); the rest is erased.
"""
from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import time
import uuid
from typing import Dict, Iterable, List, Optional, Set, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.index.manifest import ManifestStore, version_name
from pipeline.index.shard import being_written
from pipeline.memory import lease as leases
from pipeline.memory.base import blob_url
from pipeline.memory.state import FORGET, GAMMA, ITEMS, OVERLAYS, SCHEMAS, MemoryState, id_filter, retry

log = logging.getLogger("vmem.erasure")

_ERASURE, _PENDING, _LEASE = "erasure", "pending", "lease"
RETRY_BAD_FILE_S = 0.0  # an unreadable file's ids are retried by the next erasure (cheap: that file alone)


def workdir_of(memory_dir: str, cfg=None) -> str:
    """The workdir whose shards/ and embeddings/ belong to this memory: the config's, else the parent of a
    memory dir named `memory` (the project's layout), else the memory dir alone (never an unrelated parent)."""
    if cfg is not None:
        return str(cfg.workdir).rstrip("/")
    parent, _, name = str(memory_dir).rstrip("/").rpartition("/")
    return parent if name == "memory" and parent else str(memory_dir).rstrip("/")


def lease_folder(memory_dir: str) -> str:
    return storage.join(memory_dir, _ERASURE, _LEASE)


def _pending_dir(memory_dir: str) -> str:
    return storage.join(memory_dir, _ERASURE, _PENDING)


# ------------------------------------------------------------------------------------------- the backlog

def schedule(memory_dir: str, version: int, ids: np.ndarray, due: float,
             locations: Optional[dict] = None) -> dict:
    """Add `ids` (removed from the shards by compaction `version`) to the backlog, to be erased at `due`.
    Each call writes one small file of its own, so concurrent compactions never conflict."""
    ids = np.unique(np.asarray(ids, np.int64))
    entry = {"version": int(version), "due": float(due), "ids": [int(i) for i in ids], "at": time.time()}
    if locations:
        entry["locations"] = locations
    # An entry without ids is still written: its erasure sweeps the shard folders `version` superseded.
    url = storage.join(_pending_dir(memory_dir), f"{version_name(version)}-{uuid.uuid4().hex[:12]}.json")
    storage.atomic_write_json(url, entry)
    return {**entry, "url": url}


def backlog(memory_dir: str) -> List[dict]:
    """Every pending entry (with its `url`), including those of earlier releases (`erasure/pending-v*.json`)."""
    urls = [storage.join(_pending_dir(memory_dir), n) for n in storage.listdir(_pending_dir(memory_dir))
            if n.endswith(".json")]
    urls += [storage.join(memory_dir, _ERASURE, n) for n in storage.listdir(storage.join(memory_dir, _ERASURE))
             if n.startswith("pending-") and n.endswith(".json")]
    out = []
    for url in urls:
        try:
            out.append({**storage.read_json(url), "url": url})
        except FileNotFoundError:
            continue  # consumed by an eraser meanwhile
    return out


def pending_ids(memory_dir: str, entries: Optional[List[dict]] = None) -> np.ndarray:
    """Sorted ids the backlog holds (due or not)."""
    entries = backlog(memory_dir) if entries is None else entries
    return np.unique(np.asarray([i for e in entries for i in e["ids"]], np.int64))


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def deferred_text(status: dict) -> str:
    """`deferred: <why>, retry at <time>` for a drain that erased nothing now."""
    return f"deferred: {status['why']}, retry at {_when(status['retry_at'])}"


def drain(memory_dir: str, state: MemoryState, cfg=None, now: Optional[float] = None) -> dict:
    """Erase every backlog entry that is due, in one pass, under the erasure lease. Returns a status:
    {"status": "erased", "report": summary} | {"status": "deferred", "why", "retry_at", "pending"} |
    {"status": "idle"} (nothing due and nothing pending)."""
    now = time.time() if now is None else now
    entries = backlog(memory_dir)
    due = [e for e in entries if e["due"] <= now]
    if not due:
        if not entries:
            return {"status": "idle"}
        at = min(e["due"] for e in entries)
        return {"status": "deferred", "why": f"grace period (memory.grace_period_s) of {len(entries)} pending "
                                             f"erasure(s) not over", "retry_at": at, "pending": len(entries)}
    lease, holder = leases.acquire(lease_folder(memory_dir), "erasure")
    if lease is None:
        st = {"status": "deferred", "why": f"another eraser holds the erasure lease ({leases.describe(holder)})",
              "retry_at": float(holder.get("expires", now)), "pending": len(entries)}
        log.warning("erasure %s", deferred_text(st))
        return st
    out = None
    try:
        # Under the lease, read the backlog again: the previous holder may have consumed entries meanwhile.
        # Compactions that found the lease held left their ids pending: take them too before letting go
        # (a few rounds at most, so a stream of compactions cannot keep one eraser forever).
        for _ in range(3):
            # later rounds: what arrived meanwhile, not the retries of unreadable files this drain just wrote
            due = [e for e in backlog(memory_dir) if e["due"] <= now] if out is None else \
                [e for e in backlog(memory_dir) if e["due"] <= time.time() and "locations" not in e]
            if not due:
                break
            out = _merge(out, _erase_locked(memory_dir, state, due, cfg, lease))
        return {"status": "erased", "report": out} if out else {"status": "idle"}
    except leases.LeaseLost as e:
        st = {"status": "deferred", "why": str(e), "retry_at": time.time(), "pending": len(due)}
        log.warning("erasure %s", deferred_text(st))
        return {"status": "erased", "report": out} if out else st
    finally:
        lease.release()


def _merge(a: Optional[dict], b: dict) -> dict:
    """One summary for two erasure rounds of one drain."""
    if a is None:
        return b
    out = dict(b)
    for k in ("ids_checked", "erased_ids", "ids_in_doubt", "pending_consumed", "seconds", "rewritten_or_removed"):
        out[k] = a[k] + b[k]
    out["verified"] = a["verified"] and b["verified"]
    out["found"] = {**a["found"], **b["found"]}
    out["in_doubt"] = sorted(set(a["in_doubt"]) | set(b["in_doubt"]))
    out["in_doubt_why"] = {**a["in_doubt_why"], **b["in_doubt_why"]}
    out["files_checked"] = a["files_checked"] + b["files_checked"]
    return out


def erase_due(memory_dir: str, state: MemoryState, cfg=None, now: Optional[float] = None) -> List[dict]:
    """Drain the due backlog; returns the report summary of the erasure run now ([] if none ran)."""
    st = drain(memory_dir, state, cfg, now)
    return [st["report"]] if st["status"] == "erased" else []


def hold(memory_dir: str, role: str, timeout_s: float) -> leases.Lease:
    """The erasure lease for another exclusive step (a build's commit), waiting up to `timeout_s` for a live
    eraser; a dead one is taken over at once. Raises `lease.LeaseHeld` naming the holder."""
    return leases.wait(lease_folder(memory_dir), role, timeout_s)


# ------------------------------------------------------------------------------------------- locators

def _part_locator(workdir: str) -> Tuple[Dict[str, str], List[str]]:
    """({tar URL: embedding part URL} from each split's embeddings `_manifest.json`, [part URLs no manifest
    names]). One small read per split plus a listing: no part is opened."""
    from pipeline.embed.parts import MANIFEST_NAME, PART_PREFIX

    root = storage.join(workdir, "embeddings")
    by_tar: Dict[str, str] = {}
    uncovered: List[str] = []
    for split in storage.listdir(root):
        folder = storage.join(root, split)
        names = storage.listdir(folder)
        covered = set()
        if MANIFEST_NAME in names:
            try:
                shards = storage.read_json(storage.join(folder, MANIFEST_NAME)).get("shards", {})
            except (ValueError, FileNotFoundError):
                shards = {}
            for s in shards.values():
                if s.get("url") and s.get("part"):
                    by_tar[s["url"]] = storage.join(folder, s["part"])
                    covered.add(s["part"])
        uncovered += [storage.join(folder, n) for n in names
                      if n.startswith(PART_PREFIX) and n.endswith(".parquet") and n not in covered]
    return by_tar, uncovered


def _locate(state: MemoryState, ids: np.ndarray, workdir: str, entries: List[dict]) -> Tuple[Dict[str, Dict[str, int]], Dict[str, Set[int]], List[str]]:
    """({tar: {key: id}}, {part: ids}, parts whose id column was read) for `ids`: from the forget rows, the
    locators a retry entry carries, and the embeddings manifests."""
    tars: Dict[str, Dict[str, int]] = {}
    parts: Dict[str, Set[int]] = {}
    for e in entries:  # retries of files that could not be read before
        for url, keys in e.get("locations", {}).get("tars", {}).items():
            tars.setdefault(url, {}).update({k: int(i) for k, i in keys.items()})
        for url, pids in e.get("locations", {}).get("parts", {}).items():
            parts.setdefault(url, set()).update(int(i) for i in pids)
    rows = [state[FORGET].read(["id", "key", "shard"], f) for f in id_filter(ids.tolist())]
    rows = pa.concat_tables(rows).to_pylist() if rows else []
    by_tar, uncovered = _part_locator(workdir)
    unlocated = []
    for r in rows:
        if r["id"] is None:
            continue
        if r["shard"]:
            tars.setdefault(r["shard"], {})[r["key"]] = int(r["id"])
        part = by_tar.get(r["shard"]) if r["shard"] else None
        if part:
            parts.setdefault(part, set()).add(int(r["id"]))
        else:
            unlocated.append(int(r["id"]))
    scanned = []
    if unlocated and uncovered:
        # Parts no manifest names (written by another tool): their id column only, never the vectors.
        want = np.asarray(unlocated, np.int64)
        for url in uncovered:
            try:
                col = _read_parquet(url, ["id"]).column("id").to_numpy()
            except FileNotFoundError:
                continue
            except Exception:  # noqa: BLE001 - unreadable: its rewrite reports it, with the ids it may hold
                parts.setdefault(url, set()).update(unlocated)
                continue
            scanned.append(url)
            hit = want[np.isin(want, col)]
            if len(hit):
                parts.setdefault(url, set()).update(hit.tolist())
    return tars, parts, scanned


def _read_parquet(url: str, columns: Optional[List[str]] = None) -> pa.Table:
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def _what_to_do(url: str) -> str:
    if url.endswith(".parquet"):
        return "restore it from a backup, or remove it (`vmem embed` re-creates a missing part from its tar), " \
               "then run `vmem compact` again to erase there"
    return "restore it from a backup, or remove it (its other samples are lost), then run `vmem compact` " \
           "again to erase there"


# ------------------------------------------------------------------------------------------- the eraser

def _hang_point(memory_dir: str, step: str) -> None:
    from pipeline.memory.killpoints import hang_point as hang  # the tests' kill points (VMEM_COMPACT_HANG_AT)

    hang(memory_dir, step)


def _erase_locked(memory_dir: str, state: MemoryState, entries: List[dict], cfg, lease: leases.Lease,
                  attempts: int = 3) -> dict:
    ids = pending_ids(memory_dir, entries)
    version = max(int(e["version"]) for e in entries)
    _hang_point(memory_dir, "erase")
    t0 = time.perf_counter()
    workdir = workdir_of(memory_dir, cfg)
    in_doubt: Dict[str, str] = {}
    tars, parts, id_scanned = _locate(state, ids, workdir, entries)
    changed: List[str] = []
    checked: Dict[str, bytes] = {}  # file -> bytes to verify (None: read it back)
    from pipeline.data.shards import tar_key

    # A file that comes back from doubt (restored from a backup, say) may be older than erasures that ran
    # while it was unreadable or before the backup was taken: it is swept for every erased item it holds, not
    # only for the ids whose erasure it blocked (those erased items are verified gone from it below).
    retried = {u for e in entries for kind in ("tars", "parts") for u in e.get("locations", {}).get(kind, {})}
    swept: Dict[str, Dict[str, int]] = {}  # file -> {key (tars) or str(id) (parts): erased id} found by the sweep

    def sweeper(url: str):
        if url not in retried:
            return None

        def sweep(found: Dict[str, int]) -> Set[str]:
            keys = list(found)
            hit = state.is_forgotten([found[k] for k in keys], erased_only=True)
            swept[url] = {k: found[k] for k, h in zip(keys, hit) if h}
            return set(swept[url])
        return sweep

    for url, keys in sorted(tars.items()):
        lease.check()
        try:
            data, new = _rewrite_tar(url, set(keys), {tar_key(k) for k in keys}, sweeper(url))
        except FileNotFoundError:
            continue  # removed (by its owner, or as the remedy for an unreadable file): nothing left to erase
        except Exception as e:  # noqa: BLE001 - a bad file is isolated: reported, the rest is erased
            in_doubt[url] = _why(e)
            continue
        if new:
            changed.append(url)
        checked[url] = None if new else data
    for url, pids in sorted(parts.items()):
        lease.check()
        try:
            new = _rewrite_part(url, np.asarray(sorted(pids), np.int64), sweeper(url))
        except FileNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001
            in_doubt[url] = _why(e)
            continue
        if new:
            changed.append(url)
        checked[url] = None
    lease.check()
    blobs = [u for u in (blob_url(memory_dir, i) for i in ids.tolist()) if storage.exists(u)]
    for url in blobs:
        storage.remove(url)
    changed += sweep_superseded(memory_dir, version)
    for url in changed:
        storage.evict(url)
    # The tables go last: their forget rows are the locators, so an eraser killed before this point leaves its
    # successor (the pending entries stay until the report is written) everything it needs to redo the files.
    # Writers keep committing while we erase (a fold rewriting rows read before our delete, an index built on
    # an older version): erase the tables and check again until nothing is found.
    for attempt in range(attempts):
        lease.check()
        if len(ids):
            _erase_tables(state, ids)
        found, tables_checked = _verify_tables(state, ids)
        leftovers, lance_files, live_txns = _remove_leftovers(state, ids)
        changed += leftovers
        tables_checked += lance_files
        found.update(live_txns)
        if not found:
            break
        log.info("erasure of v%s: traces left by concurrent writers (%s), erasing again", version, found)
    for url, back in swept.items():
        if back and url.endswith(".tar"):
            tars.setdefault(url, {}).update(back)
    also = np.asarray(sorted({i for back in swept.values() for i in back.values()}), np.int64)
    if len(also):
        log.warning("erasure: %d erased item(s) were back in %d file(s) that returned from doubt (a restored "
                    "backup older than their erasure): erased there again", len(also), sum(map(bool, swept.values())))
    files_found, files_checked = _verify_files(memory_dir, np.union1d(ids, also), tars, checked, blobs, in_doubt,
                                               since=min(version, ManifestStore(memory_dir).current_version() or 0))
    found.update(files_found)
    doubt_ids = _ids_in(in_doubt, tars, parts)
    for url in in_doubt:
        log.error("erasure: cannot read %s (%s): the deleted items it holds are NOT erased there; %s", url,
                  in_doubt[url], _what_to_do(url))
    # Ids in unreadable files stay in the backlog with their locators (the forget rows no longer have them).
    if in_doubt:
        loc = {"tars": {u: k for u, k in tars.items() if u in in_doubt},
               "parts": {u: sorted(int(i) for i in p) for u, p in parts.items() if u in in_doubt}}
        schedule(memory_dir, version, np.asarray(sorted(doubt_ids), np.int64), time.time() + RETRY_BAD_FILE_S, loc)
    # Counts and file names, never ids: blob names are ids, and the report must hold nothing of an erased item.
    report = {"version": version, "versions": sorted({int(e["version"]) for e in entries}),
              "pending_consumed": len(entries), "ids_checked": int(len(ids)),
              "erased_ids": int(len(ids) - len(doubt_ids)), "ids_in_doubt": len(doubt_ids),
              "in_doubt": sorted(in_doubt), "in_doubt_why": {u: f"{w}; {_what_to_do(u)}" for u, w in in_doubt.items()},
              "found": found, "verified": not found and not in_doubt,
              "files_checked": files_checked + tables_checked + id_scanned,
              "rewritten_or_removed": changed, "blobs_removed": len(blobs), "attempts": attempt + 1,
              "checked_at": time.time(), "seconds": time.perf_counter() - t0}
    lease.check()
    # Named by version and time (sorted oldest first), never by anything an item could be mistaken for.
    name = f"report-{version_name(version)}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    storage.atomic_write_json(storage.join(memory_dir, _ERASURE, f"{name}.json"), report)
    for e in entries:
        storage.remove(e["url"])
    if found:
        log.error("erasure verification FAILED: traces left in %s", sorted(found))
    log.info("erasure: %d id(s) of %d pending erasure(s) erased in %.2f s, %d file(s) rewritten or removed%s",
             report["erased_ids"], len(entries), report["seconds"], len(changed),
             f", {len(in_doubt)} file(s) in doubt" if in_doubt else "")
    return {k: report[k] for k in ("verified", "found", "ids_checked", "erased_ids", "ids_in_doubt", "in_doubt",
                                   "in_doubt_why", "files_checked", "pending_consumed", "seconds")} | \
        {"rewritten_or_removed": len(changed) + len(blobs)}


def _ids_in(in_doubt: Dict[str, str], tars: Dict[str, Dict[str, int]], parts: Dict[str, Set[int]]) -> Set[int]:
    out: Set[int] = set()
    for url in in_doubt:
        out |= set(tars.get(url, {}).values()) | set(parts.get(url, set()))
    return out


def _rewrite_tar(url: str, keys: set, tar_keys: set, sweep=None) -> Tuple[bytes, bool]:
    """Drop every member of the samples whose json key is in `keys` (or whose name is one of `tar_keys`), and
    those whose key `sweep({key: id of every sample})` returns. Returns (the bytes now stored, whether it was
    rewritten)."""
    data = storage.read_bytes(url)
    members = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read() if m.isfile() else None))
        end = tar.offset
    # tarfile stops quietly at a truncation on a block boundary; a whole tar ends with zero blocks. Rewriting
    # a truncated one would silently make its loss permanent: report it instead.
    if data[257:262] == b"ustar" and (len(data) - end < 1024 or data[end:].strip(b"\0")):  # uncompressed
        raise tarfile.ReadError(f"truncated: no end-of-archive marker after {len(members)} member(s)")
    if sweep is not None:
        from pipeline.data.ids import stable_id

        held = {}
        for m, body in members:
            if m.name.endswith(".json") and body is not None:
                try:
                    k = json.loads(body).get("key")
                except ValueError:
                    continue
                if isinstance(k, str):
                    held[k] = stable_id(k)
        keys = set(keys) | sweep(held)
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
        return data, False
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for m, body in members:
            if m.name.rpartition(".")[0] not in drop:
                tar.addfile(m, io.BytesIO(body) if body is not None else None)
    storage.atomic_write_bytes(url, out.getvalue())
    return out.getvalue(), True


def _rewrite_part(url: str, ids: np.ndarray, sweep=None) -> bool:
    """Rewrite one embeddings part without the rows of `ids` (and of the ids `sweep({str(id): id of every
    row})` returns); False when it holds none of them."""
    t = pq.read_table(io.BytesIO(storage.read_bytes(url)))
    if "id" not in t.column_names:
        return False
    col = t.column("id").to_numpy()
    if sweep is not None:
        ids = np.union1d(ids, np.asarray([int(k) for k in sweep({str(int(i)): int(i) for i in col})], np.int64))
    hit = np.isin(col, ids)
    if not hit.any():
        return False
    buf = io.BytesIO()
    pq.write_table(t.filter(pa.array(~hit)), buf, compression="zstd")
    storage.atomic_write_bytes(url, buf.getvalue())
    return True


def _erase_tables(state: MemoryState, ids: np.ndarray) -> None:
    """Delete the ids' rows everywhere but the forget list (which keeps a digest), then let Lance rewrite the
    touched fragments and remove every older version (the files that still hold the rows)."""
    for f in id_filter(ids.tolist()):
        state[ITEMS].delete(f)
        state[GAMMA].delete(f)
        if state[FORGET].exists():
            retry(lambda: state[FORGET].dataset().update(
                {"id": "NULL", "key": "NULL", "shard": "NULL", "erased": "true"}, where=f))
    for i in range(0, len(ids), 2000):
        targets = ",".join(f"'{int(x)}'" for x in ids[i:i + 2000].tolist())
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
        # ... which this removes with every file only they reference (the history lines edits committed
        # with those versions are folded into edits.lance first).
        state.remove_old_versions(name, retention_s=0.0)


def _remove_leftovers(state: MemoryState, ids: np.ndarray) -> Tuple[List[str], List[str], Dict[str, int]]:
    """Remove the files of a state table that no version still on disk references and that hold an erased id
    (data and index files of a concurrent transaction that lost to the erasure's commits, which Lance leaves
    for a later garbage collection; transaction files of commits that failed, naming ids in their predicates).
    Safe beside writers: a transaction that read the rows before the erasure deleted them conflicts with the
    erasure's rewrite and can never commit those files. Returns (removed, checked, found): `found` names the
    transaction files of versions still on disk that name an erased id (a commit that landed after the
    erasure's cleanup; the caller erases the tables again, which makes that version an old one)."""
    removed, checked, found = [], [], {}
    needles = Needles(ids)
    if not len(needles.raw_ids):
        return removed, checked, found
    for name in SCHEMAS:
        ds = state[name].dataset()
        if ds is None:
            continue
        referenced, txns, txns_known = set(), set(), True
        for v in ds.versions():
            try:
                old = ds.checkout_version(v["version"])
                referenced |= {f"data/{d.path}" for fr in old.get_fragments() for d in fr.data_files()}
                referenced |= {f"_indices/{i['uuid']}" for i in old.list_indices()}
                t = ds.read_transaction(v["version"])
                if t is not None:
                    txns.add(t.uuid)
            except (OSError, ValueError):
                continue  # removed meanwhile by a concurrent cleanup
            except TypeError:  # pylance 14 cannot decode a rewrite that remapped an index (state.py guards too)
                txns_known = False  # a live version's transaction is unknown: remove no transaction file
        root = state[name].url
        for url in _files(root):
            rel = url[len(root):].lstrip("/")
            top = "/".join(rel.split("/")[:2])
            if not (rel.startswith("_transactions/") or (rel.startswith(("data/", "_indices/")) and
                                                         rel not in referenced and top not in referenced)):
                continue
            if rel.startswith("_transactions/") and not txns_known:
                continue
            try:
                data = storage.read_bytes(url)
            except FileNotFoundError:
                continue
            checked.append(url)
            hit = _raw_hits(data, needles.raw_ids, needles.decimal, needles.lengths)
            if not hit.any():
                continue
            if rel.startswith("_transactions/") and rel.split("/")[-1].partition("-")[2][:-4] in txns:
                found[url] = int(hit.sum())  # a live version's own transaction: erased again by the caller
                continue
            storage.remove(url)
            removed.append(url)
    return removed, checked, found


# ------------------------------------------------------------------------------------------- verification

def _verify_tables(state: MemoryState, ids: np.ndarray) -> Tuple[Dict[str, int], List[str]]:
    """Every version of every state table still on disk, read by Lance (encoded columns included) with a
    filter on the ids: ({table@version: ids found}, what was checked)."""
    found: Dict[str, int] = {}
    checked: List[str] = []
    if not len(ids):
        return found, checked
    for name in SCHEMAS:
        ds = state[name].dataset()
        if ds is None:
            continue
        cols = ds.schema.names
        if "id" in cols:
            filters = [(f, "id") for f in id_filter(ids.tolist())]
        elif name == OVERLAYS:
            filters = [(f"target IN ({','.join(repr(str(int(x))) for x in ids[i:i + 2000].tolist())})", "target")
                       for i in range(0, len(ids), 2000)]
        else:
            continue
        for v in ds.versions():
            try:
                old = ds.checkout_version(v["version"])
                n = sum(old.count_rows(filter=f) for f, _ in filters)
            except (OSError, ValueError) as e:  # a concurrent erasure removed this version meanwhile
                if "not found" not in str(e).lower():
                    raise
                continue
            where = f"{state[name].url}@v{v['version']}"
            checked.append(where)
            if n:
                found[where] = int(n)
    return found, checked


def _verify_files(memory_dir: str, ids: np.ndarray, tars: Dict[str, Dict[str, int]],
                  checked: Dict[str, Optional[bytes]], blobs: List[str],
                  in_doubt: Dict[str, str], since: int = 0) -> Tuple[Dict[str, int], List[str]]:
    """The files that held the ids, read back: by format and by raw bytes; the faiss shards (and their meta)
    that can hold them in every manifest still on disk; the blobs gone. A file that cannot be read back
    goes to `in_doubt`."""
    from pipeline.data.shards import tar_key

    found: Dict[str, int] = {}
    out: List[str] = []
    if not len(ids):
        return found, out
    needles = Needles(ids)
    for url, data in [*sorted(checked.items()), *((u, None) for u in _shard_files(memory_dir, ids, since))]:
        try:
            data = storage.read_bytes(url) if data is None else data
            hit = needles.hits(url, data)
            if url.endswith(".tar") and tars.get(url):
                names = {tar_key(k): i for k, i in tars[url].items()}
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
                    hit |= {names[b] for b in (m.name.rpartition(".")[0].rsplit("/", 1)[-1] for m in tar.getmembers())
                            if b in names}
        except FileNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001 - reported by name, never fatal
            in_doubt[url] = _why(e)
            continue
        out.append(url)
        if hit:
            found[url] = len(hit)
    gone = [u for u in blobs if storage.exists(u)]
    if gone:  # counted, never named: a blob's name is its item's id
        found["blobs"] = len(gone)
    return found, out


def _shard_files(memory_dir: str, ids: np.ndarray, since: int = 0) -> List[str]:
    """Index and meta files of the shards that may hold `ids` (`shard_of`), in every manifest on disk from
    version `since` on (the sweep removed the files only older versions referenced)."""
    from pipeline.index.train import shard_of

    store = ManifestStore(memory_dir)
    urls = []
    for v in [v for v in store.versions() if v >= since]:
        try:
            m = store.load(v)
        except Exception:  # noqa: BLE001 - removed meanwhile; the audit reads whatever is left
            continue
        wanted = set(np.unique(shard_of(ids, m.num_shards)).tolist()) if m.num_shards else set()
        for e in m.shards:
            if e.shard in wanted:
                urls += [store.url(e.path), store.url(e.meta_path)]
    return sorted(set(urls))


class Needles:
    """Erased ids and the forms they take in a file: by format (Parquet `id` columns, tar samples' json keys,
    faiss ids, JSON integers) and in the raw bytes (8-byte little-endian at any alignment; the decimal string,
    found with one regex pass over the file and a set look-up per digit run, not one scan per id)."""

    def __init__(self, ids: Iterable[int], raw_scan_max_bytes: int = 256 << 20):
        self.ids = np.unique(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64))
        # Raw bytes prove something only for distinctive ids: stable ids are 63-bit hashes, but a small id
        # (tests, user-chosen ids) matches counters, sizes and timestamps by chance: by-format checks only.
        self.raw_ids = self.ids[np.abs(self.ids) >= (1 << 40)]
        self.decimal = {str(abs(int(i))): int(i) for i in self.raw_ids.tolist()}
        self.lengths = sorted({len(d) for d in self.decimal})
        self.raw_scan_max_bytes = raw_scan_max_bytes

    def hits(self, url: str, data: bytes) -> Set[int]:
        """The ids of this set that `data` (the bytes of `url`) holds."""
        got = set(np.intersect1d(self.ids, np.asarray(_structured_ids(url, data), np.int64)).tolist())
        if len(self.raw_ids) and len(data) <= self.raw_scan_max_bytes:
            got |= set(self.raw_ids[_raw_hits(data, self.raw_ids, self.decimal, self.lengths)].tolist())
        digits = [d for d in re.findall(r"\d{13,}", url.rsplit("/", 1)[-1])]
        got |= {self.decimal[d] for d in digits if d in self.decimal}  # a file named by an id (a blob)
        return got


def _raw_hits(data: bytes, ids: np.ndarray, decimal: Dict[str, int], lengths: List[int]) -> np.ndarray:
    """Mask of `ids` whose 8-byte little-endian form (at any alignment) or decimal string occurs in `data`."""
    hit = np.zeros(len(ids), bool)
    for off in range(8):
        n = (len(data) - off) // 8
        if n > 0:
            hit |= np.isin(ids, np.frombuffer(data, dtype="<i8", count=n, offset=off))
    if decimal and lengths:
        found = set()
        lo = lengths[0]
        for m in re.finditer(rb"\d{%d,}" % lo, data):  # one pass; each digit run looked up, not each id
            run = m.group().decode()
            for L in lengths:
                if L > len(run):
                    break
                for s in range(len(run) - L + 1):
                    i = decimal.get(run[s:s + L])
                    if i is not None:
                        found.add(i)
        if found:
            hit |= np.isin(ids, np.asarray(sorted(found), np.int64))
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
    """Ids a file holds by its format: Parquet `id` columns, tar samples' json keys, faiss ids, JSON ints.
    Raises on a file of a known format that cannot be read (the caller reports it)."""
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


# ------------------------------------------------------------------------------------------- shard folders

def sweep_superseded(memory_dir: str, erased_version: Optional[int] = None) -> List[str]:
    """Remove shard files that only manifests older than `erased_version` reference (default: the current
    version). Readers of those versions had the grace period to finish; files of newer versions, whose grace
    period may still run, and of a compaction still writing, are kept. Files, not folders: a compaction
    references the shards it did not touch where they are, so a folder can hold kept and superseded shards.
    Returns the removed URLs."""
    store = ManifestStore(memory_dir)
    current = store.current_version()
    if current is None:
        return []
    upto = current if erased_version is None else min(int(erased_version), current)
    keep, referenced = set(), set()
    for v in store.versions():
        files = {rel for e in store.load(v).shards for rel, _ in e.files()}
        referenced |= files
        if v >= upto:
            keep |= files
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
        url = storage.join(store.url("shards"), sub)
        names = storage.listdir(url)
        gone = [n for n in names if f"shards/{sub}/{n}" not in keep and
                (v < upto or (v <= current and f"shards/{sub}/{n}" not in referenced))]
        for n in gone:
            try:
                storage.remove(storage.join(url, n))
            except FileNotFoundError:
                pass  # a compaction that lost its race removed its own files meanwhile
        removed += [storage.join(url, n) for n in gone]
        if gone and len(gone) == len(names):
            try:
                storage.remove(url)
            except FileNotFoundError:
                pass
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

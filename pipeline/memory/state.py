"""The memory's state: versioned Lance tables with conflict-checked commits, shared by every process.

Layout under `memory_dir/state/` (local disk or s3://; Lance commits atomically on both):

  items.lance     one row per item the memory holds or held: id, key, label, label_name, source, shard (tar
                  URL of its image), vector (float32 bytes; only for items added after the build, whose
                  vectors live nowhere else), indexed (the manifest version whose faiss shards hold it; 0 =
                  not yet, searched exactly from this table), added_at (ns).
  forget.lance    the forget list: one row per deleted id. A delete IS one append here (the commit point),
                  so it is final on every path: searches exclude these ids inside faiss, adds of them are
                  refused, a rebuild leaves them out. After erasure the row keeps only a salted digest of the
                  id (no id, key or tar path), enough for a rebuild to recognise the item and nothing more.
  overlays.lance  interventions and relabels: (kind, target, weight, label, label_name, at), latest row per
                  (kind, target) wins; `kind == "clear"` drops every earlier row.
  gamma.lance     soft-pruning weights (id, v, gamma), overwritten as a whole by each prune.
  edits.lance     the edit history that `vmem versions` lists (at, op, detail, pid, host).
  salt            32 random bytes for the forget digests (created once, never rewritten).

Why Lance: appends never conflict, deletes and updates are rebased or retried by Lance's own optimistic
commit protocol, every version can be read back (time travel) and old versions are removed by
`cleanup_old_versions`, which is what erasure needs. Readers pin nothing: they poll `latest_version`
(a cheap manifest listing) before each query and read only what changed.
"""
from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.errors import UserError

ITEMS, FORGET, OVERLAYS, GAMMA, EDITS = "items", "forget", "overlays", "gamma", "edits"

ITEM_SCHEMA = pa.schema([
    ("id", pa.int64()), ("key", pa.string()), ("label", pa.int64()), ("label_name", pa.string()),
    ("source", pa.string()), ("shard", pa.string()), ("vector", pa.binary()), ("indexed", pa.int64()),
    ("added_at", pa.int64()),
])
META_FIELDS = ("label", "label_name", "key", "source", "shard")
FORGET_SCHEMA = pa.schema([
    ("id", pa.int64()), ("digest", pa.string()), ("key", pa.string()), ("shard", pa.string()),
    ("reason", pa.string()), ("at", pa.int64()), ("erased", pa.bool_()),
])
OVERLAY_SCHEMA = pa.schema([
    ("kind", pa.string()), ("target", pa.string()), ("weight", pa.float64()), ("label", pa.int64()),
    ("label_name", pa.string()), ("at", pa.int64()),
])
GAMMA_SCHEMA = pa.schema([("id", pa.int64()), ("v", pa.int64()), ("gamma", pa.float64())])
EDIT_SCHEMA = pa.schema([("at", pa.int64()), ("op", pa.string()), ("detail", pa.string()),
                         ("pid", pa.int64()), ("host", pa.string())])
SCHEMAS = {ITEMS: ITEM_SCHEMA, FORGET: FORGET_SCHEMA, OVERLAYS: OVERLAY_SCHEMA, GAMMA: GAMMA_SCHEMA,
           EDITS: EDIT_SCHEMA}
_IN_CHUNK = 2000  # ids per `id IN (...)` filter
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def now_ns() -> int:
    return time.time_ns()


def lance_options(url: str) -> Optional[Dict[str, str]]:
    """Lance's object-store settings for `url`: the same S3 endpoint and credentials as `pipeline.storage`."""
    if not storage.is_remote(url):
        return None
    opts = {"aws_region": os.environ.get(storage.ENV_REGION, os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))}
    endpoint = os.environ.get(storage.ENV_ENDPOINT)
    if endpoint:
        opts["aws_endpoint"] = endpoint
        opts["allow_http"] = "true" if endpoint.startswith("http://") else "false"
    for env, key in (("AWS_ACCESS_KEY_ID", "aws_access_key_id"), ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
                     ("AWS_SESSION_TOKEN", "aws_session_token")):
        if os.environ.get(env):
            opts[key] = os.environ[env]
    return opts


_TRANSIENT = ("Not found", "Retryable commit conflict", "preempted", "was deleted", "No such file")


def retry(fn: Callable, *args, attempts: int = 20, **kwargs):
    """Call `fn`, retrying what concurrent writers cause and a second try fixes: a commit conflict Lance
    reports as retryable, or a read of a version whose files a concurrent erasure just removed (readers
    always want the latest version, so they re-open it and read again)."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            if attempt == attempts - 1 or not any(t in str(e) for t in _TRANSIENT):
                raise
            time.sleep(min(0.01 * 2 ** attempt, 0.5) * (0.5 + random.random()))


def id_filter(ids: Sequence[int]) -> List[str]:
    """`id IN (...)` predicates covering `ids`, in chunks short enough for Lance's SQL parser."""
    ids = [int(i) for i in ids if _INT64_MIN <= int(i) <= _INT64_MAX]  # others cannot be ids: match nothing
    return [f"id IN ({','.join(map(str, ids[i:i + _IN_CHUNK]))})" for i in range(0, len(ids), _IN_CHUNK)]


@dataclass
class Table:
    """One Lance table of the state (created empty on first write)."""
    url: str
    schema: pa.Schema

    def __post_init__(self):
        # One open dataset per thread: `latest_version` on it is one cheap listing, and a Lance handle is not
        # safe to use from two threads at once (Serve's ingress calls us from a thread pool).
        self._local = threading.local()
        self._created = False

    @property
    def _handle(self):
        return getattr(self._local, "handle", None)

    def exists(self) -> bool:
        if self._created or self._handle is not None:
            return True
        self._created = storage.exists(storage.join(self.url, "_versions"))
        return self._created

    def dataset(self):
        """The latest committed version (None when nothing was ever written)."""
        return retry(self._dataset)

    def _dataset(self):
        import lance

        if self._handle is None:
            if not self.exists():
                return None
            self._local.handle = lance.dataset(self.url, storage_options=lance_options(self.url))
        else:
            self._handle.checkout_latest()
        return self._handle

    def version(self) -> int:
        """The latest committed version (0: never written); sees other processes' commits."""
        if self._handle is None and self.dataset() is None:
            return 0
        return retry(lambda: self._handle.latest_version)

    def append(self, table: pa.Table) -> int:
        """Append rows in one commit (appends never conflict with other writers); returns the new version."""
        return retry(self._append, table)

    def _append(self, table: pa.Table) -> int:
        import lance

        mode = "append" if self.exists() else "create"
        try:
            ds = lance.write_dataset(table.cast(self.schema), self.url, mode=mode,
                                     storage_options=lance_options(self.url))
        except (OSError, ValueError) as e:
            if mode != "create" or "exist" not in str(e).lower():
                raise
            ds = lance.write_dataset(table.cast(self.schema), self.url, mode="append",
                                     storage_options=lance_options(self.url))
        return ds.version

    def overwrite(self, table: pa.Table) -> int:
        return retry(self._overwrite, table)

    def _overwrite(self, table: pa.Table) -> int:
        import lance

        return lance.write_dataset(table.cast(self.schema), self.url, mode="overwrite" if self.exists() else "create",
                                   storage_options=lance_options(self.url)).version

    def new_rows(self, seen: set, columns: List[str], filter: Optional[str] = None):
        return retry(self._new_rows, seen, columns, filter)

    def _new_rows(self, seen: set, columns: List[str], filter: Optional[str] = None):
        """(rows in fragments not in `seen`, reset) since the last call; `seen` (fragment ids) is updated.

        Lance fragments are immutable, so rows appended by any process arrive as new fragments; `reset` is
        True when a seen fragment is gone (compaction, or an update rewrote rows): then every row is returned
        and the caller must rebuild from scratch."""
        ds = self.dataset()
        if ds is None:
            return self.schema.empty_table().select(columns), False
        frags = {f.fragment_id: f for f in ds.get_fragments()}
        reset = not seen <= set(frags)
        if reset:
            seen.clear()
        parts = [f.to_table(columns=columns, filter=filter) for fid, f in sorted(frags.items()) if fid not in seen]
        seen.update(frags)
        empty = self.schema.empty_table().select(columns)
        return (pa.concat_tables(parts) if parts else empty), reset

    def read(self, columns: Optional[List[str]] = None, filter: Optional[str] = None, version: Optional[int] = None):
        return retry(self._read, columns, filter, version)

    def _read(self, columns: Optional[List[str]] = None, filter: Optional[str] = None, version: Optional[int] = None):
        ds = self.dataset()
        if ds is None:
            return self.schema.empty_table() if columns is None else self.schema.empty_table().select(columns)
        if version is not None:
            ds = ds.checkout_version(version)
        return ds.to_table(columns=columns, filter=filter)

    def index_ids(self) -> None:
        """(Re)build the BTREE index on `id` (one-row look-ups in ~1 ms instead of a scan). Rows appended later
        are scanned until the next rebuild; erasure rebuilds it so no old index file keeps an erased id."""
        ds = self.dataset()
        if ds is not None and ds.count_rows():
            ds.create_scalar_index("id", "BTREE", replace=True)

    def delete(self, predicate: str) -> None:
        ds = self.dataset()
        if ds is not None:
            retry(lambda: self.dataset().delete(predicate))


class MemoryState:
    """The state tables of one memory and the edits over them. Safe from any number of processes."""

    def __init__(self, memory_dir: str):
        self.memory_dir = str(memory_dir).rstrip("/")
        self.dir = storage.join(self.memory_dir, "state")
        self.tables = {name: Table(storage.join(self.dir, f"{name}.lance"), schema) for name, schema in SCHEMAS.items()}
        self._salt: Optional[bytes] = None
        self._forget_version, self._forget_frags = -1, set()
        self._forget_ids, self._digests = np.zeros(0, np.int64), set()

    def __getitem__(self, name: str) -> Table:
        return self.tables[name]

    # ----- forget digests -----
    def salt(self) -> bytes:
        """The memory's secret salt for forget digests (created once; a racing creator's copy is re-read)."""
        if self._salt is None:
            url = storage.join(self.dir, "salt")
            if not storage.exists(url):
                storage.create_exclusive(url, os.urandom(32))
            self._salt = storage.read_bytes(url)
        return self._salt

    def digest(self, ids: Iterable[int]) -> List[str]:
        salt = self.salt()
        return [hashlib.blake2b(int(i).to_bytes(8, "little", signed=True), key=salt, digest_size=16).hexdigest()
                for i in ids]

    # ----- items -----
    def items(self, ids: Sequence[int], columns: Optional[List[str]] = None) -> pa.Table:
        """Rows of `ids` (forgotten ones included: callers decide), in no particular order."""
        cols = columns or [c for c in ITEM_SCHEMA.names if c != "vector"]
        parts = [self[ITEMS].read(cols, f) for f in id_filter(ids)]
        return pa.concat_tables(parts) if parts else ITEM_SCHEMA.empty_table().select(cols)

    def add_items(self, table: pa.Table) -> int:
        return self[ITEMS].append(table)

    def select(self, label: Optional[int] = None, source: Optional[str] = None) -> np.ndarray:
        """Ids of items with this stored label and/or source (forgotten ones included)."""
        clauses = []
        if label is not None:
            clauses.append(f"label = {int(label)}")
        if source is not None:
            clauses.append("source = '" + str(source).replace("'", "''") + "'")
        t = self[ITEMS].read(["id"], " AND ".join(clauses) or None)
        return t.column("id").to_numpy().astype(np.int64)

    # ----- forget list -----
    def forget(self, rows: pa.Table, reason: str) -> int:
        """Record `rows` (id, key, shard) as deleted: one append, durable when it returns."""
        n = rows.num_rows
        if not n:
            return self[FORGET].version()
        ids = rows.column("id").to_pylist()
        t = pa.table({"id": pa.array(ids, pa.int64()), "digest": pa.array(self.digest(ids)),
                      "key": rows.column("key"), "shard": rows.column("shard"),
                      "reason": pa.array([reason] * n), "at": pa.array([now_ns()] * n, pa.int64()),
                      "erased": pa.array([False] * n)})
        return self[FORGET].append(t)

    def _sync_forget(self) -> None:
        """Bring the cached forget list (ids not yet erased, digests of all) up to the latest version."""
        v = self[FORGET].version()
        if v == self._forget_version:
            return
        t, reset = self[FORGET].new_rows(self._forget_frags, ["id", "digest"])
        if reset:
            self._forget_ids, self._digests = np.zeros(0, np.int64), set()
        ids = t.column("id").drop_null().to_numpy().astype(np.int64)
        self._forget_ids = np.union1d(self._forget_ids, ids)
        self._digests.update(t.column("digest").to_pylist())
        self._forget_version = v

    def forgotten_ids(self) -> np.ndarray:
        """Sorted ids on the forget list that are not yet erased (still present in some faiss shard)."""
        self._sync_forget()
        return self._forget_ids

    def forgotten_digests(self) -> set:
        self._sync_forget()
        return self._digests

    def is_forgotten(self, ids: Sequence[int]) -> np.ndarray:
        digests = self.forgotten_digests()
        return np.array([d in digests for d in self.digest(ids)], dtype=bool)

    # ----- edit history -----
    def record(self, op: str, detail: str) -> None:
        """Append one line of edit history (`vmem versions`); the edit itself is already committed."""
        self[EDITS].append(pa.table({"at": pa.array([now_ns()], pa.int64()), "op": [op], "detail": [detail],
                                     "pid": pa.array([os.getpid()], pa.int64()), "host": [socket.gethostname()]}))

    def edits(self) -> List[dict]:
        t = self[EDITS].read().sort_by("at")
        return [{"version": i + 1, "at": r["at"] / 1e9, "op": r["op"], "detail": r["detail"], "pid": r["pid"],
                 "host": r["host"]} for i, r in enumerate(t.to_pylist())]

    # ----- overlays -----
    def set_overlays(self, rows: List[dict]) -> int:
        at = now_ns()
        for r in rows:
            w = r.get("weight")
            if w is not None and not (float(w) >= 0 and np.isfinite(float(w))):
                raise UserError(f"intervention weights must be finite and >= 0, got {w}")
        t = pa.table({"kind": [r["kind"] for r in rows], "target": [str(r.get("target", "")) for r in rows],
                      "weight": pa.array([r.get("weight") for r in rows], pa.float64()),
                      "label": pa.array([r.get("label") for r in rows], pa.int64()),
                      "label_name": pa.array([r.get("label_name") for r in rows], pa.string()),
                      "at": pa.array([at + i for i in range(len(rows))], pa.int64())})
        return self[OVERLAYS].append(t)


def item_rows(ids: Sequence[int], metas: Sequence[dict], vectors: Optional[np.ndarray] = None,
              indexed: int = 0) -> pa.Table:
    """An items table from ids + metadata dicts (+ float32 vectors for items whose vectors live only here)."""
    n = len(ids)
    at = now_ns()
    vec = [np.ascontiguousarray(v, np.float32).tobytes() for v in vectors] if vectors is not None else [None] * n
    cols = {"id": pa.array([int(i) for i in ids], pa.int64())}
    for f in META_FIELDS:
        fill = -1 if f == "label" else ""
        cols[f] = [m.get(f) if m.get(f) is not None else fill for m in metas]
    cols.update({"vector": pa.array(vec, pa.binary()), "indexed": pa.array([indexed] * n, pa.int64()),
                 "added_at": pa.array([at] * n, pa.int64())})
    return pa.table(cols, schema=ITEM_SCHEMA)


def vectors_of(table: pa.Table, dim: int) -> np.ndarray:
    """(n, dim) float32 from the `vector` column of an items table."""
    if not table.num_rows:
        return np.zeros((0, dim), np.float32)
    buf = b"".join(table.column("vector").to_pylist())
    return np.frombuffer(buf, dtype=np.float32).reshape(-1, dim).copy()


def latest_per_target(t: pa.Table) -> List[dict]:
    """Overlay rows in commit order, keeping only those after the last `clear` (later rows win per target)."""
    rows = sorted(t.to_pylist(), key=lambda r: r["at"])
    last_clear = max((i for i, r in enumerate(rows) if r["kind"] == "clear"), default=-1)
    return rows[last_clear + 1:]



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
  edits.lance     edit history lines (at, op, detail, pid, host) of operations that are not one edit commit
                  (build, compaction, prune, rollback) and, folded in by upkeep, those of edits: an add,
                  delete or overlay change carries its history line in its own commit (Lance transaction
                  properties), so each edit is ONE commit; `edits()` merges both (`vmem versions`).
  salt            32 random bytes for the forget digests (created once, never rewritten).

Why Lance: appends never conflict, deletes and updates are rebased or retried by Lance's own optimistic
commit protocol, every version can be read back (time travel) and old versions are removed by
`cleanup_old_versions`, which is what erasure needs. Readers pin nothing: they poll `latest_version`
(a cheap manifest listing) before each query and read only what changed.

Keys are unique by construction (`add_items`: commit, then read back; see there), whatever the number of
processes. Upkeep (`maintain`, called by the memory's background maintenance) keeps every table small under
millions of edits: tiered merging of the one-fragment-per-edit appends, new rows added to the look-up indexes
(`id` of items, `digest` of the forget list), old versions removed after their history lines are folded into
edits.lance. Per process, only the ids awaiting erasure are held (a sorted int64 array); whether an id was
ever deleted is looked up in the forget list's digest index.
"""
from __future__ import annotations

import hashlib
import logging
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
from pipeline.data.items import ITEM_FIELDS, META_FIELDS, META_SCHEMA  # noqa: F401  (META_FIELDS: re-export)
from pipeline.errors import UserError
from pipeline.index import changes

log = logging.getLogger("vmem.state")

ITEMS, FORGET, OVERLAYS, GAMMA, EDITS = "items", "forget", "overlays", "gamma", "edits"

# An item's id and metadata (declared once, in pipeline.data.items), then what the memory keeps about it.
ITEM_SCHEMA = pa.schema([*META_SCHEMA, ("vector", pa.binary()), ("indexed", pa.int64()), ("added_at", pa.int64())])
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
SETTLE_COMMITS = 10  # a racing add waits for its rivals up to this many of its own commit times (or wait_s)
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


@dataclass(frozen=True)
class Upkeep:
    """When `MemoryState.maintain` works on a table (it does nothing below every threshold).

    Fragments are compacted in tiers, so a row is rewritten a few times over its life, not once per upkeep:
    fragments under `small_rows` rows (one per edit) are merged into ~`small_rows`-row fragments once there
    are more than `small_max` of them; fragments of `small_rows`..`mid_rows` rows into ~`mid_rows`-row ones
    once there are more than `mid_max`; bigger fragments (builds' imports, merged tiers) are never rewritten
    by upkeep (erasure rewrites what it must). Versions older than `retention_s` *since they stopped being
    the latest* are removed once more than `max_versions` exist: a reader that opened the latest version less
    than `retention_s` ago still finds its files (older handles re-open on "Not found": see `retry`)."""
    small_rows: int = 1024
    small_max: int = 16
    mid_rows: int = 1 << 16
    mid_max: int = 32
    max_unindexed_rows: int = 2048  # rows outside the scalar index (scanned by every look-up) before it is updated
    max_index_segments: int = 8  # index delta segments before they are merged into one
    max_versions: int = 64
    retention_s: float = 2.0
    check_every: int = 16  # versions a table may advance before a process looks at it again (cheap calls)


UPKEEP = Upkeep()
INDEXED = {ITEMS: "id", FORGET: "digest"}  # the column each table is looked up by (BTREE index)
HISTORY_TABLES = (ITEMS, FORGET, OVERLAYS, GAMMA)  # tables whose commits may carry an edit's history line
_OP, _DETAIL, _AT, _PID, _HOST = "vmem.op", "vmem.detail", "vmem.at", "vmem.pid", "vmem.host"
_LOOKUP_MAX = 4096  # ids checked by indexed `IN` look-ups; more are checked by one scan of the column


@dataclass
class Table:
    """One Lance table of the state (created empty on first write). `on_commit` is called after every commit
    that changes its rows (the memory's change token: `pipeline.index.changes`), never after upkeep."""
    url: str
    schema: pa.Schema
    on_commit: Optional[Callable[[], None]] = None

    def __post_init__(self):
        # One open dataset per thread: `latest_version` on it is one cheap listing, and a Lance handle is not
        # safe to use from two threads at once (Serve's ingress calls us from a thread pool).
        self._local = threading.local()
        self._created = False
        self._cursors: Dict[int, int] = {}  # id(seen set) -> the version `new_rows` last brought it to

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

    def append(self, table: pa.Table, history: Optional[Dict[str, str]] = None) -> int:
        """Append rows in one commit (appends never conflict with other writers); returns the new version.
        `history` (an edit's line, see `MemoryState.edits`) is committed with the rows, as the commit's
        transaction properties."""
        return self._changed(retry(self._append, table, history))

    def _changed(self, result):
        if self.on_commit is not None:
            self.on_commit()
        return result

    def _append(self, table: pa.Table, history: Optional[Dict[str, str]] = None) -> int:
        import lance

        self._ensure_created()
        ds = lance.write_dataset(table.cast(self.schema), self.url, mode="append", storage_options=lance_options(
            self.url), transaction_properties=history or None)
        return ds.version

    def _ensure_created(self, wait_s: float = 10.0) -> None:
        """Create the table (empty) exactly once, whatever the number of processes racing to write first.

        Lance commits a `create` as an overwrite, so two processes creating the table with their first rows
        would each commit a version holding only their own rows: one writer's rows would be lost. So one
        process wins an exclusive marker (`state/.<table>.create`) and creates the table empty; the others
        wait for it and append (a creator that died is replaced after `wait_s`)."""
        import lance

        if self.exists():
            return
        marker = self.url.rstrip("/") + ".create"
        marker = storage.join(marker.rsplit("/", 1)[0], "." + marker.rsplit("/", 1)[1])
        try:
            storage.create_exclusive(marker, f"{socket.gethostname()}:{os.getpid()}".encode())
            mine = True
        except storage.AlreadyExists:
            mine = False
        deadline = time.monotonic() + wait_s
        while not mine and not storage.exists(storage.join(self.url, "_versions")):
            if time.monotonic() > deadline:
                mine = True  # the creator died between its marker and the table: create it ourselves
                break
            time.sleep(0.02)
        if mine and not storage.exists(storage.join(self.url, "_versions")):
            try:
                lance.write_dataset(self.schema.empty_table(), self.url, mode="create",
                                    storage_options=lance_options(self.url))
            except (OSError, ValueError) as e:  # created meanwhile by a replacing process: the same empty table
                if "exist" not in str(e).lower():
                    raise
        self._created = True

    def insert_new(self, data: pa.RecordBatchReader, on: str = "id") -> int:
        """Append the rows of `data` whose `on` value the table does not hold yet (an anti-join inside Lance,
        streamed: neither side is held in RAM here), in one commit; returns how many rows were added."""
        if not self.exists():
            t = data.read_all()
            if t.num_rows:
                self.append(t)
            return t.num_rows
        ds = self.dataset()
        res = ds.merge_insert(on).when_not_matched_insert_all().execute(data)
        return self._changed(int(res["num_inserted_rows"]))

    def overwrite(self, table: pa.Table) -> int:
        return self._changed(retry(self._overwrite, table))

    def _overwrite(self, table: pa.Table) -> int:
        import lance

        return lance.write_dataset(table.cast(self.schema), self.url, mode="overwrite" if self.exists() else "create",
                                   storage_options=lance_options(self.url)).version

    def new_rows(self, seen: set, columns: List[str], filter: Optional[str] = None):
        return retry(self._new_rows, seen, columns, filter)

    def _new_rows(self, seen: set, columns: List[str], filter: Optional[str] = None):
        """(rows in fragments not in `seen`, reset) since the last call; `seen` (fragment ids) is updated.

        Lance fragments are immutable, so rows appended by any process arrive as new fragments. Fragments that
        table upkeep merged (a Rewrite: the same rows in new fragments) are followed through the commits in
        between: when every row of a merged fragment was seen, it is not read again; when it mixes seen and
        new rows it is read whole, so rows may repeat ones returned before (callers dedupe by id). `reset` is
        True when rows of a seen fragment were deleted or rewritten (or the commits in between are no longer on
        disk): then every row is returned and the caller must rebuild from scratch."""
        ds = self.dataset()
        if ds is None:
            return self.schema.empty_table().select(columns), False
        frags = {f.fragment_id: f for f in ds.get_fragments()}
        reset = False
        if not seen <= set(frags):
            known = self._follow_rewrites(ds, seen, self._cursors.get(id(seen)), set(frags))
            seen.clear()
            if known is None:
                reset = True
            else:
                seen.update(known)
        parts = [f.to_table(columns=columns, filter=filter) for fid, f in sorted(frags.items()) if fid not in seen]
        seen.update(frags)
        self._cursors[id(seen)] = ds.version
        empty = self.schema.empty_table().select(columns)
        return (pa.concat_tables(parts) if parts else empty), reset

    @staticmethod
    def _follow_rewrites(ds, seen: set, since: Optional[int], current: set, max_steps: int = 256) -> Optional[set]:
        """The fragments of `current` whose rows are all in `seen` (as of version `since`), found by replaying
        the transactions since then; None when that cannot be told (rows deleted or rewritten, or a
        transaction no longer on disk)."""
        if since is None or not 0 < ds.version - since <= max_steps:
            return None
        have = set(seen)
        for v in range(since + 1, ds.version + 1):
            try:
                tx = ds.read_transaction(v)
            except TypeError:
                # pylance 14 cannot decode a Rewrite that remapped an index (RewrittenIndex's fields): the
                # fragments it replaced and added are the difference of the two manifests.
                try:
                    before = {f.fragment_id: f.metadata for f in ds.checkout_version(v - 1).get_fragments()}
                    after = {f.fragment_id: f.metadata for f in ds.checkout_version(v).get_fragments()}
                except (OSError, ValueError):
                    return None
                old, new = set(before) - set(after), set(after) - set(before)
                if sum(before[f].num_rows for f in old) != sum(after[f].num_rows for f in new):
                    return None  # not a plain rewrite of the same rows
                have = (have - old) | new if old <= have else have - old
                continue
            except (OSError, ValueError):
                return None
            op = getattr(tx, "operation", None)
            kind = type(op).__name__
            if kind == "Rewrite":
                for g in op.groups:
                    old = {f.id for f in g.old_fragments}
                    new = {f.id for f in g.new_fragments}
                    have = (have - old) | new if old <= have else have - old
            elif kind in ("Delete", "Update"):  # rows of seen fragments deleted or rewritten: read again
                gone = op.deleted_fragment_ids if kind == "Delete" else op.removed_fragment_ids
                if have & ({int(f) for f in gone} | {f.id for f in op.updated_fragments}):
                    return None
            elif kind in ("Overwrite", "Restore", "Merge", "Project", "DataReplacement", "DataOverlay", "Clone"):
                return None
            # Append, CreateIndex, config changes, and what Python does not name (a compaction's fragment-id
            # reservation) leave seen rows where they were; the check below catches any fragment gone.
        return have if have <= current else None

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
        are scanned until `MemoryState.maintain` indexes them; erasure rebuilds it so no old index file keeps
        an erased id."""
        ds = self.dataset()
        if ds is not None and ds.count_rows():
            ds.create_scalar_index("id", "BTREE", replace=True)

    def delete(self, predicate: str) -> None:
        ds = self.dataset()
        if ds is not None:
            self._changed(retry(lambda: self.dataset().delete(predicate)))

    # ----- history committed with the rows (transaction properties) -----
    def history(self) -> List[tuple]:
        """(version, edit line) of every version still on disk whose commit carries an edit's history."""
        return retry(self._history)

    def _history(self) -> List[tuple]:
        ds = self.dataset()
        if ds is None:
            return []
        out = []
        for v in ds.versions():
            try:
                tx = ds.read_transaction(v["version"])
            except TypeError:
                continue  # a Rewrite pylance 14 cannot decode (see `_follow_rewrites`): upkeep, no edit
            except (OSError, ValueError) as e:
                if "not found" in str(e).lower():
                    continue  # removed by a concurrent cleanup, after its line was folded into edits.lance
                raise
            props = (getattr(tx, "transaction_properties", None) or {}) if tx is not None else {}
            if _OP in props:
                out.append((v["version"], {"at": int(props[_AT]), "op": props[_OP], "detail": props.get(_DETAIL, ""),
                                           "pid": int(props.get(_PID, 0)), "host": props.get(_HOST, "")}))
        return out

    # ----- upkeep -----
    def fragment_rows(self) -> Dict[int, int]:
        ds = self.dataset()
        return {} if ds is None else {f.fragment_id: f.metadata.physical_rows for f in ds.get_fragments()}

    def compact_tiers(self, up: Upkeep, force: bool = False) -> int:
        """Merge small fragments tier by tier (see `Upkeep`); returns how many fragments were merged away."""
        removed = 0
        for lo, hi, most in ((0, up.small_rows, up.small_max), (up.small_rows, up.mid_rows, up.mid_max)):
            rows = self.fragment_rows()
            tier = [f for f, n in rows.items() if lo <= n < hi]
            if len(tier) > most or (force and len(tier) > 1):
                others = [f for f, n in rows.items() if not lo <= n < hi]  # boundaries: never rewritten here

                def run():
                    return self.dataset().optimize.compact_files(
                        target_rows_per_fragment=hi, excluded_fragment_ids=others, num_threads=1)
                removed += retry(run).fragments_removed
        return removed

    def update_index(self, column: str, up: Upkeep, force: bool = False) -> Optional[str]:
        """Create the BTREE index on `column`, or add the rows appended since to it (a new segment; segments
        merged past `max_index_segments`); returns what was done, None if nothing."""
        ds = self.dataset()
        if ds is None or not ds.count_rows():
            return None
        mine = [i for i in ds.list_indices() if list(i["fields"]) == [column]]
        if not mine:
            ds.create_scalar_index(column, "BTREE", replace=True)
            return "created"
        covered = set()
        for i in mine:
            covered |= {int(f) for f in i["fragment_ids"]}
        unindexed = sum(n for f, n in self.fragment_rows().items() if f not in covered)
        if unindexed > up.max_unindexed_rows or (force and unindexed):
            merge = len(mine) if len(mine) >= up.max_index_segments else 0
            retry(lambda: self.dataset().optimize.optimize_indices(index_names=[mine[0]["name"]],
                                                                    num_indices_to_merge=merge))
            return f"added {unindexed} row(s)" + (f", merged {merge} segment(s)" if merge else "")
        return None

    def version_count(self) -> int:
        """How many versions are on disk (one listing of `_versions/`)."""
        return sum(1 for n in storage.listdir(storage.join(self.url, "_versions")) if n.endswith(".manifest"))

    def remove_versions(self, upto: int, retention_s: float) -> int:
        """Remove the versions <= `upto` that stopped being the latest over `retention_s` ago (never the
        latest); returns how many."""
        ds = self.dataset()
        if ds is None:
            return 0
        vs = sorted(ds.versions(), key=lambda v: v["version"])
        cutoff = time.time() - retention_s
        old = [a["version"] for a, b in zip(vs, vs[1:])
               if a["version"] <= upto and b["timestamp"].timestamp() <= cutoff]
        if not old:
            return 0
        retry(lambda: self.dataset().cleanup_old_versions(versions=old, error_if_tagged_old_versions=False))
        return len(old)


class MemoryState:
    """The state tables of one memory and the edits over them. Safe from any number of processes."""

    def __init__(self, memory_dir: str):
        self.memory_dir = str(memory_dir).rstrip("/")
        self.dir = storage.join(self.memory_dir, "state")
        bump = lambda: changes.bump(self.memory_dir)  # noqa: E731
        self.tables = {name: Table(storage.join(self.dir, f"{name}.lance"), schema, bump)
                       for name, schema in SCHEMAS.items()}
        self._salt: Optional[bytes] = None
        # Per process, only the ids still waiting for erasure (int64, sorted): what searches exclude. Digests
        # of deleted items are looked up in the forget table's index, never held here.
        self._forget_version, self._forget_frags = -1, set()
        self._forget_ids = np.zeros(0, np.int64)
        self._forget_lock = threading.Lock()
        self._upkeep_seen: Dict[str, int] = {}

    def __getitem__(self, name: str) -> Table:
        return self.tables[name]

    # ----- forget digests -----
    def salt(self) -> bytes:
        """The memory's secret salt for forget digests (created once; a racing creator's copy is re-read)."""
        if self._salt is None:
            url = storage.join(self.dir, "salt")
            if not storage.exists(url):
                try:
                    storage.create_exclusive(url, os.urandom(32))
                except storage.AlreadyExists:
                    pass  # another process created it between our check and our create: theirs is the salt
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
        if len(ids) > _LOOKUP_MAX:  # one scan of the id column beats thousands of index look-ups
            t = self[ITEMS].read(list(dict.fromkeys(["id", *cols])))
            keep = np.isin(t.column("id").to_numpy(), np.asarray([int(i) for i in ids], np.int64))
            return t.filter(pa.array(keep)).select(cols)
        parts = [self[ITEMS].read(cols, f) for f in id_filter(ids)]
        return pa.concat_tables(parts) if parts else ITEM_SCHEMA.empty_table().select(cols)

    def add_items(self, table: pa.Table, keys: Optional[Sequence[str]] = None, detail: Optional[str] = None,
                  op: str = "add", wait_s: float = 2.0) -> int:
        """Add item rows in one commit, only if no live or deleted item has one of their ids (= their keys);
        returns the table version. With `detail`, the edit's history line (`op`, `detail`) is committed with
        the rows (no second commit). Refused keys raise UserError and change nothing.

        Unique by construction across processes: the rows are appended with a stamp (`added_at`) and then
        read back. An add wins only when, after its commit, its rows are the only rows of their ids and none
        is on the forget list; it loses (deletes its own rows, raises) when another row of one of its ids has
        an earlier stamp or its id is deleted, and waits (up to `wait_s`) while only later-stamped rows of
        racing adds are present (those lose and go). Two winners are impossible: whichever checks later sees
        the other's committed row. Among racers that commit before either checks, the earliest stamp wins."""
        ids = table.column("id").to_numpy().astype(np.int64)
        keys = [str(k) for k in (keys if keys is not None else table.column("key").to_pylist())]
        if len(np.unique(ids)) != len(ids):
            raise UserError("add got the same key twice in one call; keys must be unique")
        self._refuse(ids, keys)
        stamp = self._stamp()
        table = table.set_column(table.schema.get_field_index("added_at"), "added_at",
                                 pa.array(np.full(len(ids), stamp, np.int64)))
        history = self._history(op, detail, stamp) if detail is not None else None
        t = time.monotonic()
        version = self[ITEMS].append(table, history)
        # The racers' removals are commits as slow as ours: on a slow store (S3 under load: a commit of
        # seconds) a fixed wait let the earliest add give up before the later ones had removed their rows,
        # and then no add of the key won. So the wait scales with the commit this store just took.
        self._settle(ids, keys, stamp, max(wait_s, SETTLE_COMMITS * (time.monotonic() - t)),
                     undo=history is not None)
        return version

    @staticmethod
    def _stamp() -> int:
        """A commit stamp for an add: the time in ns, its last 3 digits random, so racing adds from several
        processes get distinct stamps (equal ones only make both lose)."""
        return now_ns() // 1000 * 1000 + random.randrange(1000)

    def _refuse(self, ids: np.ndarray, keys: Sequence[str]) -> None:
        gone = self.is_forgotten(ids)
        if gone.any():
            j = int(np.flatnonzero(gone)[0])
            raise UserError(f"key {keys[j]!r} (id {ids[j]}) was deleted, and deletion is final: add it under a "
                            f"new key")
        held = self.items(ids.tolist(), ["id"]).column("id").to_pylist()
        if held:
            raise UserError(f"key(s) already in the memory, e.g. id {held[0]}; keys must be unique")

    def _settle(self, ids: np.ndarray, keys: Sequence[str], stamp: int, wait_s: float, undo: bool) -> None:
        """After the commit of an add stamped `stamp`: return when it won, else remove its rows and raise."""
        deadline = time.monotonic() + wait_s
        pause = 0.002
        while True:
            gone = self.is_forgotten(ids)
            if gone.any():
                j = int(np.flatnonzero(gone)[0])
                self._lose(ids, stamp, undo, UserError(
                    f"key {keys[j]!r} (id {ids[j]}) was deleted, and deletion is final: add it under a new key"))
            rows = self.items(ids.tolist(), ["id", "added_at"])
            rid, at = rows.column("id").to_numpy(), rows.column("added_at").to_numpy()
            mine = at == stamp
            earlier = ~mine & (at < stamp)
            if earlier.any():
                self._lose(ids, stamp, undo, UserError(
                    f"key(s) already in the memory, e.g. id {int(rid[earlier][0])}; keys must be unique"))
            _, per_id = np.unique(rid[mine], return_counts=True)
            if not (~mine).any() and len(per_id) == len(ids) and (per_id == 1).all():
                return  # our rows, one per id, alone: the add won
            # Racing adds with later stamps are still there (they lose and remove their rows), or a racer got
            # the same stamp (then neither can tell its rows apart: both lose at the deadline). The earliest
            # stamp may not simply win here: a later racer that checked before our row was visible has won
            # already. On a slow store all may lose: a clear error the client can retry, never two winners.
            if time.monotonic() > deadline:
                self._lose(ids, stamp, undo, UserError(
                    f"key(s) already in the memory, e.g. id {int(rid[~mine][0]) if (~mine).any() else int(ids[0])}"
                    f"; keys must be unique (another process was adding it at the same time)"))
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 0.05)

    def _lose(self, ids: np.ndarray, stamp: int, undo: bool, error: UserError):
        if undo:  # first, so `vmem versions` never lists an add that was taken back
            self.record("undo", str(stamp))
        for f in id_filter(ids.tolist()):
            self[ITEMS].delete(f"({f}) AND added_at = {int(stamp)}")
        raise error

    def import_items(self, data) -> int:
        """Append the item rows of `data` (a table or a RecordBatchReader) whose ids the item table does not
        hold yet: one anti-join inside Lance and one commit, whatever the table's size; returns how many."""
        if isinstance(data, pa.Table):
            data = pa.RecordBatchReader.from_batches(ITEM_SCHEMA, data.cast(ITEM_SCHEMA).to_batches())
        return self[ITEMS].insert_new(data)  # Lance retries a conflicting merge itself (a reader is read once)

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
    def forget(self, rows: pa.Table, reason: str, detail: Optional[str] = None) -> int:
        """Record `rows` (id, key, shard) as deleted: one append, durable when it returns. With `detail`, the
        edit's history line (`reason`, `detail`) is committed with it."""
        n = rows.num_rows
        if not n:
            return self[FORGET].version()
        ids = rows.column("id").to_pylist()
        at = now_ns()
        t = pa.table({"id": pa.array(ids, pa.int64()), "digest": pa.array(self.digest(ids)),
                      "key": rows.column("key"), "shard": rows.column("shard"),
                      "reason": pa.array([reason] * n), "at": pa.array([at] * n, pa.int64()),
                      "erased": pa.array([False] * n)})
        return self[FORGET].append(t, self._history(reason, detail, at) if detail is not None else None)

    def _sync_forget(self) -> None:
        """Bring the cached ids awaiting erasure up to the latest forget-list version (reads new fragments
        only; fragments merged by upkeep are followed, not read again)."""
        with self._forget_lock:
            v = self[FORGET].version()
            if v == self._forget_version:
                return
            t, reset = self[FORGET].new_rows(self._forget_frags, ["id"])
            ids = np.unique(t.column("id").drop_null().to_numpy().astype(np.int64))
            self._forget_ids = ids if reset else np.union1d(self._forget_ids, ids)
            self._forget_version = v

    def forgotten_ids(self) -> np.ndarray:
        """Sorted ids on the forget list that are not yet erased (still present in some faiss shard)."""
        self._sync_forget()
        return self._forget_ids

    def is_forgotten(self, ids: Sequence[int], erased_only: bool = False) -> np.ndarray:
        """For each id: was it ever deleted (erased or not; with `erased_only`, erased)? Exact: checked against
        the forget list's salted digests, through the digest index for a few ids, by one streamed scan of the
        column for many."""
        ids = [int(i) for i in ids]
        if not ids or not self[FORGET].exists():
            return np.zeros(len(ids), bool)
        digests = self.digest(ids)
        erased = " AND erased = true" if erased_only else ""
        if len(ids) <= _LOOKUP_MAX:
            found = set()
            for i in range(0, len(digests), _IN_CHUNK):
                f = "digest IN (" + ",".join(f"'{d}'" for d in digests[i:i + _IN_CHUNK]) + ")" + erased
                found.update(self[FORGET].read(["digest"], f).column("digest").to_pylist())
            return np.array([d in found for d in digests], dtype=bool)
        want = np.array(digests, dtype="S32")
        return retry(self._scan_digests, want, erased_only)

    def _scan_digests(self, want: np.ndarray, erased_only: bool = False) -> np.ndarray:
        hit = np.zeros(len(want), bool)
        ds = self[FORGET].dataset()
        for batch in ds.to_batches(columns=["digest"], filter="erased = true" if erased_only else None,
                                   batch_size=1 << 20):
            col = batch.column(0).drop_null().to_numpy(zero_copy_only=False).astype("S32")
            hit |= np.isin(want, col)
        return hit

    # ----- edit history -----
    @staticmethod
    def _history(op: str, detail: Optional[str], at: int) -> Dict[str, str]:
        return {_OP: str(op), _DETAIL: str(detail or ""), _AT: str(int(at)), _PID: str(os.getpid()),
                _HOST: socket.gethostname()}

    def record(self, op: str, detail: str) -> None:
        """Append one line of edit history (`vmem versions`) of its own: for operations that are not one
        commit of an edit (build, compaction, prune, rollback). Edits pass their line to the commit instead
        (`add_items`, `forget`, `set_overlays` with `detail`)."""
        self[EDITS].append(pa.table({"at": pa.array([now_ns()], pa.int64()), "op": [op], "detail": [detail],
                                     "pid": pa.array([os.getpid()], pa.int64()), "host": [socket.gethostname()]}))

    def edits(self) -> List[dict]:
        """The edit history, oldest first: lines of edits.lance plus the lines committed with edits (in the
        transactions of table versions not yet folded into edits.lance by upkeep)."""
        rows = self[EDITS].read().to_pylist() if self[EDITS].exists() else []
        for name in HISTORY_TABLES:
            rows += [e for _, e in self[name].history()]
        return _edit_lines(rows)

    def fold_history(self, name: str) -> int:
        """Copy the history lines committed with `name`'s versions into edits.lance (those not there yet), so
        that removing those versions loses no line; returns the newest version folded (0: none)."""
        ds = self[name].dataset()
        if ds is None:
            return 0
        latest = ds.version
        lines = [e for v, e in self[name].history() if v <= latest]
        if lines:
            lo = min(e["at"] for e in lines)
            have = {_line_key(r) for r in self[EDITS].read(filter=f"at >= {lo}").to_pylist()} \
                if self[EDITS].exists() else set()
            new = [e for e in lines if _line_key(e) not in have]
            if new:
                self[EDITS].append(pa.Table.from_pylist(new, schema=EDIT_SCHEMA))
        return latest

    def remove_old_versions(self, name: str, retention_s: float = 0.0) -> int:
        """Remove `name`'s old versions (see `Table.remove_versions`) after folding their history lines into
        edits.lance; retention 0 removes every version but the latest at the fold (erasure)."""
        upto = self.fold_history(name) if name in HISTORY_TABLES else self[name].version()
        return self[name].remove_versions(upto, retention_s)

    # ----- upkeep -----
    def maintain(self, force: bool = False, upkeep: Upkeep = UPKEEP) -> dict:
        """Keep the state tables small and fast under any number of edits: merge small fragments, add new rows
        to the look-up indexes, remove old versions (their history lines folded first). Cheap when there is
        nothing to do: a table is looked at only after it advanced `check_every` versions since this process
        last looked (or with `force`). Safe beside writers and readers in other processes (upkeep that loses
        a commit race to an edit is simply skipped). Gamma's versions are kept: rollback reads them.
        Returns what was done per table ({} when nothing)."""
        out = {}
        for name in (ITEMS, FORGET, OVERLAYS, EDITS):
            table = self[name]
            if not table.exists():
                continue
            v = table.version()
            last = self._upkeep_seen.get(name)
            if not force and last is not None and v - last < upkeep.check_every:
                continue
            self._upkeep_seen[name] = v
            done = {}
            try:
                merged = table.compact_tiers(upkeep, force)
                if merged:
                    done["fragments_merged"] = merged
                if name in INDEXED:
                    what = table.update_index(INDEXED[name], upkeep, force)
                    if what:
                        done["index"] = what
                if force or table.version_count() > upkeep.max_versions:
                    removed = self.remove_old_versions(name, upkeep.retention_s)
                    if removed:
                        done["versions_removed"] = removed
            except (OSError, ValueError, RuntimeError) as e:  # lost a race to another writer: next time
                log.info("state upkeep of %s skipped: %s", name, str(e)[:300])
                done["skipped"] = str(e)[:300]
            if done:
                out[name] = done
        return out

    # ----- overlays -----
    def set_overlays(self, rows: List[dict], op: Optional[str] = None, detail: Optional[str] = None) -> int:
        """Append overlay rows in one commit; with `op` and `detail`, the edit's history line too."""
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
        history = self._history(op, detail, at + len(rows) - 1) if op is not None and detail is not None else None
        return self[OVERLAYS].append(t, history)


def _line_key(r: dict) -> tuple:
    return int(r["at"]), str(r["op"]), str(r["detail"]), int(r["pid"]), str(r["host"])


def _edit_lines(rows: List[dict]) -> List[dict]:
    """Numbered edit lines from raw ones: duplicates (a line folded into edits.lance and still in its
    version's transaction) once, adds taken back by an `undo` line left out, the `undo` lines themselves too."""
    undone = {(int(r["detail"]), int(r["pid"]), str(r["host"])) for r in rows if r["op"] == "undo"}
    uniq = {}
    for r in rows:
        if r["op"] != "undo" and (int(r["at"]), int(r["pid"]), str(r["host"])) not in undone:
            uniq.setdefault(_line_key(r), r)
    lines = sorted(uniq.values(), key=_line_key)
    return [{"version": i + 1, "at": r["at"] / 1e9, "op": r["op"], "detail": r["detail"], "pid": r["pid"],
             "host": r["host"]} for i, r in enumerate(lines)]


def item_rows(ids: Sequence[int], metas: Sequence[dict], vectors: Optional[np.ndarray] = None,
              indexed: int = 0) -> pa.Table:
    """An items table from ids + metadata dicts (+ float32 vectors for items whose vectors live only here)."""
    n = len(ids)
    at = now_ns()
    vec = [np.ascontiguousarray(v, np.float32).tobytes() for v in vectors] if vectors is not None else [None] * n
    cols = {"id": pa.array([int(i) for i in ids], pa.int64())}
    for f in ITEM_FIELDS:
        cols[f.name] = [m.get(f.name) if m.get(f.name) is not None else f.fill for m in metas]
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



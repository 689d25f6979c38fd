"""One shard of a memory: its files (save / load with sha256 checks) and `ShardSearcher`, which searches it.

Files of shard s of version v (paths relative to the memory dir, as stored in the manifest):
  shards/v{v:06d}/shard-{s:03d}.index         faiss IVF index populated from the trained index, ids = external
  shards/v{v:06d}/shard-{s:03d}.meta.parquet  id, label, label_name, key, source, shard: sorted by id,
                                              uncompressed so pyarrow memory-maps it
  shards/v{v:06d}/shard-{s:03d}.vectors.npy   optional re-rank vectors (float16/float32), row j = meta row j
                                              (`pipeline.index.rerank`); memory-mapped, never loaded into RAM
All are written atomically (`pipeline.storage`), so a reader sees a whole file or none; a file is never
rewritten in place (a searcher may have it memory-mapped), a new version writes new files.

`ShardSearcher` works as a plain class and as a Ray actor (`ray.remote(ShardSearcher)`): it verifies both
checksums, memory-maps the index (`faiss.IO_FLAG_MMAP`; S3 files are first copied to a local cache), and
answers `search(xq, k, nprobe, exclude, rerank_k)` with external ids + metadata. With a re-rank file and
`rerank_k` > 0 the codes propose max(k, rerank_k) candidates and exact similarities from the file decide the
top k (scores returned are then exact). An `ExcludeSet(version, ids)` becomes
`SearchParametersIVF(sel=IDSelectorNot(IDSelectorBatch(ids)))`, so faiss itself skips excluded ids and k live
results still come back; the selector is built once per exclude version and cached.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.items import HIT_FIELDS, META_COLUMNS
from pipeline.errors import IntegrityError, NotFound
from pipeline.index.manifest import ShardEntry, version_name
from pipeline.index.neighbors import Neighbors
from pipeline.index.rerank import rerank

log = logging.getLogger("vmem.index")

_CHUNK = 8 << 20


@dataclass
class ExcludeSet:
    """Ids that searches must skip, tagged with a version: searchers cache the faiss selector per version.

    `ids` may be an int64 array, or (from the Router) a one-element list holding a Ray ObjectRef to it, so a
    searcher that already caches this version never fetches the ids again.
    """
    version: Any
    ids: Any


class ExcludeShipper:
    """Ships ExcludeSets to remote searchers: the ids go into the Ray object store once per version, and the
    searchers get them as a one-element list holding the ObjectRef (so Ray does not resolve it and an actor
    that caches this version never fetches the ids again)."""

    def __init__(self) -> None:
        self._sent: Optional[ExcludeSet] = None

    def __call__(self, exclude: Optional[ExcludeSet]) -> Optional[ExcludeSet]:
        if exclude is None:
            return None
        if self._sent is None or self._sent.version != exclude.version:
            import ray

            ids = np.ascontiguousarray(exclude.ids, dtype=np.int64)
            self._sent = ExcludeSet(exclude.version, [ray.put(ids)])
        return self._sent


# ---------------------------------------------------------------- files

def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_url(url: str) -> str:
    """sha256 of the file at `url`, streamed; NotFound naming the file if it is missing."""
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise NotFound(f"memory file is missing: {url}")
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def verify(url: str, sha256: str) -> None:
    """Raise NotFound / IntegrityError naming `url` unless its content hashes to `sha256`."""
    got = sha256_url(url)
    if got != sha256:
        raise IntegrityError(f"memory file {url} is corrupt: sha256 {got[:12]}... does not match the manifest's "
                             f"{sha256[:12]}...; rebuild it (`vmem build`) or load an older version")


def shard_paths(version: int, shard: int, tag: str = "") -> tuple:
    """(index path, meta path) of shard `shard` written by version `version`, relative to the memory dir.
    `tag` makes the folder unique to one writer (compactions racing for the same version never share files)."""
    base = f"shards/{version_name(version)}{'-' + tag if tag else ''}/shard-{int(shard):03d}"
    return f"{base}.index", f"{base}.meta.parquet"


def vectors_path(version: int, shard: int, tag: str = "") -> str:
    """Path of the re-rank vectors file of shard `shard` written by `version`, relative to the memory dir."""
    return shard_paths(version, shard, tag)[0][: -len(".index")] + ".vectors.npy"


def meta_table(table: pa.Table) -> pa.Table:
    """The metadata columns of an embeddings table, sorted by id (lookups are binary searches)."""
    t = table.select(list(META_COLUMNS))
    return t.take(pc.sort_indices(t, [("id", "ascending")]))


def save_shard(memory_dir: str, version: int, shard: int, index: faiss.Index, meta: pa.Table,
               tag: str = "", vectors: Optional[np.ndarray] = None, rerank_dtype: str = "float32") -> ShardEntry:
    """Write a populated shard (index + metadata [+ re-rank vectors]) atomically under `version` (in a folder
    of its own with `tag`).

    `vectors` (n, d) float32, row i = the item of `meta` row i (any id order), makes the shard's re-rank file
    (stored as `rerank_dtype`, rows re-ordered to the sorted ids). Returns the shard's manifest entry.
    """
    from pipeline.index.rerank import aligned, vectors_bytes

    rel_index, rel_meta = shard_paths(version, shard, tag)
    index_bytes = faiss.serialize_index(index)
    table = meta_table(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="none")
    meta_bytes = buf.getvalue()
    entry = ShardEntry(shard=int(shard), path=rel_index, meta_path=rel_meta, count=int(index.ntotal),
                       sha256=sha256_bytes(index_bytes), meta_sha256=sha256_bytes(meta_bytes))
    if vectors is not None:
        assert len(vectors) == meta.num_rows, f"{len(vectors)} vectors for {meta.num_rows} metadata rows"
        vec_bytes = vectors_bytes(aligned(meta.column("id").to_numpy(), np.asarray(vectors),
                                          table.column("id").to_numpy()), rerank_dtype)
        entry.vectors_path, entry.vectors_sha256 = vectors_path(version, shard, tag), sha256_bytes(vec_bytes)
        storage.atomic_write_bytes(storage.join(memory_dir, entry.vectors_path), vec_bytes)
    storage.atomic_write_bytes(storage.join(memory_dir, rel_meta), meta_bytes)
    storage.atomic_write_bytes(storage.join(memory_dir, rel_index),
                               index_bytes.tobytes() if storage.is_remote(memory_dir) else index_bytes)
    return entry


def verified_copy(url: str, sha256: Optional[str] = None) -> str:
    """A local path holding `url`'s bytes, checked against `sha256` when given. For remote files the
    checksum is taken of the local cached copy itself, and a stale or corrupt cached copy is fetched again."""
    if sha256 is None:
        if not storage.exists(url):
            raise NotFound(f"memory file is missing: {url}")
        return storage.local_copy(url)
    if not storage.is_remote(url):
        verify(url, sha256)
        return storage.local_copy(url)
    path = storage.local_copy(url)
    if sha256_url(path) != sha256:
        os.remove(path)  # stale (a rewritten object) or damaged cache entry: fetch it again
        path = storage.local_copy(url)
        verify(path, sha256)
    return path


def read_index(url: str, sha256: Optional[str] = None, mmap: bool = True) -> faiss.Index:
    """Load a faiss index file (checksum verified first when given), memory-mapped where faiss supports it."""
    path = verified_copy(url, sha256)
    if mmap:
        try:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP)
        except RuntimeError as e:  # index types without mmap support load into RAM
            log.debug("no mmap for %s (%s): reading into RAM", url, e)
    return faiss.read_index(path)


def read_meta(url: str, sha256: Optional[str] = None) -> pa.Table:
    return pq.read_table(verified_copy(url, sha256), memory_map=True)


def open_vectors(url: str, sha256: Optional[str] = None, rows: Optional[int] = None) -> np.ndarray:
    """A shard's re-rank vectors, memory-mapped read-only.

    With `sha256`, the content is checked first (a full read: for a caller that reads every row anyway, such as
    compaction carrying them over). With `rows` instead, only the shape is checked (the file holds `rows` rows
    and its length is what the header says): opening a shard for search maps the file and touches only the
    rows a query re-ranks, so hashing it would read the whole memory's vectors at every open (15 GB at 10M
    items). Truncation cannot hide from the shape check; the bytes' checksum is `vmem audit`'s to verify."""
    path = verified_copy(url, sha256) if sha256 else verified_copy(url)
    try:
        xb = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # numpy refuses a file shorter than its header says
        raise IntegrityError(f"memory file {url} is damaged: {e}; rebuild it (`vmem build`) or load an older "
                             f"version") from e
    if rows is not None and (xb.ndim != 2 or len(xb) != rows):
        raise IntegrityError(f"{url} holds {xb.shape[0] if xb.ndim else 0} rows, the shard's metadata {rows}")
    return xb


def read_shard_vectors(memory_dir: str, entry: ShardEntry, drop_ids: Optional[np.ndarray] = None):
    """(ids, vectors float32) stored in a shard's re-rank file, ids sorted, minus `drop_ids`; None without one.

    What compaction needs to carry a shard's vectors over to the next version (`save_shard(vectors=...)`).
    """
    if not entry.vectors_path:
        return None
    ids = read_meta(storage.join(memory_dir, entry.meta_path), entry.meta_sha256).column("id").to_numpy()
    xb = open_vectors(storage.join(memory_dir, entry.vectors_path), entry.vectors_sha256)
    keep = ~np.isin(ids, drop_ids) if drop_ids is not None and len(drop_ids) else np.ones(len(ids), bool)
    return ids[keep].astype(np.int64), np.asarray(xb[keep], dtype=np.float32)


# ---------------------------------------------------------------- searching

def lookup_meta(meta: pa.Table, meta_ids: np.ndarray, I: np.ndarray) -> Dict[str, np.ndarray]:
    """Metadata arrays shaped like I for the ids in I (-1 or unknown -> label -1, empty strings)."""
    return held_meta(meta, meta_ids, I)[1]


def held_meta(meta: pa.Table, meta_ids: np.ndarray, I: np.ndarray) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """(held, metadata): which ids of I this metadata table holds (`meta_ids` sorted), and the `Neighbors`
    metadata arrays shaped like I (fills where not held)."""
    flat = I.reshape(-1)
    out = {f.hit_name: np.full(flat.shape, f.fill, dtype=f.dtype) for f in HIT_FIELDS}
    held = fill_meta(meta, meta_ids, flat, out)
    return held.reshape(I.shape), {n: a.reshape(I.shape) for n, a in out.items()}


def fill_meta(meta: pa.Table, meta_ids: np.ndarray, flat: np.ndarray, out: Dict[str, np.ndarray]) -> np.ndarray:
    """Write the metadata of the ids of `flat` this table holds into `out` (arrays shaped like `flat`, one per
    hit field) and return which ids it held. One `take` of only the held rows, nothing at all when it holds
    none: a router fills one set of arrays shard after shard, so a search costs a take per shard that holds a
    hit, not a set of arrays per shard (with 10 shards that was most of a query's time)."""
    if not len(meta_ids):
        return np.zeros(flat.shape, bool)
    pos = np.clip(np.searchsorted(meta_ids, flat), 0, len(meta_ids) - 1)
    held = (flat >= 0) & (meta_ids[pos] == flat)
    rows = np.flatnonzero(held)
    if len(rows):
        t = meta.take(pa.array(pos[rows]))
        for f in HIT_FIELDS:
            out[f.hit_name][rows] = t.column(f.name).to_numpy(zero_copy_only=False)
    return held


class ShardSearcher:
    """Searches one shard; usable directly or as a Ray actor (`ray.remote(ShardSearcher)`)."""

    def __init__(self, memory_dir: str, entry: Dict[str, Any], metric: str = "ip", nprobe: int = 1,
                 omp_threads: Optional[int] = None, gpu: bool = False, mmap: bool = True, verify: bool = True,
                 rerank_k: int = 0):
        e = ShardEntry(**entry) if isinstance(entry, dict) else entry
        self.entry = e
        self.metric = metric
        self.nprobe = int(nprobe)
        self.rerank_k = int(rerank_k or 0)
        if omp_threads:
            faiss.omp_set_num_threads(int(omp_threads))
        self.index = read_index(storage.join(memory_dir, e.path), e.sha256 if verify else None, mmap=mmap)
        # One chunk per column: a search takes a few rows of it, and `take` over many chunks costs ~100 us.
        self.meta = read_meta(storage.join(memory_dir, e.meta_path), e.meta_sha256 if verify else None).combine_chunks()
        self.meta_ids = self.meta.column("id").to_numpy()
        self.vectors = None
        if e.vectors_path:
            self.vectors = open_vectors(storage.join(memory_dir, e.vectors_path), rows=len(self.meta_ids))
        if self.index.ntotal != e.count:
            raise IntegrityError(f"shard {storage.join(memory_dir, e.path)} holds {self.index.ntotal} vectors, "
                                 f"the manifest says {e.count}")
        from pipeline.index.train import to_gpu, use_gpu

        if use_gpu(gpu):
            self.index = to_gpu(self.index)
        self._excl_version = None
        self._excl = None  # (ids array, IDSelectorBatch, IDSelectorNot): kept alive together

    def ping(self) -> int:
        return int(self.index.ntotal)

    def _selector(self, exclude: Optional[ExcludeSet]):
        if exclude is None:
            return None
        if self._excl is None or self._excl_version != exclude.version:
            ids = exclude.ids
            if isinstance(ids, list) and len(ids) == 1 and type(ids[0]).__name__ == "ObjectRef":
                import ray

                ids = ray.get(ids[0])
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            batch = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
            self._excl = (ids, batch, faiss.IDSelectorNot(batch))
            self._excl_version = exclude.version
        return self._excl[2]

    @property
    def ivf(self) -> Optional[faiss.IndexIVF]:
        """The index as a plain IVF index (its coarse quantizer shared by every shard), else None (a
        pre-transform such as OPQ, HNSW, a GPU index)."""
        if not hasattr(self, "_ivf"):
            idx = faiss.downcast_index(self.index)
            self._ivf = idx if isinstance(idx, faiss.IndexIVF) else None
        return self._ivf

    def search(self, xq: np.ndarray, k: int, nprobe: Optional[int] = None,
               exclude: Optional[ExcludeSet] = None, rerank_k: Optional[int] = None,
               assign: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Neighbors:
        """Top-k of this shard: scores, external ids (-1 pad) and the hits' metadata, as `Neighbors`.

        `rerank_k` (default: the searcher's) > 0 on a shard with a re-rank file: the codes propose
        max(k, rerank_k) candidates and the exact top-k among them is returned, with exact scores.
        `assign` = (lists, distances) of `coarse_assign`: the probed lists, computed once for all shards
        (they share the trained quantizer), so each shard only scans its own part of them.
        """
        D, I = self.search_ids(xq, k, nprobe, exclude, rerank_k, assign)
        return Neighbors(D, I, **self.metadata(I)[1])

    def search_ids(self, xq: np.ndarray, k: int, nprobe: Optional[int] = None,
                   exclude: Optional[ExcludeSet] = None, rerank_k: Optional[int] = None,
                   assign: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Tuple[np.ndarray, np.ndarray]:
        """`search` without the metadata: (D, I) only (a router in this process gathers the metadata once,
        for the merged top-k)."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        params = faiss.SearchParametersIVF(nprobe=int(nprobe or self.nprobe))
        sel = self._selector(exclude)
        if sel is not None:
            params.sel = sel
        depth = int(self.rerank_k if rerank_k is None else rerank_k) if self.vectors is not None else 0
        width = max(int(k), depth)
        if assign is not None and self.ivf is not None:
            D, I = search_preassigned(self.ivf, xq, width, assign, params)
        else:
            D, I = self.index.search(xq, width, params=params)
        if depth > 0:
            D, I = rerank(xq, I, self.meta_ids, self.vectors, int(k), self.metric)
        return D, I

    def metadata(self, I: np.ndarray) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """(held, metadata) for the ids of `I` this shard holds: see `held_meta`."""
        return held_meta(self.meta, self.meta_ids, I)

    def fill_metadata(self, flat: np.ndarray, out: Dict[str, np.ndarray]) -> np.ndarray:
        """Fill `out` with the metadata of the ids of `flat` this shard holds: see `fill_meta`."""
        return fill_meta(self.meta, self.meta_ids, flat, out)

    def lookup(self, ids: Sequence[int]) -> Dict[str, np.ndarray]:
        """Metadata of `ids` held by this shard (label -1 / empty strings for ids it does not hold)."""
        I = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        return {k: v[0] for k, v in lookup_meta(self.meta, self.meta_ids, I).items()}


def coarse_assign(ivf: faiss.IndexIVF, xq: np.ndarray, nprobe: int) -> Tuple[np.ndarray, np.ndarray]:
    """The `nprobe` nearest inverted lists of each query (ids, distances) under an IVF index's quantizer."""
    Dq, Iq = ivf.quantizer.search(np.ascontiguousarray(xq, dtype=np.float32), int(nprobe))
    return Iq, Dq


def search_preassigned(ivf: faiss.IndexIVF, xq: np.ndarray, k: int, assign: Tuple[np.ndarray, np.ndarray],
                       params: faiss.SearchParametersIVF) -> Tuple[np.ndarray, np.ndarray]:
    """`ivf.search` with the probed lists given (`coarse_assign`), honouring `params` (nprobe, selector).

    Calls the C++ method directly: faiss's Python wrapper of it refuses search parameters."""
    Iq, Dq = (np.ascontiguousarray(a) for a in assign)
    n = xq.shape[0]
    D = np.empty((n, k), np.float32)
    I = np.empty((n, k), np.int64)
    ivf.search_preassigned_c(n, faiss.swig_ptr(xq), k, faiss.swig_ptr(Iq), faiss.swig_ptr(Dq), faiss.swig_ptr(D),
                             faiss.swig_ptr(I), False, params)
    return D, I


def index_ids(index: faiss.Index) -> np.ndarray:
    """Every external id a populated index stores (IVF inverted lists, or an IDMap's id map)."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is None:
        return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)
    inv = ivf.invlists
    out = []
    for lst in range(ivf.nlist):
        n = inv.list_size(lst)
        if n:
            ptr = inv.get_ids(lst)
            try:
                out.append(faiss.rev_swig_ptr(ptr, n).copy())
            finally:
                inv.release_ids(lst, ptr)
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


# ---------------------------------------------------------------- folders being written

WRITING = "_writing.json"


def mark_writing(memory_dir: str, folder: str) -> str:
    """Mark `shards/<folder>` as being written by this process (a build or compaction that has not committed
    yet), so that sweeps leave it alone; returns the marker's URL (remove it once committed)."""
    import socket
    import time as _time

    url = storage.join(memory_dir, "shards", folder, WRITING)
    storage.atomic_write_json(url, {"pid": os.getpid(), "host": socket.gethostname(), "at": _time.time()})
    return url


def being_written(memory_dir: str, folder: str, stale_s: float = 3600.0) -> bool:
    """Whether a live writer may still commit `shards/<folder>`: its marker names a running process on this
    host, or (another host) is younger than `stale_s`."""
    import socket
    import time as _time

    url = storage.join(memory_dir, "shards", folder, WRITING)
    try:
        m = storage.read_json(url)
    except (FileNotFoundError, ValueError):
        return False
    if m.get("host") == socket.gethostname():
        try:
            os.kill(int(m["pid"]), 0)
            return True
        except (ProcessLookupError, ValueError, KeyError):
            return False
        except PermissionError:
            return True
    return _time.time() - float(m.get("at", 0)) < stale_s

"""Embedding Parquet parts: the schema every stage agrees on, and readers/writers for it.

A part holds rows of (id, key, label, label_name, source, shard, embedding). `embedding` is an Arrow
fixed-size list of float32, so a part maps straight to an (n, dim) numpy array without copies per row.
"""
from __future__ import annotations

import io
from typing import Dict, Iterator, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.items import META_COLUMNS, META_SCHEMA
from pipeline.errors import DataError, NotFound

PART_PREFIX = "part-"
MANIFEST_NAME = "_manifest.json"


def schema(dim: int) -> pa.Schema:
    """A part's schema: the item's id and metadata (`pipeline.data.items`), then its embedding."""
    return META_SCHEMA.append(pa.field("embedding", pa.list_(pa.float32(), dim)))


def check_vectors(x: np.ndarray, dim: Optional[int] = None, what: str = "embeddings") -> np.ndarray:
    """Return `x` as C-contiguous float32 (n, d); refuse non-numbers, wrong shapes, wrong dimension and NaN/inf.

    A 1-d array is taken as one vector. Integers are converted (callers that read user files say so: see
    pipeline.commands.inputs); booleans, strings, complex numbers and Python objects (ragged lists) are refused
    rather than cast, which would fail with a numpy traceback or silently drop the imaginary part."""
    try:
        x = np.asarray(x)
    except ValueError as e:  # ragged nested lists on numpy >= 1.24
        raise DataError(f"{what} must be an (n, dim) array of numbers: {e}") from None
    if x.dtype.kind not in "fiu":
        raise DataError(f"{what} must be numbers (float or integer), got values of dtype {x.dtype}")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise DataError(f"{what} must be a 2-D array (n, dim), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise DataError(f"{what} have dimension {x.shape[1]}, but this memory expects {dim}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise DataError(f"{what} contain NaN or infinite values in {int(bad.sum())} row(s), first at row "
                        f"{int(np.flatnonzero(bad)[0])}; refusing to store or search them")
    return x


def to_table(meta: Dict[str, List], embeddings: np.ndarray) -> pa.Table:
    """Build a part table from metadata columns (META_COLUMNS) and an (n, dim) float32 array."""
    x = check_vectors(embeddings)
    n, dim = x.shape
    for c in META_COLUMNS:
        if len(meta[c]) != n:
            raise DataError(f"column {c!r} has {len(meta[c])} values for {n} embeddings")
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), dim)
    cols = [pa.array(meta[c], type=schema(dim).field(c).type) for c in META_COLUMNS]
    return pa.Table.from_arrays(cols + [emb], schema=schema(dim))


def embeddings_of(table: pa.Table) -> np.ndarray:
    """The (n, dim) float32 matrix of a part table (zero-copy where Arrow allows)."""
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def write_part(table: pa.Table, url: str) -> None:
    """Write one part atomically (a reader never sees half a Parquet file under its final name)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.atomic_write_bytes(url, buf.getvalue())


def part_urls(dir_url: str) -> List[str]:
    return [storage.join(dir_url, n) for n in storage.listdir(dir_url)
            if n.startswith(PART_PREFIX) and n.endswith(".parquet")]


def read_part(url: str, columns: Optional[List[str]] = None) -> pa.Table:
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def read_embeddings(dir_url: str, columns: Optional[List[str]] = None) -> pa.Table:
    """All parts under `dir_url` as one table (sorted by part name, so the order is deterministic)."""
    urls = part_urls(dir_url)
    if not urls:
        raise NotFound(f"no embedding parts under {dir_url}: run `vmem embed` first")
    return pa.concat_tables([read_part(u, columns) for u in urls])


def iter_embedding_batches(dir_url: str, batch_rows: int = 65536,
                           columns: Optional[List[str]] = None) -> Iterator[pa.Table]:
    """Stream the parts under `dir_url` in tables of at most `batch_rows` rows."""
    for url in part_urls(dir_url):
        table = read_part(url, columns)
        for start in range(0, table.num_rows, batch_rows):
            yield table.slice(start, batch_rows)

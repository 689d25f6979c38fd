"""The re-rank stage: compressed codes propose candidates, exact similarities from vectors on disk decide.

Each shard may carry `shard-SSS.vectors.npy`: its items' vectors (float32 or float16, `index.rerank_dtype`),
one row per row of the shard's metadata file, i.e. aligned to the SORTED id array, so an id's row is a
binary search. Searchers open it with `np.load(mmap_mode="r")`: the file lives on disk (page cache), not in
the searcher's heap, so RAM per item stays code + id.

`rerank(xq, I, ids, vectors, k)` takes the (nq, c) candidate ids a faiss search returned and keeps the exact
top-k among them. Its only approximation is which candidates the codes proposed (plus float16 rounding of
the stored vectors, ~1e-3 on unit vectors), so recall grows with the number of candidates. float32 files are
scored by faiss in C++ (`fvec_inner_products_by_idx` over the mapped rows); float16 files by numpy (half the
disk, several times slower to score: numpy widens float16 element by element).
"""
from __future__ import annotations

import io
from typing import Tuple

import numpy as np

from pipeline.errors import UserError

RERANK_DTYPES = ("float16", "float32")
_ROWS_PER_CHUNK = 1 << 16  # candidate rows gathered at once: bounds the temporary (rows x d float32)


def vectors_bytes(xb: np.ndarray, dtype: str = "float32") -> bytes:
    """The .npy bytes of a shard's re-rank file: `xb` (n, d) rows (already aligned to the sorted ids)."""
    if dtype not in RERANK_DTYPES:
        raise UserError(f"index.rerank_dtype={dtype!r} is not supported: choose one of {', '.join(RERANK_DTYPES)}")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(xb, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def dtype_bytes(dtype: str) -> int:
    """Bytes per stored component of a re-rank file of `dtype`."""
    return int(np.dtype(dtype).itemsize)


def aligned(ids: np.ndarray, xb: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Rows of `xb` (one per id of `ids`) reordered to follow `sorted_ids` (every one must be in `ids`)."""
    order = np.argsort(ids, kind="stable")
    pos = order[np.searchsorted(ids, sorted_ids, sorter=order)]
    assert np.array_equal(np.asarray(ids)[pos], sorted_ids), "every id of the shard needs a vector"
    return xb[pos]


def _scores_faiss(xq: np.ndarray, P: np.ndarray, vectors: np.ndarray, metric: str) -> np.ndarray:
    """(nq, c) similarities of each query to the float32 rows P (-1 = none) of `vectors`, computed by faiss
    (C++, rows read straight from the memory-mapped file)."""
    import faiss

    nq, c = P.shape
    S = np.empty((nq, c), dtype=np.float32)
    fn = faiss.fvec_inner_products_by_idx if metric == "ip" else faiss.fvec_L2sqr_by_idx
    fn(faiss.swig_ptr(S), faiss.swig_ptr(xq), faiss.swig_ptr(vectors), faiss.swig_ptr(P), xq.shape[1], nq, c)
    return S


def _scores_numpy(xq: np.ndarray, P: np.ndarray, vectors: np.ndarray, metric: str) -> np.ndarray:
    """Same as `_scores_faiss` for any stored dtype (float16): rows gathered and widened by numpy, in chunks."""
    nq, c = P.shape
    S = np.empty((nq, c), dtype=np.float32)
    step = max(1, _ROWS_PER_CHUNK // max(c, 1))
    for q0 in range(0, nq, step):
        q1 = min(nq, q0 + step)
        rows = np.asarray(vectors[np.maximum(P[q0:q1], 0).ravel()], dtype=np.float32).reshape(q1 - q0, c, -1)
        q = xq[q0:q1]
        if metric == "ip":
            S[q0:q1] = np.einsum("bcd,bd->bc", rows, q)
        else:
            diff = rows - q[:, None, :]
            S[q0:q1] = np.einsum("bcd,bcd->bc", diff, diff)
    return S


def rerank(xq: np.ndarray, I: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int,
           metric: str = "ip") -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k (D, I) of each query among its candidate ids `I` (nq, c) (-1 = none).

    `ids` is sorted and `vectors[j]` is the vector of `ids[j]`; candidates not in `ids` are dropped. Rows
    come back best first (inner product: largest; l2: smallest squared distance), padded with -1.
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    I = np.asarray(I, dtype=np.int64)
    nq, c = I.shape
    k = int(k)
    worst = -np.inf if metric == "ip" else np.inf
    if nq == 0 or c == 0 or len(ids) == 0:
        return np.full((nq, k), worst, np.float32), np.full((nq, k), -1, np.int64)
    pos = np.clip(np.searchsorted(ids, I), 0, len(ids) - 1)
    ok = (I >= 0) & (ids[pos] == I)
    P = np.ascontiguousarray(np.where(ok, pos, -1), dtype=np.int64)
    fast = vectors.dtype == np.float32 and vectors.flags["C_CONTIGUOUS"]
    S = (_scores_faiss if fast else _scores_numpy)(xq, P, vectors, metric)
    S = np.where(ok, S, worst).astype(np.float32)
    order = np.argsort(-S if metric == "ip" else S, axis=1, kind="stable")[:, :k]
    D = np.take_along_axis(S, order, 1)
    Iout = np.where(np.take_along_axis(ok, order, 1), np.take_along_axis(I, order, 1), -1)
    if order.shape[1] < k:  # fewer candidates than k: pad
        D = np.pad(D, ((0, 0), (0, k - order.shape[1])), constant_values=worst)
        Iout = np.pad(Iout, ((0, 0), (0, k - order.shape[1])), constant_values=-1)
    return D, Iout

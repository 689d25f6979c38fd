"""The delta's exact search against brute force: random chunk sizes (as the LSM merging leaves them), random
deleted rows, queries with fewer live rows than k. Pure numpy on both sides, no shortcuts shared."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.memory.delta import DeltaChunk, DeltaView, _push


def chunk(rng, n, dim, start):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(start, start + n, dtype=np.int64) * 7 + 3
    meta = {"labels": ids % 5, "label_names": np.array([f"c{i % 5}" for i in ids], object),
            "keys": np.array([f"k{i}" for i in ids], object), "sources": np.array(["api"] * n, object)}
    return DeltaChunk(ids, x, meta)


@pytest.mark.parametrize("seed", range(6))
def test_delta_search_equals_brute_force_with_deleted_rows(seed):
    rng = np.random.default_rng(seed)
    dim, chunks, start = 12, (), 0
    for n in rng.integers(1, 40, size=int(rng.integers(1, 12))):
        chunks = _push(chunks, chunk(rng, int(n), dim, start))
        start += int(n)
    view = DeltaView(dim, 1, chunks)
    ids, xb = view.vectors()
    assert len(ids) == start and len(chunks) <= 2 * int(np.log2(start) + 2)  # merged like an LSM tree
    dead_ids = np.sort(rng.choice(ids, size=int(rng.integers(0, len(ids))), replace=False))
    xq = rng.standard_normal((7, dim)).astype(np.float32)
    k = int(rng.integers(1, len(ids) + 5))
    got = view.search(xq, k, view.dead_rows(dead_ids))
    live = ~np.isin(ids, dead_ids)
    S = xq @ xb[live].T
    for q in range(len(xq)):
        want = ids[live][np.argsort(-S[q], kind="stable")][:k]
        row = got.I[q][got.I[q] >= 0]
        assert len(row) == min(k, int(live.sum()))
        np.testing.assert_allclose(np.sort(S[q])[::-1][:len(row)], got.D[q][:len(row)], rtol=1e-5)
        assert set(row) == set(want) or np.allclose(  # ties may order differently
            np.sort(xq[q] @ xb[np.isin(ids, row)].T), np.sort(xq[q] @ xb[np.isin(ids, want)].T), rtol=1e-5)
        assert not np.isin(row, dead_ids).any()
        assert (got.labels[q][: len(row)] == row % 5).all()

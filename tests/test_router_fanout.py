"""In-process fan-out: shards on this node are searched on threads with the probed lists found once (they share
the trained quantizer), and the merged answer equals one IVF index holding every vector — with and without
deleted ids excluded, one query or a batch. Real faiss indexes written and read as the memory does."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from pipeline.index import train as itrain
from pipeline.index.router import Router
from pipeline.index.shard import ExcludeSet
from pipeline.memory.synthetic import build_synthetic_memory, make_clusters


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    data = make_clusters(6000, dim=24, seed=4, num_classes=8)
    d = str(tmp_path_factory.mktemp("fanout"))
    build_synthetic_memory(d, data, num_shards=4, index_key="IVF32,SQ8", nprobe=6)
    return d, data


def one_index(memory_dir, data):
    """The peer: one index from the same trained quantizer holding every vector."""
    from pipeline.index.manifest import ManifestStore
    from pipeline.index.shard import read_index

    store = ManifestStore(memory_dir)
    m = store.load()
    single = read_index(store.url(m.trained_path), m.trained_sha256, mmap=False)
    itrain.add_vectors(single, data.xb, data.ids)
    return single, m.nprobe


@pytest.mark.parametrize("nq", [1, 5, 200])
def test_four_shards_on_threads_answer_like_one_index(sharded, nq):
    memory_dir, data = sharded
    router = Router(memory_dir, use_ray=False, mmap=False)
    assert router._ivf is not None and router._pool is not None  # the fast path is the one under test
    rng = np.random.default_rng(nq)
    xq = data.xb[rng.choice(len(data.xb), nq, replace=False)] + rng.normal(0, 0.05, (nq, 24)).astype(np.float32)
    dead = data.ids[rng.choice(len(data.ids), 300, replace=False)]
    single, nprobe = one_index(memory_dir, data)
    for exclude in (None, dead):
        got = router.search(xq, 10, exclude=None if exclude is None else ExcludeSet(("t", 1), exclude))
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if exclude is not None:
            batch = faiss.IDSelectorBatch(len(exclude), faiss.swig_ptr(exclude))  # params.sel points into it
            params.sel = not_batch = faiss.IDSelectorNot(batch)  # noqa: F841 (kept alive for the search)
        D, I = single.search(np.ascontiguousarray(xq), 10, params=params)
        np.testing.assert_array_equal(got.I, I)
        np.testing.assert_allclose(got.D, D, rtol=1e-5, atol=1e-6)
        if exclude is not None:
            assert not np.isin(got.I, exclude).any()
        label_of = dict(zip(data.ids.tolist(), data.labels.tolist()))
        assert got.labels.tolist() == [[label_of[int(i)] for i in row] for row in got.I]
    router.close()


def test_shards_with_different_quantizers_are_searched_one_by_one(tmp_path):
    """A memory assembled from two trainings: no shared quantizer, so no preassignment (and still exact)."""
    from pipeline.index.router import shared_quantizer
    from pipeline.index.shard import ShardSearcher

    a, b = make_clusters(2000, dim=16, seed=1), make_clusters(2000, dim=16, seed=2)
    build_synthetic_memory(str(tmp_path / "a"), a, num_shards=2, index_key="IVF16,Flat", nprobe=4)
    build_synthetic_memory(str(tmp_path / "b"), b, num_shards=2, index_key="IVF16,Flat", nprobe=4)
    ra, rb = Router(str(tmp_path / "a"), use_ray=False), Router(str(tmp_path / "b"), use_ray=False)
    assert shared_quantizer(ra.searchers) is not None
    assert shared_quantizer([ra.searchers[0], rb.searchers[1]]) is None
    assert isinstance(ra.searchers[0], ShardSearcher)

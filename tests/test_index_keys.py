"""The newer faiss codes in the index choice (multi-bit RaBitQ, RaBitQ fast-scan, PQ fast-scan) on real data.

Each new key goes through what a memory does with a shard: train on a sample, add under external ids, search
(plain, with preassigned lists, with an exclusion selector), serialize / memory-mapped read, `remove_ids` (the
compaction step), and reaches its recall with the re-rank stage. The measured choice is checked against an
independent re-measurement and against the recall-first rule. Real faiss throughout, clustered vectors from
`pipeline.memory.synthetic.make_clusters`.
"""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from pipeline.index.keys import (ID_BYTES, candidate_keys, choose_index, family_of, key_cost, measure_candidates,
                                 pick)
from pipeline.index.rerank import rerank
from pipeline.index.shard import coarse_assign, index_ids, read_index, search_preassigned
from pipeline.index.train import autofaiss_can_build, serialize, train_index
from pipeline.memory.synthetic import make_clusters

D = 64
NEW_KEYS = ["IVF32,RaBitQ", "IVF32,RaBitQ4", "IVF32,RaBitQ8", "IVF32,RaBitQfs4", "IVF32,PQ32x4fs"]


def test_faiss_is_a_version_with_the_new_codes():
    major, minor = (int(p) for p in faiss.__version__.split(".")[:2])
    assert (major, minor) >= (1, 15), faiss.__version__
    assert type(faiss.index_factory(D, "IVF8,RaBitQ4")).__name__ == "IndexIVFRaBitQ"
    assert type(faiss.index_factory(D, "IVF8,RaBitQfs4")).__name__ == "IndexIVFRaBitQFastScan"
    with pytest.raises(RuntimeError):  # no IVF scalar-quantizer fast-scan in this faiss (see keys.py docstring)
        faiss.index_factory(D, "IVF8,SQ8fs")


@pytest.fixture(scope="module")
def data():
    s = make_clusters(6300, D, num_classes=40, spread=0.9, seed=3)
    xb, ids, xq = s.xb[:6000], s.ids[:6000], s.xb[6000:]
    order = np.argsort(ids)
    gt = ids[faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]]
    return xb, ids, xq, gt, ids[order], xb[order]


def recall10(I, gt):
    return float(np.mean([len(np.intersect1d(a[a >= 0], b)) for a, b in zip(I, gt)]) / 10)


@pytest.mark.parametrize("key", NEW_KEYS)
def test_new_key_lives_through_a_shards_life(key, data, tmp_path):
    xb, ids, xq, gt, sorted_ids, sorted_xb = data
    trained, trainer = train_index(xb[:3000], key, "ip", prefer_autofaiss=True)
    assert trainer == "faiss" and trained.ntotal == 0 and trained.is_trained
    index = faiss.clone_index(trained)
    index.add_with_ids(xb, ids)
    ivf = faiss.extract_index_ivf(index)
    params = faiss.SearchParametersIVF(nprobe=ivf.nlist)
    Dp, I = index.search(xq, 10, params=params)
    assert np.isin(I[I >= 0], ids).all() and (I >= 0).all()
    assert np.array_equal(np.sort(index_ids(index)), np.sort(ids))  # erasure checks read the inverted lists

    # the router's path: lists probed once for all shards, then searched per shard
    Ia = search_preassigned(ivf, np.ascontiguousarray(xq), 10, coarse_assign(ivf, xq, 8),
                            faiss.SearchParametersIVF(nprobe=8))[1]
    assert np.array_equal(Ia, index.search(xq, 10, params=faiss.SearchParametersIVF(nprobe=8))[1])

    # the exclusion selector the searchers use for pending deletes
    drop = np.ascontiguousarray(np.unique(I[:, :3]))
    sel = faiss.SearchParametersIVF(nprobe=ivf.nlist)
    batch = faiss.IDSelectorBatch(len(drop), faiss.swig_ptr(drop))
    sel.sel = faiss.IDSelectorNot(batch)
    Is = index.search(xq, 10, params=sel)[1]
    assert not np.isin(Is, drop).any() and (Is >= 0).all()

    # serialize -> file -> memory-mapped read: same answers
    path = tmp_path / "shard.index"
    path.write_bytes(serialize(index))
    again = read_index(str(path), mmap=True)
    np.testing.assert_array_equal(again.search(xq, 10, params=params)[1], I)

    # compaction: remove_ids drops exactly those ids; searches never return them
    gone = np.ascontiguousarray(ids[::7])
    assert index.remove_ids(faiss.IDSelectorBatch(len(gone), faiss.swig_ptr(gone))) == len(gone)
    assert index.ntotal == len(ids) - len(gone)
    I2 = index.search(xq, 10, params=params)[1]
    assert not np.isin(I2, gone).any()
    assert np.array_equal(np.sort(index_ids(index)), np.sort(np.setdiff1d(ids, gone)))

    # recall: the codes propose 100 candidates, exact similarities decide (the memory's re-rank stage)
    Ic = again.search(xq, 100, params=params)[1]
    _, Ir = rerank(xq, Ic, sorted_ids, sorted_xb, 10)
    assert recall10(Ir, gt) >= 0.95, (key, recall10(Ir, gt))
    if key in ("IVF32,RaBitQ8",):  # 8 bits per dimension: the codes alone reach it (measured 0.98-0.99 here)
        assert recall10(I, gt) >= 0.95, recall10(I, gt)


def test_more_rabitq_bits_more_recall(data):
    xb, ids, xq, gt, _, _ = data
    got = {}
    for b in ("", "2", "4", "8"):
        idx, _ = train_index(xb[:3000], f"IVF32,RaBitQ{b}", "ip")
        idx.add_with_ids(xb, ids)
        got[b or "1"] = recall10(idx.search(xq, 10, params=faiss.SearchParametersIVF(nprobe=32))[1], gt)
    assert got["1"] < got["2"] < got["4"] < got["8"], got
    sizes = [key_cost(f"IVF32,RaBitQ{b}", D).code_size for b in ("", "2", "4", "8")]
    assert sizes == sorted(sizes) and sizes[0] < D // 8 + 16  # 1 bit per dimension + a few factors


def test_opq_for_inner_product_is_trained_by_faiss_with_an_inner_product_quantizer(data):
    xb = data[0]
    assert not autofaiss_can_build("OPQ8_32,IVF16,PQ8x8", "ip")  # autofaiss 2.18's OPQ path fails on faiss>=1.14
    assert autofaiss_can_build("IVF16,Flat", "ip") and autofaiss_can_build("OPQ8_32,IVF16,PQ8x8", "l2")
    assert not autofaiss_can_build("IVF16,RaBitQ4", "l2")  # no autofaiss memory heuristics for these
    index, trainer = train_index(xb[:500], "OPQ4_32,IVF8,PQ4x4", "ip")
    assert trainer == "faiss" and isinstance(index, faiss.IndexPreTransform)
    ivf = faiss.extract_index_ivf(index)
    assert ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    assert ivf.quantizer.metric_type == faiss.METRIC_INNER_PRODUCT


@pytest.mark.parametrize("n,d,bpi", [(1_000_000, 256, 48), (1_000_000, 256, 300), (200_000, 128, 40),
                                     (50_000, 64, 20)])
def test_candidates_fit_the_budget_one_per_family(n, d, bpi):
    keys = candidate_keys(n, d, n * bpi, train_n=100_000)
    fams = [family_of(k) for k in keys]
    assert len(fams) == len(set(fams)) and keys
    for k in keys:
        assert key_cost(k, d).bytes_per_item <= bpi, k
        assert key_cost(k, d).nlist == key_cost(keys[0], d).nlist  # one list count: the codes are compared
    if bpi >= d + ID_BYTES:
        assert "sq8" in fams and "pq" not in fams
    else:
        assert "sq8" not in fams and "pq" in fams
    assert "pq4fs" in fams
    one_bit_fits = key_cost("IVF16,RaBitQ", d).bytes_per_item <= bpi  # 1 bit per dimension + its factors
    assert ("rabitq" in fams) == ("rabitq-fs" in fams) == one_bit_fits
    if one_bit_fits:  # the largest RaBitQ that fits: one more bit would not
        rb = next(k for k in keys if family_of(k) == "rabitq")
        bits = int(rb.rsplit("RaBitQ", 1)[1] or 1)
        if bits < 9:
            assert key_cost(rb.replace(rb.rsplit(",", 1)[1], f"RaBitQ{bits + 1}"), d).bytes_per_item > bpi
    assert not any("RaBitQ" in k for k in candidate_keys(n, d, n * bpi, train_n=100_000, gpu=True))


def test_pick_is_recall_first_then_cheapest():
    rows = [{"key": "a", "reached": True, "recall": 0.96, "ms_per_query": 0.5, "bytes_per_item": 40},
            {"key": "b", "reached": True, "recall": 0.99, "ms_per_query": 0.2, "bytes_per_item": 80},
            {"key": "c", "reached": False, "recall": 0.94, "ms_per_query": 0.01, "bytes_per_item": 20},
            {"key": "d", "reached": True, "recall": 0.97, "ms_per_query": 0.2, "bytes_per_item": 48}]
    assert pick(rows)["key"] == "d"  # fastest among those reaching the target; fewer bytes on a tie
    none = [dict(r, reached=False) for r in rows]
    assert pick(none)["key"] == "b"  # nobody reaches it: the best recall, whatever it costs


def test_measured_choice_reaches_the_target_on_a_fresh_measurement():
    s = make_clusters(9000, D, num_classes=30, spread=0.9, seed=5)
    # a 1M-item memory at 80 B/item: SQ8, RaBitQ, RaBitQ fast-scan, PQ fast-scan (no Flat; no PQ x8, whose
    # codebook training would dominate this test's time on a shared 2-core machine)
    n, budget = 1_000_000, 1_000_000 * 80
    calls = []

    def sample():
        calls.append(1)
        return s.xb

    c = choose_index(None, n, D, budget, max_latency_ms=1.0, train_n=100_000, sample=sample, target=0.9, K=10,
                     scan_ms=1e-5)
    assert calls == [1] and c.kind == "measured" and c.measured
    assert {r["key"] for r in c.measured} == set(candidate_keys(n, D, budget, train_n=100_000))
    best = next(r for r in c.measured if r["key"] == c.key)
    reached = [r for r in c.measured if r["reached"]]
    assert best["reached"] and all(best["ms_per_query"] <= r["ms_per_query"] for r in reached)
    assert key_cost(c.key, D).bytes_per_item <= 80
    # re-measure the winner independently (own split, own exact search) at the setting it was chosen at
    rng = np.random.default_rng(11)
    order = rng.permutation(len(s.xb))
    xq, xb = s.xb[order[:200]], s.xb[order[200:]]
    key = c.key.replace(c.key.split(",")[0], f"IVF{best['sample_nlist']}")
    idx = faiss.index_factory(D, key, faiss.METRIC_INNER_PRODUCT)
    idx.train(xb)
    idx.add_with_ids(xb, np.arange(len(xb)))
    depth = best["rerank_k"]
    I = idx.search(xq, max(10, depth), params=faiss.SearchParametersIVF(nprobe=best["nprobe"]))[1]
    if depth:
        I = rerank(xq, I, np.arange(len(xb)), xb, 10)[1]
    gt = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]
    assert recall10(I[:, :10], gt) >= 0.9 - 0.03  # another split of the sample: within a few queries' noise
    assert c.rerank == (depth > 0 or best["plain_recall"] < 0.9 + 0.02)


def test_no_sample_or_one_candidate_keeps_the_static_rule():
    s = make_clusters(500, D, seed=1)
    called = []
    c = choose_index(None, 1000, D, 256 * 2**20, 50, sample=lambda: called.append(1) or s.xb, scan_ms=1e-6)
    assert c.key == "IVF1,Flat" and not called  # a scan fits: one list, nothing measured, nothing read
    c = choose_index(None, 1_000_000, D, 1_000_000 * 60, 1.0, train_n=100_000, scan_ms=1e-5)
    assert c.kind == "ivf"  # no sample: the static rule
    c = choose_index(None, 1_000_000, D, 1_000_000 * 80, 1.0, train_n=100_000, sample=s.xb[:50], scan_ms=1e-5)
    assert c.kind == "ivf" and c.key.endswith(",SQ8")  # a sample too small to measure: the static rule


def test_measure_candidates_rejects_a_tiny_sample():
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="sample"):
        measure_candidates(np.zeros((10, D), np.float32), ["IVF4,Flat"], 10, 0.9)

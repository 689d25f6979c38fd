"""Pure pieces of the index layer: units, key rule, plan, merge_topk, exact_knn, manifest store (local + S3)."""
from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest

from pipeline.errors import IntegrityError, NotFound, UserError
from pipeline.index.keys import is_ivf, key_cost, resolve_index_key
from pipeline.index.manifest import Manifest, ManifestStore, ShardEntry
from pipeline.index.plan import plan_memory
from pipeline.index.recall import choose_nprobe, exact_knn, recall_at
from pipeline.index.neighbors import merge_topk
from pipeline.index.units import format_bytes, parse_bytes, parse_count


def test_units_parse_in_one_place():
    assert parse_bytes("64MiB") == 64 * 2**20 and parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("2G") == 2 * 2**30 and parse_bytes("1e9") == 10**9 and parse_bytes("1.5KB") == 1500
    assert parse_count("1e9") == 10**9 and parse_count("5M") == 5_000_000 and parse_count(1000) == 1000
    assert format_bytes(1.5 * 2**30) == "1.5 GiB"
    with pytest.raises(UserError, match="64MiB"):
        parse_bytes("lots")


def test_key_rule_forces_ivf_and_follows_the_budget():
    # HNSW (autofaiss's answer for small data and big budgets) becomes IVF; the code follows bytes per item
    assert resolve_index_key("HNSW32", 5000, 64, 256 * 2**20, train_n=5000).endswith(",Flat")
    assert resolve_index_key("OPQ256_1536,IVF512,PQ256x8", 20000, 1280, 64 * 2**20) == "IVF512,SQ8"
    assert resolve_index_key("OPQ32_224,IVF16384_HNSW32,PQ32x8", 5_000_000, 256, 5_000_000 * 48,
                             train_n=200_000) == "OPQ32_224,IVF5128_HNSW32,PQ32x8"  # nlist capped by the sample
    key = resolve_index_key("HNSW15", 100_000, 64, 100_000 * 30)
    assert key.startswith("IVF") and key.endswith("PQ16x8")  # 16 + 8 <= 30 bytes
    assert resolve_index_key(None, 10, 8, 10, explicit_key="IVF4,PQ2x4") == "IVF4,PQ2x4"
    with pytest.raises(UserError, match="not an IVF"):
        resolve_index_key(None, 10, 8, 10, explicit_key="HNSW32")
    assert is_ivf("OPQ16_64,IVF256_HNSW32,PQ16x8") and not is_ivf("HNSW32")
    c = key_cost("IVF256,PQ16x8", 64)
    assert (c.code_size, c.bytes_per_item, c.nlist) == (16, 24, 256)


def test_plan_formula():
    p = plan_memory("1e9", 1024, "256GiB", index_key="IVF65536,PQ64x8")
    assert p.bytes_per_item == 72 and p.total_bytes == 72 * 10**9 + p.fixed_bytes
    assert p.nodes == 1 and p.num_shards == 1
    small = plan_memory("1e9", 1024, "32GiB", index_key="IVF65536,PQ64x8", num_shards=2)
    assert small.nodes == 3 and small.num_shards == 3  # 72 GB / (0.75 * 32 GiB) -> 3 nodes
    assert small.bytes_per_shard <= 0.75 * 32 * 2**30
    auto = plan_memory("1e9", 1024, "256GiB")
    assert "IVF" in auto.index_key and auto.bytes_per_item <= 1024 // 8 + 8
    assert "nodes" in auto.table()


def brute_topk(D, I, k, keep_max):
    order = np.argsort(-D if keep_max else D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


@pytest.mark.parametrize("keep_max", [True, False])
def test_merge_topk_matches_brute_force(keep_max):
    rng = np.random.default_rng(0)
    Ds, Is = [], []
    for s in range(3):  # each shard's rows sorted best first, as faiss returns them
        D = np.sort(rng.random((7, 5)).astype(np.float32), axis=1)
        Ds.append(D[:, ::-1].copy() if keep_max else D)
        Is.append(rng.permutation(1000)[:35].reshape(7, 5).astype(np.int64) + 1000 * s)
    D, I = merge_topk(Ds, Is, 6, keep_max=keep_max)
    Dref, Iref = brute_topk(np.concatenate(Ds, 1), np.concatenate(Is, 1), 6, keep_max)
    np.testing.assert_array_equal(I, Iref)
    np.testing.assert_allclose(D, Dref)
    # shards that returned fewer than k results pad with -1 and never displace real hits
    D2, I2 = merge_topk([Ds[0][:, :2], Ds[1][:, :1]], [Is[0][:, :2], Is[1][:, :1]], 5, keep_max=keep_max)
    assert (I2[:, 3:] == -1).all() and (I2[:, :3] >= 0).all()


def test_exact_knn_in_chunks_equals_flat():
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((1000, 16)).astype(np.float32)
    xq = rng.standard_normal((9, 16)).astype(np.float32)
    ids = np.arange(1000, dtype=np.int64) * 3 + 5
    chunks = [(xb[i:i + 300], ids[i:i + 300]) for i in range(0, 1000, 300)]
    D, I = exact_knn(xq, chunks, 10)
    Dref, Iref = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_array_equal(I, ids[Iref])
    assert recall_at(I, ids[Iref], 10) == 1.0 and recall_at(I[:, ::-1] * 0 - 1, ids[Iref], 10) == 0.0


def test_choose_nprobe_prefers_smallest_in_budget(caplog):
    rows = [{"nprobe": 1, "recall@10": 0.8, "p50_ms": 1}, {"nprobe": 2, "recall@10": 0.96, "p50_ms": 2},
            {"nprobe": 4, "recall@10": 0.99, "p50_ms": 80}]
    assert choose_nprobe(rows, 0.95, 50) == 2
    with caplog.at_level(logging.WARNING):
        assert choose_nprobe(rows, 0.99, 50) == 2  # 0.99 only beyond the latency limit: best in budget
    assert "cap" in caplog.text


def sample_manifest() -> Manifest:
    return Manifest(version=0, shards=[ShardEntry(0, "shards/v000001/shard-000.index",
                                                  "shards/v000001/shard-000.meta.parquet", 10, "a" * 64, "b" * 64)],
                    index_key="IVF4,Flat", dim=8, metric="ip", trained_path="trained/x.index",
                    trained_sha256="c" * 64, nprobe=2, build={"split": "train"})


def check_store(url: str):
    store = ManifestStore(url)
    with pytest.raises(NotFound, match="vmem build"):
        store.load()
    assert store.commit(sample_manifest()) == 1
    m2 = store.load().next_version(nprobe=3)
    assert store.commit(m2) == 2 and store.versions() == [1, 2] and store.current_version() == 2
    loaded = store.load()
    assert loaded.parent == 1 and loaded.nprobe == 3 and loaded.build == {"split": "train"}
    assert store.load(1).nprobe == 2 and store.load(1).shards[0].count == 10
    with pytest.raises(UserError, match="committed by another writer"):
        m3 = store.load(1)
        store.commit(m3)
    with pytest.raises(NotFound, match="versions"):
        store.load(7)


def test_manifest_store_local(tmp_path):
    check_store(str(tmp_path / "memory"))
    d = sample_manifest().to_dict()
    d["future_field"] = 1
    assert Manifest.from_dict(d).to_dict()["future_field"] == 1  # newer writers' keys survive a round trip
    (tmp_path / "memory" / "CURRENT").write_text("garbage")
    with pytest.raises(IntegrityError, match="CURRENT"):
        ManifestStore(str(tmp_path / "memory")).load()


def test_manifest_store_s3(s3_server):
    check_store("s3://vmem-test/index-manifest-test/memory")


def test_gpu_request_without_gpu_warns_and_uses_cpu(caplog):
    from pipeline.index.train import use_gpu

    with caplog.at_level(logging.WARNING):
        assert use_gpu(True) is (faiss.get_num_gpus() > 0)
    if faiss.get_num_gpus() == 0:
        assert "using CPU" in caplog.text
    assert use_gpu(False) is False

"""Build -> manifest -> router on a small synthetic memory (5k x 64, clustered), real Ray + faiss + autofaiss."""
from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.embed.parts import to_table, write_part
from pipeline.errors import IntegrityError, NotFound, UserError
from pipeline.index.build import build_index
from pipeline.index.manifest import ManifestStore
from pipeline.index.router import ExcludeSet, Router
from pipeline.index.shard import read_index
from pipeline.storage import join

N, DIM, NQ = 5000, 64, 50


def clustered(n: int, dim: int, seed: int, centers: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings(emb_dir: str, x: np.ndarray, id_offset: int = 1000, parts: int = 3) -> np.ndarray:
    ids = np.arange(len(x), dtype=np.int64) * 7919 + id_offset  # sparse, non-positional external ids
    for p, rows in enumerate(np.array_split(np.arange(len(x)), parts)):
        meta = {"id": ids[rows].tolist(), "key": [f"k{i}" for i in ids[rows]],
                "label": (ids[rows] % 10).tolist(), "label_name": [f"class{i % 10}" for i in ids[rows]],
                "source": ["synthetic"] * len(rows), "shard": ["none.tar"] * len(rows)}
        write_part(to_table(meta, x[rows]), join(emb_dir, f"part-{p:05d}.parquet"))
    with open(os.path.join(emb_dir, "_manifest.json"), "w") as f:
        json.dump({"encoder": {"name": "synthetic", "image_size": 8, "preprocessing": {"mean": 0.5}},
                   "dim": x.shape[1]}, f)
    return ids


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_session):
    work = tmp_path_factory.mktemp("idx")
    overrides = [f"workdir={work}", "index.num_shards=3", "index.recall_queries=100",
                 "index.max_index_memory=256MiB", "ray.num_cpus=2"]
    cfg = load_config(None, overrides)
    cfg.overrides = overrides  # for the CLI tests
    x = clustered(N, DIM, 0)
    os.makedirs(cfg.embeddings_dir("train"))
    ids = write_embeddings(cfg.embeddings_dir("train"), x)
    manifest = build_index(cfg, "train")
    return cfg, manifest, x, ids


def single_index(cfg, manifest, x, ids):
    """One IVF index with the memory's trained quantizer holding every vector: the reference for the router."""
    store = ManifestStore(cfg.memory_dir)
    index = read_index(store.url(manifest.trained_path), manifest.trained_sha256, mmap=False)
    index.add_with_ids(x, ids)
    return index


def test_manifest_records_the_build(built):
    cfg, m, x, ids = built
    store = ManifestStore(cfg.memory_dir)
    assert store.versions() == [1] and store.load().version == 1
    assert m.num_shards == 3 and m.count == N and m.dim == DIM and m.metric == "ip"
    assert "IVF" in m.index_key and m.index_key.endswith(",Flat")  # 256 MiB affords exact codes for 5k x 64
    assert m.encoder["name"] == "synthetic" and m.encoder["image_size"] == 8
    for e in m.shards:  # shard assignment is id % num_shards; each shard answers only with its own ids
        assert e.count == int(np.sum(ids % 3 == e.shard))
        idx = read_index(store.url(e.path), e.sha256)
        faiss.extract_index_ivf(idx).nprobe = 1000
        _, I = idx.search(x[:20], 50)
        assert (I[I >= 0] % 3 == e.shard).all()
    assert m.recall and m.recall[0]["nprobe"] == 1
    chosen = [r for r in m.recall if r["nprobe"] == m.nprobe][0]
    assert chosen["recall@10"] >= cfg.index.target_recall
    assert store.load(1).to_dict() == m.to_dict()


def test_router_equals_single_index_and_returns_metadata(built):
    cfg, m, x, ids = built
    xq = clustered(NQ, DIM, 99)
    ref = single_index(cfg, m, x, ids)
    with Router(cfg.memory_dir, use_ray=True) as router:
        for nprobe in (1, 4):
            res = router.search(xq, 10, nprobe=nprobe)
            faiss.extract_index_ivf(ref).nprobe = nprobe
            D, I = ref.search(xq, 10)
            np.testing.assert_array_equal(res.I, I)
            np.testing.assert_allclose(res.D, D, rtol=1e-5, atol=1e-5)
        assert set(res.I.ravel()) <= set(ids.tolist())
        np.testing.assert_array_equal(res.labels, res.I % 10)
        assert res.keys[0, 0] == f"k{res.I[0, 0]}" and res.label_names[0, 0] == f"class{res.I[0, 0] % 10}"
        assert res.sources[0, 0] == "synthetic"


def test_exclude_set_is_applied_inside_faiss_and_keeps_k(built):
    cfg, m, x, ids = built
    xq = clustered(NQ, DIM, 98)
    with Router(cfg.memory_dir, use_ray=True) as router:
        base = router.search(xq, 10, nprobe=8)
        excluded = np.unique(base.I[:, :5])  # the 5 best of every query
        res = router.search(xq, 10, nprobe=8, exclude=ExcludeSet(1, excluded))
        assert not np.isin(res.I, excluded).any()
        assert (res.I >= 0).all() and res.I.shape == (NQ, 10)
        # the survivors of the unfiltered top-10 keep their order at the head of the filtered result
        for row_b, row_r in zip(base.I, res.I):
            kept = [i for i in row_b if i not in set(excluded)]
            assert list(row_r[: len(kept)]) == kept
        # same version again: the cached selector gives the same answer
        again = router.search(xq, 10, nprobe=8, exclude=ExcludeSet(1, excluded))
        np.testing.assert_array_equal(again.I, res.I)
        # a new version with nothing excluded restores the plain result
        np.testing.assert_array_equal(router.search(xq, 10, nprobe=8, exclude=ExcludeSet(2, [])).I, base.I)


def test_killed_shard_actor_is_recreated_mid_query(built):
    import ray

    cfg, m, x, ids = built
    xq = clustered(NQ, DIM, 97)
    with Router(cfg.memory_dir, use_ray=True) as router:
        before = router.search(xq, 10)
        ray.kill(router.searchers[1])
        after = router.search(xq, 10)
        assert router.restarts >= 1
        np.testing.assert_array_equal(after.I, before.I)
        np.testing.assert_allclose(after.D, before.D)


def test_corrupt_or_missing_shard_file_is_named(built, tmp_path):
    import shutil

    cfg, m, x, ids = built
    copy = tmp_path / "memory"
    shutil.copytree(cfg.memory_dir, copy)
    victim = copy / m.shards[0].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="shard-000.index"):
        Router(str(copy), use_ray=False)
    os.remove(copy / m.shards[1].meta_path)
    with pytest.raises(NotFound, match="shard-001.meta.parquet"):
        from pipeline.index.shard import ShardSearcher
        ShardSearcher(str(copy), m.shards[1].__dict__)


def test_rebuild_resumes_and_killed_build_leaves_current_intact(built, monkeypatch, capsys):
    """A build that dies after finishing shard 0 leaves v1 current and intact; the re-run reuses the trained
    index and the finished shard, and builds the rest."""
    import pipeline.index.build as b

    cfg, m, x, ids = built
    store = ManifestStore(cfg.memory_dir)
    calls = {"train": 0}
    real_train = b.tr.train_index

    def counting_train(*a, **kw):
        calls["train"] += 1
        return real_train(*a, **kw)

    def one_shard_then_killed(cfg_, store_, version, trained_rel, trained_sha, emb_dir, exclude=None):
        b.populate_shard(store_.memory_dir, version, 0, cfg_.index.num_shards, store_.url(trained_rel),
                         trained_sha, emb_dir, 1000)
        raise KeyboardInterrupt("killed mid-build")

    monkeypatch.setattr(b.tr, "train_index", counting_train)
    real_populate_all = b._populate_all
    monkeypatch.setattr(b, "_populate_all", one_shard_then_killed)
    with pytest.raises(KeyboardInterrupt):
        build_index(cfg, "train")
    assert store.current_version() == 1 and store.versions() == [1]
    assert Router(cfg.memory_dir, use_ray=False).search(x[:2], 5).I[0, 0] == ids[0]  # v1 loads and verifies
    shard0 = os.path.join(cfg.memory_dir, "shards/v000002/shard-000.index")
    stamp = os.stat(shard0).st_mtime_ns
    monkeypatch.setattr(b, "_populate_all", real_populate_all)
    from pipeline.cli import main

    assert main(["build", *cfg.overrides]) == 0  # the re-run, through `vmem build`
    out = capsys.readouterr().out
    assert "memory v2: 5,000 items x 64-d in 3 shards" in out and "recall@10" in out and "<- chosen" in out
    m2 = store.load()
    assert calls["train"] == 1  # the re-run reused the trained index of the killed build
    assert os.stat(shard0).st_mtime_ns == stamp  # ... and its finished shard
    assert m2.version == 2 and m2.parent == 1 and store.current_version() == 2 and m2.count == N
    assert [e.count for e in m2.shards] == [e.count for e in m.shards]


def test_build_refuses_a_memory_that_does_not_fit(built):
    cfg, m, x, ids = built
    small = load_config(None, [f"workdir={os.path.dirname(cfg.memory_dir)}", "index.memory_per_node=100KiB"])
    with pytest.raises(UserError, match="will not fit.*100.0 KiB"):
        build_index(small, "train")


def test_vmem_query_and_plan_commands(built, tmp_path, capsys):
    from pipeline.cli import main

    cfg, m, x, ids = built
    np.save(tmp_path / "q.npy", x[:2])
    assert main(["query", "--vectors", str(tmp_path / "q.npy"), "-k", "3", *cfg.overrides]) == 0
    out = capsys.readouterr().out
    assert f"id={ids[0]}" in out and f"key=k{ids[1]}" in out and "score=1.0000" in out
    assert main(["plan", "--items", "1e9", "--dim", "1024", "--ram-per-node", "256GiB"]) == 0
    out = capsys.readouterr().out
    assert "bytes per item" in out and "nodes" in out
    np.save(tmp_path / "bad.npy", x[:2, :10])
    assert main(["query", "--vectors", str(tmp_path / "bad.npy"), *cfg.overrides]) == 1
    assert "10-d" in capsys.readouterr().err  # names the wrong dimension

"""The memory's state in Lance tables: rebuilds keep the forget list and the adds, eval works on any state,
relabels/versions/rollback, vectors normalised where they enter. Real Ray, faiss, Parquet and Lance."""
from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import NotFound, UserError
from pipeline.eval.accuracy import accuracy_table, exact_neighbors
from pipeline.memory.build import build_memory
from pipeline.memory.memory import VisualMemory
from test_index_build import clustered, write_embeddings

N, DIM = 3000, 32


@pytest.fixture
def memory(tmp_path, ray_session):
    overrides = [f"workdir={tmp_path / 'work'}", "index.num_shards=2", "index.recall_queries=50",
                 "index.index_key=IVF16,Flat", "memory.grace_period_s=0", "memory.auto_compact=false"]
    cfg = load_config(None, overrides)
    x = clustered(N, DIM, 1, centers=10)
    os.makedirs(cfg.embeddings_dir("train"))
    ids = write_embeddings(cfg.embeddings_dir("train"), x)
    build_memory(cfg, "train")
    mem = VisualMemory.open(cfg.memory_dir, cfg=cfg)
    yield cfg, mem, x, ids
    mem.close()


def _all_ids(mem, k=N + 200):
    nb = mem.search(embeddings=np.eye(DIM, dtype=np.float32), k=k, nprobe=16)
    return set(nb.I[nb.I >= 0].tolist())


def test_rebuild_keeps_deletions_and_adds(memory, capsys):
    cfg, mem, x, ids = memory
    new = clustered(20, DIM, 9, centers=10)
    added = mem.add(embeddings=new, labels=[3] * 20, keys=[f"new-{i}" for i in range(20)])
    dead = ids[:50].tolist() + added[:2]
    assert mem.delete(ids=dead) == 52

    def rebuild_and_check():
        m = build_memory(cfg, "train")
        assert "leaving out 50 deleted item(s)" in capsys.readouterr().out
        assert m.count == N - 50 and m.build["excluded"] == 50
        fresh = VisualMemory.open(cfg.memory_dir, cfg=cfg)
        live = _all_ids(fresh)
        assert not live & set(dead)
        assert set(added[2:]) <= live and len(live) == N - 50 + 18
        return fresh

    rebuild_and_check().close()  # the embeddings still hold the deleted items
    report = VisualMemory.open(cfg.memory_dir, cfg=cfg).compact()
    assert report["erasure"]["verified"]  # erasure rewrote the parts without them ...
    write_embeddings(cfg.embeddings_dir("train"), x)  # ... and a user re-embeds the original images
    mem2 = rebuild_and_check()  # the erased forget list (digests only) still keeps them out
    with pytest.raises(UserError, match="deletion is final"):
        mem2.add(embeddings=x[:1], labels=[0], keys=["new-0"])  # deleted above
    mem2.close()


def test_eval_and_prune_after_deletes_and_compaction(memory):
    cfg, mem, x, ids = memory
    mem.delete(label=int(ids[0] % 10))
    mem.add(embeddings=clustered(10, DIM, 5, centers=10), labels=[11] * 10, keys=[f"a{i}" for i in range(10)])
    mem.compact()
    xq = clustered(40, DIM, 2, centers=10)
    nb = exact_neighbors(mem.snapshot(), xq, 20, x, ids)
    assert not np.isin(nb.I, ids[ids % 10 == ids[0] % 10]).any()
    table = accuracy_table(mem.snapshot(), xq, np.zeros(40, np.int64), [1, 10], ["plurality"], exact_xb=x, exact_ids=ids)
    assert set(table.rows) == {("ann", "plurality"), ("exact", "plurality")}
    report = mem.prune(hard=False, soft=True)
    assert report["items"] == N - int((ids % 10 == ids[0] % 10).sum()) + 10


def test_relabel_versions_and_rollback(memory):
    cfg, mem, x, ids = memory
    target = int(ids[5])
    assert mem.relabel([target], 42, "answer") == 1
    nb = mem.search(embeddings=x[5:6], k=1, nprobe=16)
    assert nb.I[0, 0] == target and nb.labels[0, 0] == 42 and mem.get_item(target)["label"] == 42
    before = len(mem.versions())
    added = mem.add(embeddings=clustered(3, DIM, 8, centers=10), labels=[1] * 3, keys=["r0", "r1", "r2"])
    mem.delete(ids=[int(ids[7])])
    ops = [v["op"] for v in mem.versions()]
    assert ops == ["build", "relabel", "add", "delete"]
    report = mem.rollback(1)  # back to just after the build: relabel and add undone, the delete stays
    assert report["adds_undone"] == 3 and report["overlay_rows_removed"] >= 1 and report["deletes_kept"] == 1
    assert mem.search(embeddings=x[5:6], k=1, nprobe=16).labels[0, 0] == int(ids[5] % 10)
    live = _all_ids(mem)
    assert not live & set(added) and int(ids[7]) not in live
    with pytest.raises(NotFound):
        mem.get_item(int(ids[7]))
    assert len(mem.versions()) > before


def test_vectors_are_normalised_where_they_enter(memory):
    cfg, mem, x, ids = memory
    nb1 = mem.search(embeddings=x[:3], k=5, nprobe=16)
    nb3 = mem.search(embeddings=3 * x[:3], k=5, nprobe=16)
    np.testing.assert_array_equal(nb1.I, nb3.I)
    assert np.nanmax(nb3.distances) <= 2.0 and np.nanmin(nb3.distances) >= -1e-5
    with pytest.raises(UserError, match="all zeros"):
        mem.search(embeddings=np.zeros((1, DIM), np.float32))


def test_exact_eval_job_matches_in_process_exact(memory):
    from pipeline.eval.accuracy import exact_neighbors_job

    cfg, mem, x, ids = memory
    mem.delete(ids=ids[:30].tolist())
    mem.relabel([int(ids[40])], 77)
    mem.add(embeddings=clustered(15, DIM, 6, centers=10), labels=[5] * 15, keys=[f"j{i}" for i in range(15)])
    xq = clustered(25, DIM, 4, centers=10)
    a = exact_neighbors_job(mem.snapshot(), cfg.embeddings_dir("train"), xq, 30)
    b = exact_neighbors(mem.snapshot(), xq, 30, x, ids)
    np.testing.assert_array_equal(a.I, b.I)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.isin(a.I, ids[:30]).any()


def test_compaction_carries_the_rerank_files(tmp_path, ray_session):
    """A memory with lossy codes + re-rank: after deletes, adds and a compaction every shard still has its
    vectors file, aligned with its rows, so searches stay exact where they were exact."""
    overrides = [f"workdir={tmp_path / 'work'}", "index.num_shards=2", "index.recall_queries=50",
                 "index.index_key=IVF4,SQ4", "index.rerank=true", "memory.grace_period_s=0",
                 "memory.auto_compact=false"]
    cfg = load_config(None, overrides)
    x = clustered(1500, DIM, 3, centers=10)
    os.makedirs(cfg.embeddings_dir("train"))
    ids = write_embeddings(cfg.embeddings_dir("train"), x)
    build_memory(cfg, "train")
    mem = VisualMemory.open(cfg.memory_dir, cfg=cfg)
    new = clustered(30, DIM, 12, centers=10)
    added = mem.add(embeddings=new, labels=[1] * 30, keys=[f"rr{i}" for i in range(30)])
    mem.delete(ids=ids[:40].tolist())
    assert mem.compact()["erasure"]["verified"]
    m = mem.snapshot().base.manifest
    assert all(s.vectors_path for s in m.shards) and m.rerank_k > 0
    live_x = np.vstack([x[40:], new])
    live_ids = np.concatenate([ids[40:], np.array(added)])
    q = clustered(30, DIM, 13, centers=10)
    exact = np.argsort(-(q @ live_x.T), axis=1)[:, :5]
    nb = mem.search(embeddings=q, k=5, nprobe=4)
    np.testing.assert_array_equal(nb.I, live_ids[exact])
    mem.close()

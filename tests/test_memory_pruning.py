"""Pruning on synthetic data with injected label noise: the memory queries itself on Ray (self match dropped)."""
import numpy as np
import pytest

from pipeline.memory.memory import VisualMemory
from pipeline.memory.pruning import soft_gamma, wrong_label_counts
from pipeline.memory.synthetic import build_synthetic_memory, make_clusters


def test_gamma_formula():
    np.testing.assert_allclose(soft_gamma([0, 1, 10, 100]), [1.0, 0.875, 1.75 / 11, 1.75 / 101])


def test_wrong_label_counts_drops_the_self_match():
    q_ids = np.array([1, 2])
    I = np.array([[1, 5, 6], [7, 8, 2]])
    L = np.array([[0, 1, 0], [1, 1, 0]])
    # query 1 (label 0): self dropped, neighbours 5 (wrong), 6 (right); query 2 (label 0): 7, 8 wrong
    assert sorted(wrong_label_counts(q_ids, np.array([0, 0]), I, L, k=2).tolist()) == [5, 7, 8]


def test_pruning_finds_noisy_items_and_soft_votes_use_gamma(tmp_path, ray_session):
    data = make_clusters(2000, 32, 5, spread=0.5, seed=3)
    rng = np.random.default_rng(0)
    noisy = rng.choice(len(data.labels), 100, replace=False)
    data.labels[noisy] = (data.labels[noisy] + 1 + rng.integers(0, 4, 100)) % 5
    mem_dir = str(tmp_path / "memory")
    build_synthetic_memory(mem_dir, data, index_key="IVF8,Flat", nprobe=8)
    mem = VisualMemory.open(mem_dir)
    report = mem.prune(soft_k=10, hard_k=100, threshold=40, batch_size=700)
    v = dict(zip(report["ids"].tolist(), report["v_soft"].tolist()))
    v_noisy = np.array([v.get(i, 0) for i in data.ids[noisy]])  # the report lists items with v > 0
    clean = np.setdiff1d(np.arange(len(data.ids)), noisy)
    v_clean = np.array([v.get(i, 0) for i in data.ids[clean]])
    assert v_noisy.mean() > 5 * max(v_clean.mean(), 0.1)
    assert np.median(v_noisy) >= 5 and np.median(v_clean) == 0
    # hard pruning removed mostly noisy items
    pruned = report["ids"][report["v_hard"] >= 40]
    assert report["hard_pruned"] == len(pruned) > 0
    assert np.isin(pruned, data.ids[noisy]).mean() > 0.9
    assert mem.stats()["tombstones"] == len(pruned) and mem.stats()["gamma_version"] == 1
    # soft votes weigh neighbours by gamma
    q = make_clusters(50, 32, centres=data.centres, seed=8, prefix="q")
    p = mem.classify(embeddings=q.xb, k=10, method="soft_plurality")[0]
    for n in p.neighbors:
        assert n.weight == pytest.approx(soft_gamma(v.get(n.id, 0)))
    mem.close()

"""Evaluation harness on a synthetic memory: accuracy table (ANN vs exact), CSV/PNG, and the three studies."""
import numpy as np

from pipeline.eval.accuracy import accuracy_table
from pipeline.eval.plots import plot_accuracy
from pipeline.eval.studies import scratch_copy, study_add_class, study_delete_class, study_pruning
from pipeline.memory.memory import VisualMemory
from pipeline.memory.synthetic import build_synthetic_memory, make_clusters


def _memory(tmp_path, n=1500):
    data = make_clusters(n, 32, 6, spread=0.9, seed=11)
    mem_dir = str(tmp_path / "memory")
    build_synthetic_memory(mem_dir, data, index_key="IVF8,Flat", nprobe=8)
    q = make_clusters(200, 32, centres=data.centres, spread=0.9, seed=12, prefix="q")
    return mem_dir, data, q


def test_accuracy_table_exact_matches_ann_with_full_probing(tmp_path):
    mem_dir, data, q = _memory(tmp_path)
    mem = VisualMemory.open(mem_dir)
    t = accuracy_table(mem.snapshot(), q.xb, q.labels, [1, 10, 20], ["plurality", "rank"], exact_xb=data.xb,
                       exact_ids=data.ids)
    assert t.rows[("ann", "rank")] == t.rows[("exact", "rank")]  # nprobe = nlist: IVF is exact
    # k=1 plurality = nearest neighbour's label, computed independently
    nn = np.argmax(q.xb @ data.xb.T, axis=1)
    assert t.get("plurality", 1) == np.mean(data.labels[nn] == q.labels)
    assert "rank" in t.format() and t.to_csv().count("\n") == 1 + 2 * 2 * 3
    plot_accuracy(t, str(tmp_path / "acc.png"))
    assert (tmp_path / "acc.png").stat().st_size > 1000
    mem.close()


def test_studies_add_and_delete_class(tmp_path):
    mem_dir, data, q = _memory(tmp_path)
    copy = scratch_copy(mem_dir)
    r = study_add_class(copy, q.xb, q.labels, label=2)
    assert r["before"]["class"] == 0.0 and r["after"]["class"] > 0.8
    r = study_delete_class(scratch_copy(mem_dir), q.xb, q.labels, label=3)
    for ph in ("before_compaction", "after_compaction"):
        assert r[ph]["deleted_ids_returned"] == 0 and r[ph]["queries_labelled_with_it"] == 0
    assert VisualMemory.open(mem_dir).stats()["version"] == 1  # the original is untouched


def test_study_pruning(tmp_path, ray_session):
    mem_dir, data, q = _memory(tmp_path, n=1000)
    r = study_pruning(scratch_copy(mem_dir), q.xb, q.labels, threshold=30)
    assert set(r["soft"]) == {"plurality", "distance", "softmax", "rank"} and r["items_with_v_gt0"] > 0

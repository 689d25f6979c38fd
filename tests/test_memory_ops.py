"""VisualMemory on a small synthetic memory (3k x 32-d, 2 shards, IVF16,Flat): add, delete, compaction,
interventions, item look-ups. Real faiss indexes, real Parquet, real manifests on disk."""
import numpy as np
import pytest

from pipeline.errors import DataError, NotFound, UserError
from pipeline.memory.memory import VisualMemory
from pipeline.memory.synthetic import build_synthetic_memory, make_clusters


@pytest.fixture
def mem_setup(tmp_path):
    data = make_clusters(3000, 32, 10, seed=0)
    build_synthetic_memory(str(tmp_path / "memory"), data, num_shards=2, index_key="IVF16,Flat", nprobe=16)
    queries = make_clusters(300, 32, centres=data.centres, seed=7, prefix="q")
    mem = VisualMemory.open(str(tmp_path / "memory"))
    yield mem, data, queries
    mem.close()


def test_classify_returns_predictions_with_neighbours(mem_setup):
    mem, data, q = mem_setup
    preds = mem.classify(embeddings=q.xb, k=10, method="rank")
    acc = np.mean([p.label for p in preds] == q.labels)
    assert acc > 0.95
    p = preds[0]
    assert len(p.neighbors) == 10 and p.label_name == f"class_{p.label}"
    assert max(p.scores, key=p.scores.get) == p.label_name
    assert [n.distance for n in p.neighbors] == sorted(n.distance for n in p.neighbors)
    np.testing.assert_allclose(p.neighbors[0].weight, 1 / 2)
    item = mem.get_item(p.neighbors[0].id)
    assert item["key"] == p.neighbors[0].key and item["label"] == p.neighbors[0].label


def test_bad_vectors_are_refused(mem_setup):
    mem = mem_setup[0]
    with pytest.raises(DataError, match="dimension"):
        mem.classify(embeddings=np.zeros((2, 16), np.float32))
    bad = np.ones((2, 32), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        mem.classify(embeddings=bad)
    with pytest.raises(UserError, match="soft_rank"):
        mem.classify(embeddings=bad[:1], method="knn")


def test_add_is_visible_to_the_next_query_and_durable(mem_setup):
    mem, data, q = mem_setup
    x = q.xb[:3] * 0 + data.centres[0]  # new items exactly at a class centre: nearest to those queries
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    ids = mem.add(embeddings=x, labels=[42, 42, 42], keys=["n0", "n1", "n2"], label_names=["novel"] * 3)
    pred = mem.classify(embeddings=x[:1], k=3)[0]
    assert {n.id for n in pred.neighbors} == set(ids) and pred.label_name == "novel"
    with pytest.raises(UserError, match="already in the memory"):
        mem.add(embeddings=x[:1], labels=[1], keys=["n0"])
    again = VisualMemory.open(mem.memory_dir)  # a fresh process view replays the fsync'd log
    assert again.stats()["delta_items"] == 3 and again.get_item(ids[1])["label_name"] == "novel"
    again.close()


def test_delete_is_invisible_to_the_next_query_with_k_results(mem_setup):
    mem, data, q = mem_setup
    before = mem.search(embeddings=q.xb[:20], k=10)
    victims = np.unique(before.I[:, :3])
    assert mem.delete(ids=victims.tolist()) == len(victims)
    after = mem.search(embeddings=q.xb[:20], k=10)
    assert not np.isin(after.I, victims).any()
    assert (after.I >= 0).all()  # still k live results
    with pytest.raises(NotFound):
        mem.delete(ids=[12345])
    with pytest.raises(NotFound):
        mem.get_item(int(victims[0]))


def test_no_deleted_id_ever_returned_before_and_after_compaction(mem_setup):
    mem, data, q = mem_setup
    new = make_clusters(50, 32, centres=data.centres, seed=3, prefix="new")
    added = mem.add(embeddings=new.xb, labels=new.labels.tolist(), keys=new.keys)
    n_label = mem.delete(label=4)
    dead = set(data.ids[data.labels == 4].tolist()) | {i for i, l in zip(added, new.labels) if l == 4}
    mem.delete(ids=added[:5])
    dead |= set(added[:5])
    assert n_label == int((data.labels == 4).sum()) + int((new.labels == 4).sum())
    reports = []
    for _ in range(2):
        nb = mem.search(embeddings=q.xb, k=50)
        assert not np.isin(nb.I, list(dead)).any() and (nb.labels != 4).all()
        assert all(p.label != 4 for p in mem.classify(embeddings=q.xb, k=10))
        if mem.version == 1:
            reports.append(mem.compact(grace_s=0))
    assert mem.version == 2 and reports[0]["erasure"]["verified"] and reports[0]["erasure"]["ids_checked"] == len(dead)
    st = mem.stats()
    assert st["tombstones"] == 0 and st["delta_items"] == 0
    assert st["items"] == 3000 + 50 - len(dead)


def test_compacted_memory_equals_a_fresh_build_without_those_items(tmp_path):
    data = make_clusters(2000, 32, 8, seed=1)
    q = make_clusters(200, 32, centres=data.centres, seed=9, prefix="q")
    mem_dir = str(tmp_path / "m")
    build_synthetic_memory(mem_dir, data, index_key="IVF8,Flat", nprobe=8)
    mem = VisualMemory.open(mem_dir)
    rng = np.random.default_rng(0)
    dead = rng.choice(data.ids, 300, replace=False)
    mem.delete(ids=dead.tolist())
    mem.compact()
    # Fresh build of the survivors with the same trained quantizer: exhaustive probing makes it exact.
    import faiss

    keep = ~np.isin(data.ids, dead)
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(32))
    flat.add_with_ids(data.xb[keep], data.ids[keep])
    _, I_ref = flat.search(q.xb, 10)
    nb = mem.search(embeddings=q.xb, k=10)
    np.testing.assert_array_equal(nb.I, I_ref)
    mem.close()


def test_interventions_change_votes_and_show_in_explanations(mem_setup):
    mem, data, q = mem_setup
    x = q.xb[:1]
    p0 = mem.classify(embeddings=x, k=10)[0]
    mem.intervene(label_weights={p0.label: 0.0})
    v1 = mem.stats()["interventions_version"]
    p1 = mem.classify(embeddings=x, k=10)[0]
    assert p1.label != p0.label or len(p1.scores) == 1
    assert all(n.weight == 0 for n in p1.neighbors if n.label == p0.label)
    target = p0.neighbors[0].id
    mem.intervene(clear=True, relabel={target: 77}, label_names={77: "relabelled"}, item_weights={target: 20.0})
    p2 = mem.classify(embeddings=x, k=10)[0]
    assert p2.label == 77 and p2.neighbors[0].original_label == p0.label and p2.neighbors[0].multiplier == 20.0
    assert mem.stats()["interventions_version"] == v1 + 1  # one commit per intervention, history line with it
    out = mem.explain(embedding=x[0], k=10, out=str(mem.memory_dir) + "/sheet.png")
    assert out.label == 77
    with open(str(mem.memory_dir) + "/sheet.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_get_image_reads_the_member_of_a_webdataset_tar(tmp_path):
    import io
    import tarfile

    from pipeline.memory.snapshot import read_tar_member

    tar_path = tmp_path / "train-000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key, payload in (("a/0001", b"\x89PNG-one"), ("a/0002", b"\x89PNG-two")):
            for ext, data in (("png", payload), ("cls", b"3")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert read_tar_member(str(tar_path), "a/0002") == b"\x89PNG-two"
    with pytest.raises(NotFound):
        read_tar_member(str(tar_path), "a/0003")


def test_package_exports_visual_memory():
    from pipeline.memory import VisualMemory as VM

    assert VM is VisualMemory

"""The memory on a real S3 API server (moto): edits are Lance commits on S3; compaction commits a manifest there."""

from pipeline.memory.memory import VisualMemory
from pipeline.memory.synthetic import build_synthetic_memory, make_clusters


def test_add_delete_compact_on_s3(s3_server):
    url = "s3://vmem-test/memtest/memory"
    data = make_clusters(400, 32, 4, seed=21)
    build_synthetic_memory(url, data, index_key="IVF4,Flat", nprobe=4)
    mem = VisualMemory.open(url)
    new = make_clusters(3, 32, centres=data.centres, seed=22, prefix="s3new")
    ids = mem.add(embeddings=new.xb, labels=[7, 7, 7], keys=new.keys, label_names=["seven"] * 3)
    mem.delete(ids=[int(data.ids[0])])
    again = VisualMemory.open(url)  # reads the state tables from S3
    assert again.stats()["delta_items"] == 3 and again.stats()["tombstones"] == 1
    nb = again.search(embeddings=data.xb[:1], k=5)
    assert int(data.ids[0]) not in nb.I[0]
    report = mem.compact(grace_s=0)
    assert report["erasure"]["verified"]
    assert set(ids) <= set(mem.search(embeddings=new.xb, k=1).I[:, 0].tolist())
    assert mem.stats()["items"] == 402

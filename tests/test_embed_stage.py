"""The Ray Data embedding stage end to end: real shards, real Ray, real Parquet, real S3 server."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from pipeline import storage
from pipeline.data.ids import stable_id
from pipeline.data.shards import iter_shard_samples, write_shards
from pipeline.embed import parts
from pipeline.embed.encoders import create_encoder
from pipeline.embed.preprocess import decode_image
from pipeline.embed.stage import embed_images, embed_split
from pipeline.errors import UserError

SMALL = ("embed.encoder=efficientnet_lite0", "embed.image_size=112", "embed.batch_size=16",
         "embed.preprocess_batch_size=32", "data.samples_per_shard=64")


def _manifest(cfg, split="train"):
    return storage.read_json(storage.join(cfg.embeddings_dir(split), parts.MANIFEST_NAME))


@pytest.mark.slow
def test_stage_equals_single_process_and_resumes(ray_session, make_config, fmnist_dir):
    cfg = make_config(*SMALL, "data.splits={train: 200}")
    shards = write_shards(cfg, "train")
    assert shards.counts == [64, 64, 64, 8]

    report = embed_split(cfg, "train")
    assert (report.rows, report.skipped, report.shards_embedded, report.total_rows) == (200, 0, 4, 200)
    assert sorted(n for n in storage.listdir(cfg.embeddings_dir("train")) if n.startswith("part-")) == \
        [f"part-0000{i}.parquet" for i in range(4)]

    # Reference: the same images through the same encoder in one process.
    samples = [s for url in shards.shards for s in iter_shard_samples(url)]
    enc = create_encoder("efficientnet_lite0", pretrained=True, image_size=112)
    ref = embed_images(enc, [decode_image(s["image"]) for s in samples], batch_size=16)
    table = parts.read_embeddings(cfg.embeddings_dir("train"))
    assert table.column("key").to_pylist() == [s["key"] for s in samples]  # parts in shard order
    assert table.column("id").to_pylist() == [stable_id(s["key"]) for s in samples]
    assert table.column("label").to_pylist() == [s["label"] for s in samples]
    assert table.column("shard").to_pylist() == [s["shard"] for s in samples]
    x = parts.embeddings_of(table)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    cos = (x * ref).sum(axis=1)
    assert cos.min() >= 0.9999, cos.min()

    m = _manifest(cfg)
    assert m["complete"] and m["counts"] == {"rows": 200, "skipped": 0, "shards": 4, "shards_done": 4}
    assert (m["encoder"], m["dim"], m["image_size"]) == ("efficientnet_lite0", 1280, 112)
    assert m["preprocessing"]["resize_size"] == 128 and m["preprocessing"]["mean"] == [0.5, 0.5, 0.5]

    # Resume: lose one part and its status; only that shard is recomputed, the others are untouched.
    out = cfg.embeddings_dir("train")
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in ("part-00000.parquet", "part-00002.parquet")}
    os.remove(os.path.join(out, "part-00001.parquet"))
    del m["shards"]["train-000001.tar"]
    storage.atomic_write_json(storage.join(out, parts.MANIFEST_NAME), m)
    again = embed_split(cfg, "train")
    assert (again.shards_embedded, again.shards_resumed, again.rows, again.total_rows) == (1, 3, 64, 200)
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in before} == before
    x2 = parts.embeddings_of(parts.read_embeddings(out))
    np.testing.assert_allclose(x2, x, atol=1e-6)
    assert _manifest(cfg)["complete"]

    # Nothing left to do; and other encoder settings refuse to mix into this folder.
    assert embed_split(cfg, "train").shards_embedded == 0
    other = make_config(*SMALL, "data.splits={train: 200}", "embed.image_size=96")
    with pytest.raises(UserError, match="image_size"):
        embed_split(other, "train")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_images_are_skipped_and_counted(ray_session, make_config, tmp_path):
    """A hand-made shard in the shard format, with one undecodable image and one truncated PNG."""
    from webdataset import ShardWriter

    cfg = make_config(*SMALL, "embed.pretrained=false")
    out = cfg.shards_dir("train")
    os.makedirs(out)
    rng = np.random.RandomState(0)
    with ShardWriter(os.path.join(out, "train-%06d.tar"), maxcount=100, verbose=0) as w:
        for i in range(12):
            key = f"test/{i:03d}"
            png = _png(rng.randint(0, 255, (28, 28), np.uint8))
            if i == 3:
                png = b"garbage, not an image"
            if i == 7:
                png = png[: len(png) // 2]
            w.write({"__key__": f"k{i:03d}", "png": png, "cls": str(i % 3).encode(),
                     "json": json.dumps({"key": key, "source": "test", "label_name": f"c{i % 3}",
                                         "id": stable_id(key)}).encode()})
    report = embed_split(cfg, "train")
    assert (report.rows, report.skipped) == (10, 2)
    table = parts.read_embeddings(cfg.embeddings_dir("train"))
    assert table.num_rows == 10 and "test/003" not in table.column("key").to_pylist()
    assert "test/007" not in table.column("key").to_pylist()
    st = _manifest(cfg)["shards"]["train-000000.tar"]
    assert (st["status"], st["rows"], st["skipped"]) == ("done", 10, 2)


@pytest.mark.slow
def test_s3_input_and_output(ray_session, s3_server, make_config):
    cfg = make_config(*SMALL, "embed.pretrained=false", "data.splits={train: 80}",
                      f"storage.s3_endpoint_url={s3_server}", workdir="s3://vmem-test/embed-stage")
    write_shards(cfg, "train")
    report = embed_split(cfg, "train")
    assert (report.rows, report.shards_embedded) == (80, 2)
    table = parts.read_embeddings(cfg.embeddings_dir("train"))
    assert table.num_rows == 80
    assert set(table.column("shard").to_pylist()) == {
        "s3://vmem-test/embed-stage/shards/train/train-000000.tar",
        "s3://vmem-test/embed-stage/shards/train/train-000001.tar"}
    assert _manifest(cfg)["complete"]

"""Data layer: sources -> WebDataset shards -> readers (our own, webdataset's stages, Ray Data), local and S3."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline import storage
from pipeline.data import stable_id
from pipeline.data.shards import (INDEX_NAME, ShardReport, iter_shard_samples, iter_split_samples, read_shard_index,
                                  shard_urls, tar_key, write_shards)
from pipeline.data.sources import (FASHION_MNIST_CLASSES, SkipCounter, available_sources, check_images,
                                   open_source, read_idx)
from pipeline.errors import DataError, NotFound, UserError


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _read_all(urls, handler=None):
    out = []
    for u in urls:
        out.extend(iter_shard_samples(u, handler) if handler else iter_shard_samples(u))
    return out


# ------------------------------------------------------------------------------------------------ ids

def test_stable_id_is_deterministic_positive_and_process_independent():
    keys = [f"fashion_mnist/train/{i:06d}" for i in range(1000)] + ["", "ü/ñ", "a" * 500]
    ids = [stable_id(k) for k in keys]
    assert all(0 < i < 2**63 for i in ids)
    assert len(set(ids)) == len(keys)
    assert ids == [stable_id(k) for k in keys]
    # A fixed value: changing the derivation would silently re-key every stored memory.
    assert stable_id("fashion_mnist/train/000000") == 0x1D047E7E442B9915
    # Another interpreter with a different hash seed gives the same ids (Python's hash() would not).
    code = "from pipeline.data.ids import stable_id; print(stable_id('fashion_mnist/train/000123'))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == stable_id("fashion_mnist/train/000123")
    with pytest.raises(TypeError):
        stable_id(123)  # type: ignore[arg-type]


def test_tar_key_is_tar_and_webdataset_safe():
    assert tar_key("fashion_mnist/train/000123") == "fashion_mnist__train__000123"
    k = tar_key("train/n01440764/n01440764_10026.JPEG")
    assert "." not in k and "/" not in k
    long = tar_key("train/cls/" + "x" * 300 + ".jpg")
    assert len(long) <= 80 and long != tar_key("train/cls/" + "x" * 299 + "y.jpg")
    assert not tar_key("__weird__/x").startswith("_")


# ---------------------------------------------------------------------------------------- Fashion-MNIST

def test_fashion_mnist_round_trip_pixel_exact(fmnist_dir, make_config):
    cfg = make_config("data.splits.train=300", "data.splits.test=0", "data.samples_per_shard=128")
    report = write_shards(cfg, "train")
    assert isinstance(report, ShardReport)
    assert (report.written, report.skipped, report.counts) == (300, 0, [128, 128, 44])
    assert [os.path.basename(u) for u in report.shards] == [f"train-00000{i}.tar" for i in range(3)]
    assert report.classes == dict(enumerate(FASHION_MNIST_CLASSES))
    assert "train: 300 samples in 3 shards" in report.summary() and "(0 skipped)" in report.summary()
    index = read_shard_index(cfg.shards_dir("train"))
    assert [s["count"] for s in index["shards"]] == [128, 128, 44] and index["skipped"] == 0
    assert sorted(os.listdir(cfg.shards_dir("train"))) == [INDEX_NAME] + [f"train-00000{i}.tar" for i in range(3)]

    images = read_idx(os.path.join(fmnist_dir, "train-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(fmnist_dir, "train-labels-idx1-ubyte.gz"))
    samples = _read_all(shard_urls(cfg.shards_dir("train")))
    assert [s["key"] for s in samples] == [f"fashion_mnist/train/{i:06d}" for i in range(300)]
    for i, s in enumerate(samples):
        assert s["image_format"] == "png"
        np.testing.assert_array_equal(_pixels(s["image"]), images[i])
        assert s["label"] == labels[i] and s["label_name"] == FASHION_MNIST_CLASSES[labels[i]]
        assert s["id"] == stable_id(s["key"]) and s["source"] == "fashion_mnist"
    assert samples[0]["shard"] == report.shards[0] and samples[-1]["shard"] == report.shards[2]

    # Same parameters again: nothing rewritten (the tars keep their inode and mtime), and it says so.
    stat = [os.stat(u) for u in report.shards]
    again = write_shards(cfg, "train")
    assert again.resumed and again.written == 300 and "nothing to do" in again.summary()
    assert [(s.st_ino, s.st_mtime_ns) for s in stat] == [(os.stat(u).st_ino, os.stat(u).st_mtime_ns)
                                                        for u in report.shards]
    # Fewer samples: rewritten, and the tar the new run does not need is removed.
    cfg.data.splits["train"] = 200
    smaller = write_shards(cfg, "train")
    assert not smaller.resumed and smaller.counts == [128, 72]
    assert sorted(os.listdir(cfg.shards_dir("train"))) == [INDEX_NAME, "train-000000.tar", "train-000001.tar"]


def test_fashion_mnist_jpg_and_test_split(fmnist_dir, make_config):
    cfg = make_config("data.splits.test=40", "data.image_format=jpg", "data.samples_per_shard=1000")
    report = write_shards(cfg, "test")
    names = tarfile.open(report.shards[0]).getnames()
    assert names[:3] == ["fashion_mnist__test__000000.cls", "fashion_mnist__test__000000.jpg",
                         "fashion_mnist__test__000000.json"]
    images = read_idx(os.path.join(fmnist_dir, "t10k-images-idx3-ubyte.gz"))
    samples = _read_all(report.shards)
    assert len(samples) == 40 and all(s["image_format"] == "jpg" for s in samples)
    err = np.mean([np.abs(_pixels(s["image"]).astype(int) - images[i]).mean() for i, s in enumerate(samples)])
    assert err < 3.0  # JPEG at quality 95 on 28x28 grey: close, not exact


def test_unknown_source_and_split_are_user_errors(fmnist_dir):
    assert available_sources() == ["fashion_mnist", "image_folder"]
    with pytest.raises(UserError, match="valid sources are fashion_mnist, image_folder"):
        open_source("nope", fmnist_dir, "train")
    with pytest.raises(UserError, match="splits train, test"):
        open_source("fashion_mnist", fmnist_dir, "validation")
    with pytest.raises(NotFound, match="train-images-idx3-ubyte"):
        open_source("fashion_mnist", "/nonexistent", "train")


# ------------------------------------------------------------------------------------------ image folder

def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_tree(tmp_path):
    """train/{cat,dog,fish}: 3 good images each (png + jpg) and 3 bad files; test/ has an extra class."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    good = {}
    for c in ("cat", "dog", "fish"):
        (root / "train" / c).mkdir(parents=True)
        for j in range(3):
            arr = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            fmt, ext = ("PNG", "png") if j % 2 == 0 else ("JPEG", "jpg")
            data = _encode(arr, fmt)
            (root / "train" / c / f"{c}.{j}.{ext}").write_bytes(data)
            good[f"train/{c}/{c}.{j}.{ext}"] = data
    jpg = _encode(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "JPEG")
    png = _encode(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "PNG")
    (root / "train" / "cat" / "corrupt.jpg").write_bytes(jpg[:100] + bytes(rng.integers(0, 256, 400, np.uint8)))
    (root / "train" / "dog" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "train" / "fish" / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    (root / "train" / "fish" / "README.txt").write_text("ignored: not an image extension")
    (root / "test" / "zebra").mkdir(parents=True)
    (root / "test" / "zebra" / "z.png").write_bytes(png)
    return root, good


def test_image_folder_skips_and_counts_bad_files(image_tree, make_config):
    root, good = image_tree
    cfg = make_config("data.source=image_folder", f"data.input={root}", "data.splits.train=0",
                      "data.samples_per_shard=4")
    report = write_shards(cfg, "train")
    assert report.written == 9 and report.skipped == 3 and report.counts == [4, 4, 1]
    assert report.skip_reasons == {"unreadable image": 3}
    assert "3 unreadable image" in report.summary()
    assert report.classes == {0: "cat", 1: "dog", 2: "fish", 3: "zebra"}  # union over splits, sorted
    index = read_shard_index(cfg.shards_dir("train"))
    assert any("corrupt.jpg" in e for e in index["skip_examples"])

    samples = _read_all(report.shards)
    assert sorted(s["key"] for s in samples) == sorted(good)
    # Round-robin over classes: a prefix of the stream is class-balanced.
    assert [s["label_name"] for s in samples[:3]] == ["cat", "dog", "fish"]
    for s in samples:
        assert s["label"] == ["cat", "dog", "fish"].index(s["label_name"]) and s["source"] == "image_folder"
        original = good[s["key"]]
        if s["key"].endswith(".png"):
            assert s["image"] == original  # already PNG: stored byte for byte
        else:
            np.testing.assert_array_equal(_pixels(s["image"]), _pixels(original))  # JPEG -> lossless PNG


def test_image_folder_limit_is_class_balanced_and_counts_readable_only(image_tree):
    root, _ = image_tree
    skips = SkipCounter()
    stream = open_source("image_folder", str(root), "train", limit=6, handler=skips)
    samples = list(stream.samples)
    assert [s["label_name"] for s in samples] == ["cat", "dog", "fish"] * 2
    with pytest.raises(NotFound, match="found: test, train"):
        open_source("image_folder", str(root), "val")


def test_check_images_stage_on_plain_lists():
    good = {"key": "a", "image": _encode(np.zeros((4, 4), np.uint8), "PNG")}
    bad = {"key": "b", "image": b"not an image"}
    arr = {"key": "c", "image": np.zeros((4, 4), np.uint8)}
    skips = SkipCounter()
    assert [s["key"] for s in check_images([good, bad, arr], skips)] == ["a", "c"]
    assert skips.count == 1 and skips.reasons == {"unreadable image": 1}
    with pytest.raises(DataError, match="b: unreadable image"):
        list(check_images([good, bad, arr]))  # default policy: re-raise
    assert [s["key"] for s in check_images([good, bad, arr], lambda e: False)] == ["a"]  # stop


def test_split_with_no_readable_image_is_a_data_error(tmp_path, make_config):
    (tmp_path / "im" / "train" / "a").mkdir(parents=True)
    (tmp_path / "im" / "train" / "a" / "x.png").write_bytes(b"junk")
    cfg = make_config("data.source=image_folder", f"data.input={tmp_path / 'im'}", "data.splits.train=0")
    with pytest.raises(DataError, match="no readable samples"):
        write_shards(cfg, "train")
    assert not os.path.exists(os.path.join(cfg.shards_dir("train"), INDEX_NAME))


# ------------------------------------------------------------------------------------- damaged tars

def test_reader_skips_and_counts_damage_in_truncated_or_corrupt_tars(fmnist_dir, make_config, tmp_path):
    cfg = make_config("data.splits.train=50", "data.samples_per_shard=50")
    url = write_shards(cfg, "train").shards[0]
    data = open(url, "rb").read()
    members = tarfile.open(url).getmembers()  # 3 members per sample: cls, json, png
    damaged = {
        "cut_inside_member": data[: len(data) * 6 // 10 + 100],
        "header_overwritten": data[:20480] + b"\xff" * 1024 + data[21504:],
        "cut_at_sample_boundary": data[: members[30].offset],  # tarfile just stops here, no error
    }
    for name, blob in damaged.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(blob)
        skips = SkipCounter()
        samples = list(iter_shard_samples(str(path), skips, expected=50))
        assert 0 < len(samples) < 50, name
        # What comes back is intact: the first samples of the shard, in order, images decodable.
        assert [s["key"] for s in samples] == [f"fashion_mnist/train/{i:06d}" for i in range(len(samples))]
        assert all(_pixels(s["image"]).shape == (28, 28) for s in samples)
        assert skips.reasons["samples missing from shard"] == 1, name
        with pytest.raises(DataError):
            list(iter_shard_samples(str(path), expected=50))  # default policy: re-raise
    assert len(list(iter_shard_samples(str(tmp_path / "cut_at_sample_boundary.tar")))) == 10

    skips = SkipCounter()
    assert list(iter_shard_samples(str(tmp_path / "missing.tar"), skips)) == [] and skips.count >= 1

    # A whole split, checked against its index: intact -> all samples, no skips.
    skips = SkipCounter()
    assert len(list(iter_split_samples(cfg.shards_dir("train"), skips))) == 50 and skips.count == 0
    open(url, "wb").write(damaged["cut_inside_member"])
    with pytest.raises(DataError, match="train-000000.tar: damaged or unreadable tar"):
        list(iter_split_samples(cfg.shards_dir("train")))


# ------------------------------------------------------------------------------------------ Ray Data

def test_ray_read_webdataset_reads_the_shards(fmnist_dir, make_config, ray_session):
    import ray

    cfg = make_config("data.splits.train=60", "data.samples_per_shard=25")
    write_shards(cfg, "train")
    images = read_idx(os.path.join(fmnist_dir, "train-images-idx3-ubyte.gz"))
    # The folder as is: Ray skips `_shards.json` (files starting with "_" are not data).
    rows = ray.data.read_webdataset(cfg.shards_dir("train")).take_all()
    assert len(rows) == 60
    for row in rows:
        i = int(row["json"]["key"].rsplit("/", 1)[1])
        assert isinstance(row["cls"], int) and row["json"]["id"] == stable_id(row["json"]["key"])
        np.testing.assert_array_equal(row["png"], images[i])


# ------------------------------------------------------------------------------------------------ S3

def test_s3_shards_round_trip_via_s3fs_and_ray(fmnist_dir, make_config, s3_server, ray_session):
    import ray

    workdir = "s3://vmem-test/data-shards-test"
    cfg = make_config("data.splits.train=40", "data.samples_per_shard=16", workdir=workdir)
    report = write_shards(cfg, "train")
    out = cfg.shards_dir("train")
    assert report.counts == [16, 16, 8] and report.shards[0] == f"{out}/train-000000.tar"
    assert storage.listdir(out) == [INDEX_NAME, "train-000000.tar", "train-000001.tar", "train-000002.tar"]

    fs, _ = storage.filesystem(out)
    assert type(fs).__name__ == "S3FileSystem"
    with fs.open(report.shards[1], "rb") as f:  # the raw object is a plain tar
        assert tarfile.open(fileobj=f).getnames()[0] == "fashion_mnist__train__000016.cls"
    images = read_idx(os.path.join(fmnist_dir, "train-images-idx3-ubyte.gz"))
    samples = _read_all(shard_urls(out))
    assert [s["key"] for s in samples] == [f"fashion_mnist/train/{i:06d}" for i in range(40)]
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(_pixels(s["image"]), images[i])

    pa_fs, path = storage.pyarrow_filesystem(out)
    # Ray workers may have started before the S3 fixture set credentials: hand them the environment.
    env = storage.worker_env()
    rows = ray.data.read_webdataset(path, filesystem=pa_fs, runtime_env={"env_vars": env}).take_all()
    assert sorted(r["json"]["key"] for r in rows) == [s["key"] for s in samples]
    assert {r["cls"] for r in rows} == {s["label"] for s in samples}

    assert write_shards(cfg, "train").resumed


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_shards_help_and_run(fmnist_dir, tmp_path, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "WebDataset" in help_text and "vmem shards --config configs/demo.yaml" in help_text

    workdir = tmp_path / "cli"
    rc = main(["shards", f"workdir={workdir}", "data.splits.train=30", "data.splits.test=10",
               "data.samples_per_shard=20"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"train: 30 samples in 2 shards -> {workdir}/shards/train (0 skipped)" in out
    assert f"test: 10 samples in 1 shard -> {workdir}/shards/test (0 skipped)" in out
    assert json.loads((workdir / "shards" / "test" / INDEX_NAME).read_text())["total"] == 10

    rc = main(["shards", f"workdir={workdir}", "--split", "val"])
    assert rc == 1 and "data.splits.val=0" in capsys.readouterr().err

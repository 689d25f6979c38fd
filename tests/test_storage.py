"""pipeline.storage: atomic local writes (no temp files left, old content kept on failure) and S3 round-trips."""
from __future__ import annotations

import os

import pytest

from pipeline import storage


def _temp_files(folder) -> list:
    return [n for n in os.listdir(folder) if ".tmp-" in n]


def test_atomic_write_replaces_whole_and_leaves_no_temp_files(tmp_path):
    url = str(tmp_path / "sub" / "state.json")
    storage.atomic_write_json(url, {"version": 1})
    storage.atomic_write_json(url, {"version": 2, "items": [1, 2, 3]})
    assert storage.read_json(url) == {"version": 2, "items": [1, 2, 3]}
    storage.atomic_write_bytes(url + ".bin", b"\x00" * 100_000)
    assert storage.read_bytes(url + ".bin") == b"\x00" * 100_000
    assert sorted(os.listdir(tmp_path / "sub")) == ["state.json", "state.json.bin"]


def test_failed_replace_keeps_old_content_and_removes_temp(tmp_path, monkeypatch):
    url = str(tmp_path / "CURRENT")
    storage.atomic_write_json(url, {"version": 1})

    def crash(src, dst):  # the process "dies" between writing the temp file and the rename
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(storage.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        storage.atomic_write_json(url, {"version": 2})
    monkeypatch.undo()
    assert storage.read_json(url) == {"version": 1}
    assert _temp_files(tmp_path) == []


def test_failed_write_of_new_file_leaves_nothing(tmp_path, monkeypatch):
    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        storage.atomic_write_bytes(str(tmp_path / "new.bin"), b"abc")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_upload_file_local_and_listdir(tmp_path):
    src = tmp_path / "local.tar"
    src.write_bytes(b"tar bytes" * 1000)
    dest = str(tmp_path / "out" / "train-000000.tar")
    storage.upload_file(str(src), dest)
    assert storage.read_bytes(dest) == src.read_bytes() and src.exists()
    assert storage.listdir(str(tmp_path / "out")) == ["train-000000.tar"]
    assert storage.listdir(str(tmp_path / "missing")) == []
    fs, path = storage.pyarrow_filesystem(str(tmp_path / "out"))
    assert type(fs).__name__ == "LocalFileSystem" and path == str(tmp_path / "out")


def test_s3_round_trip(s3_server, tmp_path):
    base = "s3://vmem-test/storage-test"
    assert storage.is_remote(base) and not storage.is_remote(str(tmp_path))
    storage.atomic_write_json(storage.join(base, "a", "CURRENT"), {"version": 3})
    storage.atomic_write_json(storage.join(base, "a", "CURRENT"), {"version": 4})
    assert storage.read_json(f"{base}/a/CURRENT") == {"version": 4}

    src = tmp_path / "part.bin"
    src.write_bytes(os.urandom(200_000))
    storage.upload_file(str(src), f"{base}/a/part.bin")
    assert storage.read_bytes(f"{base}/a/part.bin") == src.read_bytes()
    assert storage.listdir(f"{base}/a") == ["CURRENT", "part.bin"]
    assert storage.exists(f"{base}/a/part.bin") and not storage.exists(f"{base}/a/nope")

    local = storage.local_copy(f"{base}/a/part.bin", cache_dir=str(tmp_path / "cache"))
    assert open(local, "rb").read() == src.read_bytes()

    pa_fs, path = storage.pyarrow_filesystem(f"{base}/a/part.bin")
    with pa_fs.open_input_file(path) as f:
        assert f.read() == src.read_bytes()

    storage.remove(f"{base}/a")
    assert storage.listdir(f"{base}/a") == []

"""Durable append-only logs (JSON lines) for tombstones and the delta.

Locally a log is one file: each `append` writes whole lines, flushes and fsyncs before returning, so an
acknowledged record survives a crash; a torn last line (a crash mid-append, never acknowledged) is ignored
by readers. On object stores (no append) each `append` is one new object under the log's prefix (one PUT is
atomic), read back in name order.
"""
from __future__ import annotations

import base64
import json
import os
import time
import uuid
from typing import Iterable, List, Tuple

import numpy as np

from pipeline import storage


def encode_vector(x: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(x, dtype=np.float32).tobytes()).decode()


def decode_vector(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=np.float32)


class AppendLog:
    """An append-only record log at `url` (a file locally, a prefix of objects on S3)."""

    def __init__(self, url: str):
        self.url = url
        self.remote = storage.is_remote(url)
        self._tail_checked = False

    def append(self, records: Iterable[dict]) -> None:
        """Append records durably: when this returns they are on stable storage."""
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        if not data:
            return
        if self.remote:
            storage.atomic_write_bytes(storage.join(self.url, f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"),
                                       data)
            return
        path = os.path.abspath(self.url)
        new = not os.path.exists(path)
        if new:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        elif not self._tail_checked:
            _drop_torn_tail(path)
        self._tail_checked = True
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:  # the file's directory entry must be durable too
            storage._fsync_dir(os.path.dirname(path))

    def read(self, since: int = 0) -> Tuple[List[dict], int]:
        """Records appended after position `since` and the new position (bytes locally, objects on S3)."""
        if self.remote:
            names = [n for n in storage.listdir(self.url) if n.endswith(".jsonl")]
            chunks = [storage.read_bytes(storage.join(self.url, n)) for n in names[since:]]
            return [r for c in chunks for r in _parse(c)[0]], len(names)
        path = os.path.abspath(self.url)
        if not os.path.exists(path):
            return [], since
        with open(path, "rb") as f:
            f.seek(since)
            data = f.read()
        records, used = _parse(data)
        return records, since + used

    def position(self) -> int:
        """The current end of the log (cheap: a stat locally)."""
        if self.remote:
            return len([n for n in storage.listdir(self.url) if n.endswith(".jsonl")])
        try:
            return os.path.getsize(os.path.abspath(self.url))
        except FileNotFoundError:
            return 0


def _drop_torn_tail(path: str) -> None:
    """Cut a partial last line (left by a crash mid-append) so the next record starts on its own line."""
    size = os.path.getsize(path)
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        f.seek(0)
        end = f.read().rfind(b"\n") + 1
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())


def _parse(data: bytes) -> Tuple[List[dict], int]:
    """Complete JSON lines in `data` and the number of bytes they span (a torn tail is left unread)."""
    end = data.rfind(b"\n") + 1
    out = []
    for line in data[:end].splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out, end

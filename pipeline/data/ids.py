"""Stable external ids: the same key gives the same positive int64 on every machine, in every process.

Python's `hash()` is salted per process, so ids come from blake2b instead. 63 bits keep the id positive in
an int64 column (faiss, Arrow, Parquet); -1 stays free for "no result".
"""
from __future__ import annotations

import hashlib

ID_BITS = 63
_MASK = (1 << ID_BITS) - 1


def stable_id(key: str) -> int:
    """A positive 63-bit integer derived from `key` (blake2b, 8-byte digest); deterministic everywhere."""
    if not isinstance(key, str):
        raise TypeError(f"stable_id expects a str key, got {type(key).__name__}")
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    # 0 would not be positive; mapping it to 1 costs nothing in practice (chance 2**-63).
    return (int.from_bytes(digest, "big") & _MASK) or 1

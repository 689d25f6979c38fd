"""Human units, parsed in one place: byte sizes ("64MiB", "16GiB", "2G", "1e9") and counts ("1e9", "5M").

`parse_bytes` reads KiB/MiB/GiB/TiB and the bare K/M/G/T (autofaiss's notation, "16G") as powers of 1024,
and KB/MB/GB/TB as powers of 1000. `format_bytes` prints binary units.
"""
from __future__ import annotations

import re
from typing import Union

from pipeline.errors import UserError

_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def _parse(value: Union[str, int, float], units: dict, what: str) -> int:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = _NUMBER.match(str(value))
    if not m or m.group(2).lower() not in units:
        raise UserError(f"cannot read {value!r} as {what}")
    return int(float(m.group(1)) * units[m.group(2).lower()])


def parse_bytes(value: Union[str, int, float]) -> int:
    """Bytes in `value`: an int, or a string such as "64MiB", "16GiB", "2G", "1e9"; raises UserError."""
    return _parse(value, _BYTE_UNITS, "a size in bytes: write e.g. 64MiB, 16GiB, 2G or 1e9")


def parse_count(value: Union[str, int, float]) -> int:
    """A count such as 1000000, "1e9", "5M", "20k"; raises UserError."""
    return _parse(value, _COUNT_UNITS, "a count: write e.g. 1000000, 1e9, 5M or 20k")


def format_bytes(n: float) -> str:
    """`n` bytes in the largest binary unit that keeps the number >= 1 (e.g. "1.5 GiB")."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def to_autofaiss(n_bytes: int) -> str:
    """A byte count in the notation autofaiss's `max_index_memory_usage` reads (it parses "...KB" as 2**10)."""
    return f"{max(1, n_bytes // 1024)}KB"

"""Tombstones: ids deleted since the last compaction, kept in a durable append-only log.

A delete is acknowledged only after its record is fsync'd; searches exclude the ids inside faiss (an
`IDSelectorNot(IDSelectorBatch)`), so a query still returns k live results. Compaction erases them.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from pipeline.memory.logs import AppendLog


class TombstoneSet:
    """The set of deleted ids recorded in one tombstone log (replayed on open, tailed on `catch_up`)."""

    def __init__(self, log_url: str):
        self.log = AppendLog(log_url)
        self._ids: set = set()
        self._array = np.zeros(0, dtype=np.int64)
        self.position = 0
        self.catch_up()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, i: int) -> bool:
        return int(i) in self._ids

    @property
    def ids(self) -> np.ndarray:
        """Sorted int64 array of the deleted ids."""
        return self._array

    def catch_up(self) -> int:
        records, self.position = self.log.read(self.position)
        new = [int(i) for r in records for i in r["ids"]]
        self._merge(new)
        return len(records)

    def _merge(self, ids: Iterable[int]) -> None:
        before = len(self._ids)
        self._ids.update(ids)
        if len(self._ids) != before:
            self._array = np.fromiter(sorted(self._ids), dtype=np.int64, count=len(self._ids))

    def add(self, ids: Iterable[int], reason: str = "delete") -> int:
        """Durably record `ids` as deleted; returns how many were not deleted before."""
        new = sorted({int(i) for i in ids} - self._ids)
        if new:
            self.log.append([{"ids": new, "reason": reason}])
            self.catch_up()
        return len(new)

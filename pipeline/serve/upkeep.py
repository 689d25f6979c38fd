"""Maintenance beside the service, never inside a request: a replica's background thread runs
`memory.maintain()` (state-table upkeep, then a compaction when an edit has made one due), so an add or
delete that crosses the compaction threshold answers in the time of an add or delete, and the compaction
still happens within seconds.

The thread starts with the replica's first write and then wakes when a write finishes (`poke`) and every
`INTERVAL_S` (edits may come from other replicas and processes). Several replicas may find the same compaction
due: the first to commit wins and the others step aside at commit (see `pipeline.memory.compaction`), so
nothing is done twice. Failures are logged as one warning and retried at the next wake-up; they never reach a
client.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from pipeline.memory.protocol import ServedMemory

log = logging.getLogger("vmem.serve")
INTERVAL_S = 5.0  # edits may come from other replicas and processes: look that often (cheap when idle)


class Upkeep:
    """The background compaction of one replica (see module docstring)."""

    def __init__(self, memory: ServedMemory, enabled: bool = True, interval_s: float = INTERVAL_S):
        # `enabled` False (no thread) only for apps that must not write on their own; the memory's
        # `memory.auto_compact` decides about compaction inside `maintain()`.
        self.memory, self.enabled, self.interval_s = memory, enabled, interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.runs = 0  # compactions this thread committed (tests and /metrics read it)
        self.last_error: Optional[str] = None
        self._thread: Optional[threading.Thread] = None
        self._starting = threading.Lock()

    def start(self) -> "Upkeep":
        with self._starting:
            if self.enabled and self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._loop, name="vmem-upkeep", daemon=True)
                self._thread.start()
        return self

    def poke(self) -> None:
        """A write finished: check soon whether maintenance is due (the thread starts with the first write:
        every process that writes maintains after its own writes, so a replica that only reads never does)."""
        self.start()
        self._wake.set()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop the thread, waiting up to `timeout_s` for a maintenance run in progress to finish."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.run_once()

    def run_once(self) -> Optional[dict]:
        """Maintain the memory now; returns the compaction report (None when none was due or another process
        committed first)."""
        try:
            t0 = time.perf_counter()
            done = self.memory.maintain()
            report = done["compaction"]
            if done["tables"]:
                log.info("state upkeep: %s", done["tables"])
            if report is not None:
                self.runs += 1
                log.info("background compaction (%s) committed v%s in %.2f s", done["why"], report.get("version"),
                         time.perf_counter() - t0)
            self.last_error = None
            return report
        except Exception as e:  # noqa: BLE001 - maintenance must never take the replica down
            self.last_error = f"{type(e).__name__}: {e}"
            log.warning("background compaction failed (retried at the next edit or in %.0f s): %s",
                        self.interval_s, self.last_error)
            return None

"""The state tables' upkeep after this process's own writes, in a background thread of the memory itself.

Every edit is one small commit (one fragment), and Lance looks a row up in every fragment the id index does
not cover yet: a script that adds 1,000 items one by one through the Python API, with nobody maintaining the
tables, saw its adds go from 16 ms to 104 ms p50 (`benchmarks/edit_soak.py --no-upkeep` shows the same). So the
memory schedules `MemoryState.maintain()` (merge small fragments, index new rows, drop old versions: cheap when
nothing is due) itself: every `EVERY` writes of this process, off the writer's path, in one daemon thread
that starts with the first write (a process that only reads never runs it). Compaction of the shards is not
done here: it is heavier and has its own schedulers (the server's `serve.upkeep`, the CLI after an edit,
`VisualMemory.maintain()`).
"""
from __future__ import annotations

import atexit
import logging
import threading
import weakref
from typing import Optional

log = logging.getLogger("vmem.memory")

EVERY = 16  # writes of this process between two upkeep checks (each check is a few version look-ups)

# Upkeeps whose thread runs. A daemon thread still inside Lance's native code while the interpreter finalizes
# aborts the process (SIGABRT, exit 134: seen in a script that made 1,000 adds and exited without `close()`),
# so at exit every running upkeep is stopped and joined first. Weak: a memory nobody holds is not kept alive.
_RUNNING: "weakref.WeakSet[TableUpkeep]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for upkeep in list(_RUNNING):
        upkeep.close()


class TableUpkeep:
    """Runs `state.maintain()` in the background after every `every` writes (see module docstring)."""

    def __init__(self, state, every: int = EVERY):
        self.state, self.every = state, int(every)
        self.writes = 0
        self.runs = 0  # upkeep checks run (tests read it)
        self.last_error: Optional[str] = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def wrote(self) -> None:
        """One write of this process committed: maybe time for upkeep (never waits for it)."""
        with self._lock:
            self.writes += 1
            if self.writes % self.every or self._stop.is_set():
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="vmem-table-upkeep", daemon=True)
                self._thread.start()
                _RUNNING.add(self)
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                done = self.state.maintain()
                if done:
                    log.debug("state upkeep: %s", done)
                self.last_error = None
            except Exception as e:  # noqa: BLE001 - upkeep only saves time; an edit never fails because of it
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("state-table upkeep failed (retried after the next %d writes): %s", self.every,
                            self.last_error)
            self.runs += 1

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the thread, letting an upkeep in progress finish (its commits are atomic either way)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

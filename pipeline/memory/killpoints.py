"""Kill points for the crash tests: `VMEM_COMPACT_HANG_AT=<step>` makes a compaction or erasure write
`<memory>/.hang-<step>` and sleep at that step, so a test can SIGKILL the process exactly there."""
from __future__ import annotations

import os
import time

from pipeline import storage

HANG_ENV = "VMEM_COMPACT_HANG_AT"


def hang_point(memory_dir: str, step: str) -> None:
    """Sleep forever at `step` when the environment asks for it (tests only); return at once otherwise."""
    if os.environ.get(HANG_ENV) == step:
        storage.atomic_write_bytes(storage.join(memory_dir, f".hang-{step}"), b"")
        while True:
            time.sleep(1)

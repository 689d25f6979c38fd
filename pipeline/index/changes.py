"""The change token: one small object a reader checks instead of polling every table and the manifest.

Every commit that changes what a query may see (a state table's edit, a manifest) is followed by `bump`,
which writes a fresh random token to `<memory>/CHANGED` before the writer acknowledges. A reader keeps the
token it read *before* its last full poll of the versions; while the token is unchanged, nothing was
acknowledged since that poll, so the snapshot it has is current and the query skips the poll (one stat and
a 40-byte read locally, one GET on S3, instead of four table listings and the manifest probe).

Why this is safe without a lock: a writer commits, then bumps, then answers. A query that starts after the
answer reads the new token (or a later one), which differs from any token read before the bump, so it polls
and sees the commit. Two writers bumping at once leave one of their tokens: both differ from what readers
held. A writer killed between its commit and its bump never acknowledged that edit; the follower's periodic
full poll (`memory.snapshot.FULL_POLL_S`) picks it up, and so does the next writer's bump.

The token is a hint, not a record: it is written without fsync (a lost token after a power cut only costs
the readers one full poll) and nothing is ever decided from its content except "same as before or not".
"""
from __future__ import annotations

import os
import uuid
from typing import Optional

from pipeline import storage

CHANGED = "CHANGED"


def token_url(memory_dir: str) -> str:
    return storage.join(memory_dir, CHANGED)


def bump(memory_dir: str) -> None:
    """Publish a new token: call after a commit readers must see, before acknowledging it."""
    storage.write_hint(token_url(memory_dir), f"{os.getpid()}-{uuid.uuid4().hex}".encode())


def read(memory_dir: str) -> Optional[bytes]:
    """The current token (None where no writer has bumped one yet: readers then poll every time)."""
    return storage.read_hint(token_url(memory_dir))

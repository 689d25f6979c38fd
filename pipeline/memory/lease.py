"""Leases, not locks: an exclusive role (the memory's eraser; a build's commit) held by one process at a time,
taken over in seconds when its holder died, on local disk and on S3 alike.

A lease lives in a folder of its own as a sequence of generation files `lease-<gen>.json`, each created
exclusively (`storage.create_exclusive`: a hard link locally, a conditional PUT on S3). The file with the
highest generation is the lease; it names its owner (host, pid, the pid's start time, a random token) and
when it expires. So every transition is one exclusive create, and two contenders never both win:
  - free (no file, or the newest one says `released`) -> create generation g+1;
  - held by a dead process (same host: `os.kill(pid, 0)` fails, or the pid now belongs to a process started
    at another time, i.e. a reused pid), or whose renewal was missed (`expires` in the past, any host)
    -> create generation g+1: exactly one contender creates it, the others see it held;
  - held and alive -> not acquired (the caller defers or waits).
The holder renews by rewriting its own generation file (nobody else ever writes that name) from a background
thread every `renew_s`; before each renewal, and whenever the holder calls `check()`, it looks for generation
g+1: if someone took over (or the holder itself failed to renew before `expires`), the lease is lost and
`check()` raises `LeaseLost`, so the old holder stops before its next step. Older generation files are
removed by the next holder. A holder paused longer than the lease (a stopped VM) may run one step after it
was taken over; that is why the steps done under a lease are idempotent (erasure re-does its work and
verifies it).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional, Tuple

from pipeline import storage

log = logging.getLogger("vmem.lease")

LEASE_S = 30.0  # a holder that misses its renewals for this long is taken over (other hosts)
RENEW_S = 10.0
_PREFIX, _SUFFIX = "lease-", ".json"


class LeaseLost(RuntimeError):
    """The lease was taken over (or could not be renewed in time): the holder must stop its work now."""


class LeaseHeld(RuntimeError):
    """`wait` gave up: another live process holds the lease."""


def process_start(pid: int) -> Optional[str]:
    """The start time of process `pid` (clock ticks since boot, from /proc), or None where unknown; with the
    pid it names one process for good (a reused pid has another start time)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None  # field 22 of the line (starttime)


def pid_alive(pid: int, start: Optional[str]) -> bool:
    """Whether the process `pid` started at `start` still runs on this host."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    now = process_start(int(pid))
    return start is None or now is None or now == start


def stale_reason(rec: dict, now: Optional[float] = None) -> Optional[str]:
    """Why the lease record `rec` may be taken over (None: its holder is alive and renewing)."""
    now = time.time() if now is None else now
    if rec.get("released"):
        return "released"
    if rec.get("host") == socket.gethostname() and not pid_alive(rec.get("pid", -1), rec.get("start")):
        return f"holder pid {rec.get('pid')} on this host is dead"
    if float(rec.get("expires", 0)) < now:
        return f"holder {rec.get('host')}:{rec.get('pid')} missed its renewal (expired {now - rec['expires']:.0f} s ago)"
    return None


def describe(rec: dict) -> str:
    left = float(rec.get("expires", 0)) - time.time()
    return f"{rec.get('role', 'holder')} {rec.get('host')}:{rec.get('pid')} since " \
           f"{time.strftime('%H:%M:%S', time.localtime(rec.get('since', 0)))}, lease {left:.0f} s left"


def _name(gen: int) -> str:
    return f"{_PREFIX}{gen:010d}{_SUFFIX}"


def _generations(folder: str) -> list:
    out = []
    for n in storage.listdir(folder):
        if n.startswith(_PREFIX) and n.endswith(_SUFFIX):
            try:
                out.append(int(n[len(_PREFIX):-len(_SUFFIX)]))
            except ValueError:
                continue
    return sorted(out)


def current(folder: str) -> Tuple[int, Optional[dict]]:
    """(generation, record) of the newest lease file in `folder`; (0, None) when there is none."""
    gen, rec, _ = _current(folder)
    return gen, rec


def _current(folder: str) -> Tuple[int, Optional[dict], list]:
    for _ in range(5):
        gens = _generations(folder)
        if not gens:
            return 0, None, []
        try:
            return gens[-1], storage.read_json(storage.join(folder, _name(gens[-1]))), gens
        except FileNotFoundError:
            continue  # removed by a newer holder between the listing and the read: list again
        except ValueError:
            return gens[-1], {"expires": 0}, gens  # unreadable (a torn foreign write): treat as expired
    return 0, None, []


class Lease:
    """A held lease; renewed from a daemon thread until `release()`. Use as a context manager."""

    def __init__(self, folder: str, gen: int, record: dict, lease_s: float, renew_s: float):
        self.folder, self.gen, self.record = folder, gen, record
        self.lease_s, self.renew_s = lease_s, renew_s
        self.url = storage.join(folder, _name(gen))
        self._lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{gen}", daemon=True)
        self._thread.start()

    @property
    def token(self) -> str:
        return self.record["token"]

    def _successor(self) -> bool:
        return storage.exists(storage.join(self.folder, _name(self.gen + 1)))

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            self.renew()

    def renew(self) -> bool:
        """Extend the lease by `lease_s` (False, and the lease is lost, if it was taken over or had expired)."""
        if self._lost:
            return False
        try:
            if self._successor():
                self._lost = "taken over by another process"
                return False
            if time.time() > float(self.record["expires"]):
                self._lost = "not renewed before it expired"
                return False
            rec = dict(self.record, expires=time.time() + self.lease_s)
            storage.atomic_write_bytes(self.url, json.dumps(rec).encode())
            self.record = rec
            return True
        except Exception as e:  # a storage hiccup: the next renewal tries again, expiry decides
            log.warning("lease %s: renewal failed (%s); retrying", self.url, e)
            return not self._lost

    def check(self) -> None:
        """Raise `LeaseLost` unless this process still holds the lease (call it before every step)."""
        if not self._lost and (self._successor() or time.time() > float(self.record["expires"])):
            self._lost = "taken over by another process" if self._successor() else "expired"
        if self._lost:
            raise LeaseLost(f"lease {self.url} lost: {self._lost}")

    def release(self) -> None:
        """Give the lease up (the next `acquire` takes it at once). Safe to call twice or after it was lost."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._lost or self.record.get("released"):
            return
        try:
            if not self._successor():
                rec = dict(self.record, released=True, expires=0)
                storage.atomic_write_bytes(self.url, json.dumps(rec).encode())
                self.record = rec
        except Exception as e:  # it expires by itself
            log.warning("lease %s: release failed (%s); it expires in %.0f s", self.url, e, self.lease_s)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(folder: str, role: str = "holder", lease_s: float = LEASE_S, renew_s: float = RENEW_S,
            now: Optional[float] = None) -> Tuple[Optional[Lease], Optional[dict]]:
    """Take the lease in `folder` if it is free or its holder is dead/expired: (Lease, None); else
    (None, the live holder's record). Never blocks; safe against any number of concurrent contenders."""
    for _ in range(20):
        gen, rec, gens = _current(folder)
        if rec is not None and stale_reason(rec, now) is None:
            return None, rec
        if rec is not None:
            log.info("lease %s: taking over (%s)", folder, stale_reason(rec, now))
        t = time.time()
        mine = {"role": role, "host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
                "token": uuid.uuid4().hex, "since": t, "expires": t + lease_s}
        try:
            storage.create_exclusive(storage.join(folder, _name(gen + 1)), json.dumps(mine).encode())
        except storage.AlreadyExists:
            continue  # another contender won generation gen+1: look at it
        for old in gens:  # older generations are dead records: tidy them
            try:
                storage.remove(storage.join(folder, _name(old)))
            except (FileNotFoundError, OSError):
                pass
        return Lease(folder, gen + 1, mine, lease_s, renew_s), None
    _, rec = current(folder)
    return None, rec


def wait(folder: str, role: str, timeout_s: float, lease_s: float = LEASE_S, renew_s: float = RENEW_S,
         poll_s: float = 0.2) -> Lease:
    """`acquire`, retrying for up to `timeout_s` while a live holder keeps it; raises `LeaseHeld` naming it."""
    deadline = time.time() + timeout_s
    while True:
        lease, holder = acquire(folder, role, lease_s, renew_s)
        if lease is not None:
            return lease
        if time.time() > deadline:
            raise LeaseHeld(f"the lease {folder} is held by {describe(holder or {})} (alive and renewing) for "
                            f"over {timeout_s:.0f} s")
        time.sleep(poll_s)

"""Leases (pipeline/memory/lease.py): one holder at a time under races, a dead holder taken over at once, a
silent one after its lease, a taken-over holder told so; local disk and the S3 test server."""
import json
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import uuid

import pytest

from pipeline import storage
from pipeline.memory import lease


def _folder(tmp_path, where):
    return str(tmp_path / "lease") if where == "local" else f"s3://vmem-test/lease-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "s3":
        request.getfixturevalue("s3_server")
    return _folder(tmp_path, request.param)


def test_one_holder_then_release_lets_the_next_in(folder):
    a, _ = lease.acquire(folder, "a")
    assert a is not None
    b, holder = lease.acquire(folder, "b")
    assert b is None and holder["pid"] == os.getpid() and holder["token"] == a.token
    a.check()
    a.release()
    b, _ = lease.acquire(folder, "b")
    assert b is not None and b.gen == a.gen + 1
    b.release()


def _plant(folder, gen, **rec):
    base = {"role": "x", "host": socket.gethostname(), "pid": os.getpid(), "start": lease.process_start(os.getpid()),
            "token": uuid.uuid4().hex, "since": time.time(), "expires": time.time() + 30}
    storage.create_exclusive(storage.join(folder, f"lease-{gen:010d}.json"), json.dumps({**base, **rec}).encode())


def test_racing_contenders_for_a_dead_lease_exactly_one_wins(folder):
    """Many threads try to take over the same stale lease at once, round after round: one winner per round."""
    for rnd in range(5):
        gen = lease.current(folder)[0]
        _plant(folder, gen + 1, host="elsewhere", expires=time.time() - 1)  # a missed renewal
        won, barrier = [], threading.Barrier(6)

        def contend():
            barrier.wait()
            got, _ = lease.acquire(folder, "c", renew_s=60)
            if got is not None:
                won.append(got)

        threads = [threading.Thread(target=contend) for _ in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(won) == 1, f"round {rnd}: {len(won)} winners"
        won[0].release()


def test_a_live_holder_elsewhere_is_not_taken_over_before_it_expires(folder):
    _plant(folder, 1, host="elsewhere", pid=1, start=None, expires=time.time() + 30)
    got, holder = lease.acquire(folder, "me")
    assert got is None and holder["host"] == "elsewhere"
    got, _ = lease.acquire(folder, "me", now=time.time() + 31)  # once its renewal is missed
    assert got is not None
    got.release()


def test_reused_pid_is_a_dead_holder(tmp_path):
    folder = str(tmp_path / "l")
    _plant(folder, 1, start="1")  # our own pid, but another start time: the holder was a process before us
    got, _ = lease.acquire(folder, "me")
    assert got is not None
    got.release()


def _hold_forever(folder, ready):
    held, _ = lease.acquire(folder, "doomed", renew_s=0.2)
    assert held is not None
    ready.set()
    time.sleep(600)


def test_a_killed_holder_is_taken_over_at_once(tmp_path):
    folder = str(tmp_path / "l")
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_forever, args=(folder, ready))
    p.start()
    assert ready.wait(60)
    assert lease.acquire(folder, "me")[0] is None  # alive: held
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    got, _ = lease.acquire(folder, "me")  # its lease has ~30 s left, but its pid is dead on this host
    assert got is not None
    got.release()


def test_renewal_extends_and_a_taken_over_holder_learns_it(tmp_path):
    folder = str(tmp_path / "l")
    a, _ = lease.acquire(folder, "a", lease_s=2.0, renew_s=0.1)
    first = a.record["expires"]
    deadline = time.time() + 10
    while a.record["expires"] <= first and time.time() < deadline:
        time.sleep(0.05)
    assert a.record["expires"] > first  # the background thread renewed it
    # Another host's process takes over after a (simulated) missed renewal: `a` must stop at its next check.
    b, _ = lease.acquire(folder, "b", now=time.time() + 60)
    assert b is not None
    with pytest.raises(lease.LeaseLost):
        a.check()
    a.release()  # does not touch b's lease
    assert lease.acquire(folder, "c")[0] is None
    b.release()


def test_wait_names_the_live_holder(tmp_path):
    folder = str(tmp_path / "l")
    a, _ = lease.acquire(folder, "erasure")
    with pytest.raises(lease.LeaseHeld, match=f"erasure {socket.gethostname()}:{os.getpid()}"):
        lease.wait(folder, "build", timeout_s=0.3)
    a.release()
    lease.wait(folder, "build", timeout_s=0.3).release()

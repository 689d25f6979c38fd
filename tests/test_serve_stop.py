"""`vmem serve` as users run it (a subprocess: HAProxy on serve.port, 2 ingress replicas, shard deployments):
a delete acknowledged through one connection is in no answer on any later connection, whichever replica
HAProxy picks; and it stops cleanly: SIGTERM or SIGINT ends it within seconds, without a native stack dump,
and no process it started is left in the process table: none of its Ray session (raylet, GCS, agents,
workers), no HAProxy, no Python multiprocessing `forkserver` / `resource_tracker` (Ray's dashboard starts
those; they were seen orphaned to init after a stop). Every process started from `vmem serve` inherits its
environment, so the test marks that environment and looks for the mark, whatever a process is called and
whoever its parent is by then."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP_WITHIN_S = 30  # Serve's grace (5 s) + Ray's shutdown + the sweep of leftovers (<= 6 s), on 2 busy cores
LEFT_WITHIN_S = 10  # after `vmem serve` exited: what its stop signalled may still be exiting
MARK = "VMEM_TEST_STOP_MARK"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_naming(text: str) -> list:
    """(pid, cmdline) of live processes whose command line contains `text` (a Ray session name, a directory)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if text in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append((p.info["pid"], cmd[:120]))
    return out


def processes_marked(mark: str) -> list:
    """(pid, ppid, cmdline) of live processes whose environment has MARK=mark (inherited from `vmem serve`)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline", "status"]):
        try:
            if p.environ().get(MARK) == mark and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append((p.info["pid"], p.info["ppid"], " ".join(p.info["cmdline"] or [])[:120]))
        except psutil.Error:  # exited meanwhile, or not ours to read
            continue
    return out


def haproxy_dir_of(pids: list) -> str:
    """The per-server HAProxy directory (`/tmp/vmem-haproxy-*`) in the command line of one of `pids`."""
    import re

    import psutil

    for pid in pids:
        try:
            m = re.search(r"\S*vmem-haproxy-[^/\s]+", " ".join(psutil.Process(pid).cmdline()))
        except psutil.Error:  # exited meanwhile (HAProxy replaces itself on reloads)
            continue
        if m:
            return m.group(0)
    raise AssertionError("no HAProxy under `vmem serve` (serve.direct_ingress is the default)")


def session_of(pid: int) -> str:
    """The Ray session name (session_<date>_<pid>) in the command line of one of `pid`'s descendants."""
    import re

    import psutil

    for child in psutil.Process(pid).children(recursive=True):
        m = re.search(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+", " ".join(child.cmdline()))
        if m:
            return m.group(0)
    raise AssertionError("no Ray process under `vmem serve`")


def test_stop_owned_processes_ends_what_carries_the_token_and_nothing_else():
    """The sweep after Ray's shutdown: a process with the token that exits on SIGTERM, one that ignores it
    (SIGKILL then), both in sessions of their own as orphans are; a process without the token is left alone."""
    from pipeline.serve.server import OWNER_ENV, owned_processes, stop_owned_processes

    token = f"test-{uuid.uuid4().hex}"
    sleeper = [sys.executable, "-c", "import signal, sys, time\n"
               "if sys.argv[1] == 'ignore': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
               "print('ready', flush=True); time.sleep(120)"]
    procs = []
    try:
        for how, env_token in (("exit", token), ("ignore", token), ("exit", "someone-else")):
            procs.append(subprocess.Popen(sleeper + [how], env={**os.environ, OWNER_ENV: env_token},
                                          stdout=subprocess.PIPE, text=True, start_new_session=True))
        for p in procs:
            assert p.stdout.readline().strip() == "ready"  # SIG_IGN is in place
        ours = sorted(p.pid for p in procs[:2])
        assert sorted(owned_processes(token)) == ours
        assert sorted(stop_owned_processes(token, wait_s=0.2, term_s=1.0)) == ours
        assert owned_processes(token) == []
        assert procs[0].wait(5) == -signal.SIGTERM and procs[1].wait(5) == -signal.SIGKILL
        assert procs[2].poll() is None, "a process without the token was stopped"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow  # starts Ray: ~40-90 s each on 2 busy cores
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_vmem_serve_stops_cleanly(sig, tmp_path):
    import httpx
    import psutil

    from pipeline.config import load_config
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters

    port = free_port()
    # Shard deployments forced on: a query below also checks `vmem serve`'s own settings reach the ingress's
    # calls to the shard handles.
    overrides = [f"workdir={tmp_path}/work", f"serve.port={port}", "ray.num_cpus=2",
                 "serve.local_search_max_items=-1", "serve.ingress_replicas=2"]
    cfg = load_config(None, overrides)
    data = make_clusters(200, dim=8)
    build_synthetic_memory(cfg.memory_dir, data, num_shards=2, index_key="IVF4,Flat")
    mark = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": ROOT, "VMEM_TOKEN": "stop-token", MARK: mark}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, f"vmem serve exited early:\n{proc.stdout.read()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "vmem serve did not answer within 240 s"
            time.sleep(1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"embedding": data.xb[0].tolist(), "k": 3},
                       timeout=60)
        assert r.status_code == 200 and r.json()["neighbors"][0]["id"] == int(data.ids[0]), r.text
        r = httpx.post(f"http://127.0.0.1:{port}/v1/delete", json={"ids": [int(data.ids[0])]},
                       headers={"Authorization": "Bearer stop-token"}, timeout=60)
        assert r.status_code == 200 and r.json()["deleted"] == 1, r.text
        for _ in range(12):  # a new connection each: HAProxy spreads them over both ingress replicas
            r = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"embedding": data.xb[0].tolist(), "k": 3},
                           timeout=60)
            assert r.status_code == 200 and int(data.ids[0]) not in [n["id"] for n in r.json()["neighbors"]], r.text
        session = session_of(proc.pid)
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert processes_naming(session), "expected Ray processes while serving"
        # serve.direct_ingress (the default): HAProxy answers serve.port, and must stop with the rest. It
        # re-executes itself on each config reload, so it is followed by its config directory, not its pid.
        haproxy_dir = haproxy_dir_of(family)
        t0 = time.time()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=STOP_WITHIN_S)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    assert took < STOP_WITHIN_S
    for dump in ("*** SIGTERM received", "Stack trace", "Fatal Python error", "Traceback"):
        assert dump not in out, out[-3000:]
    deadline = time.time() + LEFT_WITHIN_S
    while True:
        left = processes_marked(mark) + processes_naming(session) + processes_naming(haproxy_dir) + [
            (p, "descendant") for p in family if psutil.pid_exists(p) and psutil.Process(p).status() !=
            psutil.STATUS_ZOMBIE]
        if not left or time.time() > deadline:
            break
        time.sleep(0.5)
    for pid in {row[0] for row in left}:  # leave the machine clean for the next test even when this one fails
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"processes of `vmem serve` left {LEFT_WITHIN_S} s after it exited on {sig.name}: {left}"
    assert not os.path.exists(haproxy_dir), "HAProxy's directory was left behind"

"""Across nodes (issue 19, item 5): `vmem build` against a 2-node Ray cluster spreads the shard population.

Two Ray nodes on loopback (`ray start --head` + `ray start --address`, one CPU each, every port chosen free so
other Ray instances on this machine are untouched), `vmem build ray.address=...` with 2 shards: each
populate task holds one CPU, so the two tasks can only run at once on different nodes; the shards' done files
record the node each task ran on, and the test asserts two distinct nodes, both members of the cluster.

The cluster is stopped in a `finally` by killing exactly the processes it started (found by the test's own
temp dir in their command lines, plus their children): `ray stop` would stop every Ray instance of this user,
the other tests' and other people's included.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
VMEM = os.path.join(os.path.dirname(sys.executable), "vmem")


def _free_ports(k: int):
    socks, ports = [], []
    for _ in range(k):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _worker_range(taken: set, width: int = 60) -> int:
    """The low end of `width + 1` consecutive ports that are free now and overlap none of `taken`.

    Ray refuses to start when its worker-port range covers a port it was given for another component, so the
    range is chosen after (and away from) every other port of the cluster."""
    for lo in range(20000, 60000 - width, width + 1):
        if taken.isdisjoint(range(lo, lo + width + 1)) and _range_free(lo, width):
            return lo
    raise RuntimeError("no free worker-port range")


def _range_free(lo: int, width: int) -> bool:
    for port in range(lo, lo + width + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _node_ports(taken: set) -> list:
    """Every port a Ray node opens by default at a fixed number, chosen free and outside `taken` (every port
    already handed to a component of this cluster, which is updated): two nodes share one host."""
    p = [q for q in _free_ports(12) if q not in taken][:6]
    taken.update(p)
    lo = _worker_range(taken)
    taken.update(range(lo, lo + 61))
    return ["--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
            "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port", str(p[3]),
            "--metrics-export-port", str(p[4]), "--runtime-env-agent-port", str(p[5]),
            "--min-worker-port", str(lo), "--max-worker-port", str(lo + 60)]


def _ray_start(env: dict, taken: set, *args: str) -> None:
    r = subprocess.run([RAY, "start", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
                        *args, *_node_ports(taken)], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"ray start {' '.join(args)} failed:\n{(r.stdout + r.stderr)[-3000:]}"


def _stop_cluster(marker: str) -> None:
    """Terminate the processes whose command line names `marker` (our temp dir) and their children."""
    import psutil

    me = psutil.Process()
    spare = {me.pid} | {p.pid for p in me.parents()}  # this process may name the marker too
    procs = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid not in spare and any(marker in a for a in (p.info["cmdline"] or [])):
                procs[p.pid] = p
                for c in p.children(recursive=True):
                    procs[c.pid] = c
        except psutil.Error:
            continue
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _write_embeddings(emb_dir: str, n: int = 4000, dim: int = 16) -> None:
    from pipeline.embed.parts import to_table, write_part
    from pipeline.memory.synthetic import make_clusters

    d = make_clusters(n, dim=dim, num_classes=5, seed=3)
    os.makedirs(emb_dir, exist_ok=True)
    for p, start in enumerate(range(0, n, 1000)):
        sl = slice(start, start + 1000)
        meta = {"id": d.ids[sl], "key": d.keys[sl], "label": d.labels[sl],
                "label_name": [f"class_{l}" for l in d.labels[sl]], "source": ["t"] * 1000, "shard": [""] * 1000}
        write_part(to_table(meta, d.xb[sl]), os.path.join(emb_dir, f"part-{p:05d}.parquet"))


@pytest.mark.slow
def test_build_populates_shards_on_both_nodes(tmp_path):
    # Ray's session files; also the marker of every process this test starts. Short and under /tmp: Ray's
    # sockets live in it and a Unix socket path may not exceed 107 bytes (pytest's tmp_path is too deep).
    temp = tempfile.mkdtemp(prefix="vmr", dir="/tmp")
    # Ray 2.5x turns token authentication on for clusters `ray start` makes; both nodes and the driver here are
    # one user's processes on loopback, so it is off (else the second node needs the head's token file).
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONPATH=ROOT)
    workdir = str(tmp_path / "work")
    _write_embeddings(os.path.join(workdir, "embeddings", "train"))
    port, client_port = _free_ports(2)
    taken = {port, client_port}
    address = f"127.0.0.1:{port}"
    try:
        _ray_start(env, taken, "--head", "--port", str(port), "--ray-client-server-port", str(client_port),
                   "--temp-dir", temp, "--include-dashboard", "false")
        _ray_start(env, taken, "--address", address, "--temp-dir", temp)
        nodes = _alive_nodes(address, env)
        assert len(nodes) == 2, nodes
        r = subprocess.run([VMEM, "build", f"workdir={workdir}", f"ray.address={address}",
                            "index.num_shards=2", "index.index_key=IVF8,Flat", "index.recall_queries=50"],
                           env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        done = sorted((tmp_path / "work").glob("**/shards/v*/shard-*.done.json"))
        assert len(done) == 2, done
        ran_on = [json.loads(p.read_text())["node"] for p in done]
        assert set(ran_on) <= set(nodes), (ran_on, nodes)
        assert len(set(ran_on)) == 2, f"both shards were populated on one node: {ran_on}"
        counts = [json.loads(p.read_text())["entry"]["count"] for p in done]
        assert sum(counts) == 4000 and min(counts) > 0
    finally:
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _alive_nodes(address: str, env: dict, wait_s: float = 60) -> list:
    """Node ids of the live nodes of the cluster at `address` (asked from a separate driver process)."""
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % address)
    deadline = time.time() + wait_s
    while True:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        nodes = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else []
        if len(nodes) >= 2 or time.time() > deadline:
            return nodes
        time.sleep(2)

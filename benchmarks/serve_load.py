"""`vmem serve` against a plain one-process FastAPI + faiss service (benchmarks/serve_peer.py), one run.

Both serve the same synthetic memory (clustered unit vectors; by default the demo's shape: 20k x 1280,
IVF512,SQ8, nprobe 16, 2 shards) and get the same requests: `POST /v1/classify {"embedding": [...], "k": 10}`
from C concurrent clients for T seconds. Printed per client count: QPS, p50, p99, and vmem/peer ratios; the two servers run at the same
time and take turns in short slices, so that other load on the machine falls on both alike.
Each load runs with both client kinds (`--connections`): kept-alive connections, and a new TCP connection per
request (`Connection: close`), as curl and scripts do. Then the same load on `vmem serve` with edits mid-load: 10% of the items deleted, a compaction, HTTP adds,
and a second writer process adding items straight into the memory; it must end with 0 errors and every
acknowledged add present (the script exits 1 otherwise). Finally `vmem serve` gets SIGTERM; the time it
takes to exit is printed.

  .venv/bin/python benchmarks/serve_load.py                       # the demo's shape, 10 s per run
  .venv/bin/python benchmarks/serve_load.py --items 5000 --dim 64 --index IVF64,Flat --seconds 4

The load generator shares the machine with the servers; the ratio is fair because both face it alike.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before answering")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


async def load(base: str, bodies: list, clients: int, seconds: float, during=None, fresh: bool = False) -> dict:
    """`clients` concurrent loops posting classify requests for `seconds`; `during(http)` runs alongside.
    `fresh`: every request on a new TCP connection (`Connection: close`, no keep-alive pool), as curl, shell
    scripts and many HTTP libraries do; else kept-alive connections."""
    import httpx

    lat, errors = [], []
    stop = time.perf_counter() + seconds
    headers = {"content-type": "application/json", **({"connection": "close"} if fresh else {})}

    async def client(c: int, http: "httpx.AsyncClient"):
        i = c
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/classify", content=bodies[i % len(bodies)], headers=headers)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
            except Exception as e:  # noqa: BLE001 - a transport error is an error to report, not a crash
                errors.append(repr(e))
            lat.append(time.perf_counter() - t0)
            i += clients

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0 if fresh else None)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as h:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client(c, h)) for c in range(clients)]
        extra = await during(h, stop) if during is not None else None
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "qps": len(lat) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "errors": len(errors), "error_examples": errors[:3],
            "during": extra, "lat": np.array(lat), "wall": wall}


def merge(runs: list) -> dict:
    """One result from several runs of the same load (QPS over the summed time, percentiles over all)."""
    lat = np.concatenate([r["lat"] for r in runs]) * 1000
    wall = sum(r["wall"] for r in runs)
    return {"requests": len(lat), "qps": len(lat) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": sum(r["errors"] for r in runs),
            "error_examples": [e for r in runs for e in r["error_examples"]][:3]}


def compare(peer: str, vmem: str, bodies: list, clients: list, seconds: float, rounds: int,
            kinds: list) -> dict:
    """Both servers under the same loads, alternating in `rounds` slices so that the machine's other load
    falls on both alike; returns {(connection kind, clients): {"peer": result, "vmem": result}}."""
    for base in (peer, vmem):
        asyncio.run(load(base, bodies, 2, min(3.0, seconds)))  # warm-up
    out = {}
    for kind in kinds:
        for c in clients:
            runs = {"peer": [], "vmem": []}
            for _ in range(rounds):
                for name, base in (("peer", peer), ("vmem", vmem)):
                    runs[name].append(asyncio.run(load(base, bodies, c, seconds / rounds, fresh=kind == "new")))
            out[kind, c] = {name: merge(r) for name, r in runs.items()}
    return out


def vmem_cmd(*args: str) -> list:
    return [sys.executable, "-m", "pipeline.cli", *args]


def writer(memory_dir_cfg: str, out: str, seconds: float, dim: int) -> None:
    """The second writer process: adds items straight into the memory until `seconds` pass; each
    acknowledged id is appended to `out` (one per line) only after `add` returned."""
    from pipeline.config import load_config
    from pipeline.memory import VisualMemory

    cfg = load_config(None, json.loads(memory_dir_cfg))
    mem = VisualMemory.open(cfg.memory_dir, cfg=cfg)
    rng = np.random.default_rng(7)
    stop, n = time.time() + seconds, 0
    with open(out, "a") as f:
        while time.time() < stop:
            x = rng.standard_normal((1, dim)).astype(np.float32)
            x /= np.linalg.norm(x)
            ids = mem.add(embeddings=x, labels=[1], keys=[f"writer2-{n}"], sources=["writer2"])
            f.write(f"{int(ids[0])}\n")
            f.flush()
            n += 1
            time.sleep(0.05)


def edits_during(base: str, data, seconds: float, overrides: list, dim: int, tmp: str):
    """The coroutine run beside the load: deletes, HTTP adds, a compaction and a second writer process."""
    async def during(h, stop):
        acked, report = [], {}
        dead = data.ids[: len(data.ids) // 10].tolist()
        r = await h.post("/v1/delete", json={"ids": dead}, headers=AUTH, timeout=300)
        report["delete"] = r.status_code
        out = os.path.join(tmp, "writer2.ids")
        proc = subprocess.Popen([sys.executable, __file__, "--writer", json.dumps(overrides), out,
                                 str(seconds * 0.8), str(dim)], cwd=ROOT)
        await asyncio.sleep(seconds / 4)
        t0 = time.perf_counter()
        compact = asyncio.create_task(h.post("/v1/compact", headers=AUTH, timeout=600))
        n = 0
        while time.perf_counter() < stop - 1:
            x = data.xb[n % len(data.xb)] * 0.999
            r = await h.post("/v1/items", json={"embedding": x.tolist(), "label": 3, "key": f"http-{n}"},
                             headers=AUTH, timeout=120)
            if r.status_code == 201:
                acked.append(r.json()["id"])
            else:
                report.setdefault("add_errors", []).append(f"{r.status_code}: {r.text[:200]}")
            n += 1
            await asyncio.sleep(0.1)
        r = await compact
        report.update(compact=r.status_code, compact_s=round(time.perf_counter() - t0, 1),
                      compact_body=r.text[:200] if r.status_code != 200 else "")
        report["writer_rc"] = await asyncio.to_thread(proc.wait)
        second = [int(line) for line in open(out).read().split()] if os.path.exists(out) else []
        for name, ids in (("http", acked), ("writer2", second)):
            missing = [i for i in ids if (await h.get(f"/v1/items/{i}", timeout=60)).status_code != 200]
            report.update({f"{name}_acked": len(ids), f"{name}_missing": len(missing)})
        return report
    return during


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> float:
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return float("inf")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,16", help="comma-separated concurrent client counts")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--index", default="IVF512,SQ8")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="alternating slices per client count")
    ap.add_argument("--no-edits", action="store_true", help="skip the run with edits mid-load")
    ap.add_argument("--serve", nargs="*", default=[], help="extra key=value overrides for vmem serve")
    ap.add_argument("--connections", default="keep-alive,new",
                    help="client kinds: keep-alive (one pooled connection per client) and/or new (a new TCP "
                         "connection per request)")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    kinds = [k for k in args.connections.split(",") if k]
    if not set(kinds) <= {"keep-alive", "new"}:
        ap.error(f"--connections takes keep-alive and/or new, got {args.connections}")

    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters
    from pipeline.config import load_config

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "VMEM_TOKEN": TOKEN}
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"workdir={tmp}/work", "memory.compact_threshold=0.99", "ray.num_cpus=2"]
        cfg = load_config(None, overrides)
        data = make_clusters(args.items, dim=args.dim, seed=0)
        t0 = time.perf_counter()
        build_synthetic_memory(cfg.memory_dir, data, num_shards=args.shards, index_key=args.index,
                               nprobe=args.nprobe)
        print(f"built {args.items} x {args.dim} {args.index} in {time.perf_counter() - t0:.1f} s", flush=True)
        peer_dir = os.path.join(tmp, "peer")
        os.makedirs(peer_dir)
        for name, a in (("xb", data.xb), ("labels", data.labels), ("ids", data.ids)):
            np.save(os.path.join(peer_dir, f"{name}.npy"), a)
        queries = make_clusters(256, dim=args.dim, seed=1, centres=data.centres).xb
        bodies = [json.dumps({"embedding": q.tolist(), "k": args.k}).encode() for q in queries]

        peer_port, port = free_port(), free_port()
        peer = subprocess.Popen([sys.executable, "-m", "uvicorn", "benchmarks.serve_peer:app", "--port",
                                 str(peer_port), "--log-level", "warning"], cwd=ROOT,
                                env={**env, "PEER_DATA": peer_dir, "PEER_INDEX": args.index,
                                     "PEER_NPROBE": str(args.nprobe)})
        serve_overrides = overrides + [f"serve.port={port}", *args.serve]
        srv = subprocess.Popen(vmem_cmd("--log-level", "WARNING", "serve", *serve_overrides), cwd=ROOT, env=env)
        base, peer_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
        edits = None
        try:
            wait_ready(f"{peer_base}/healthz", peer)
            wait_ready(f"{base}/healthz", srv)
            both = compare(peer_base, base, bodies, clients, args.seconds, args.rounds, kinds)
            peer.terminate()
            if not args.no_edits:
                during = edits_during(base, data, args.seconds, overrides, args.dim, tmp)
                edits = asyncio.run(load(base, bodies, max(clients), args.seconds, during=during,
                                         fresh=kinds[0] == "new"))
        finally:
            peer.terminate()
            peer.wait()
            stop_s = stop_server(srv)
        peer_res = {kc: r["peer"] for kc, r in both.items()}
        vmem_res = {kc: r["vmem"] for kc, r in both.items()}

    print(f"\nServe load: {args.items} x {args.dim} synthetic items, {args.shards} shards ({args.index}, nprobe "
          f"{args.nprobe}), k={args.k}, {args.seconds:.0f} s per run, /v1/classify with JSON embeddings, "
          f"{os.cpu_count()} CPUs; vmem serve {' '.join(args.serve) or '(defaults)'}")
    print(f"{'connection':>11}{'clients':>8}{'server':>12}{'requests':>10}{'QPS':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'errors':>8}")
    for kind, c in both:
        for name, r in (("peer", peer_res[kind, c]), ("vmem serve", vmem_res[kind, c])):
            print(f"{kind:>11}{c:>8}{name:>12}{r['requests']:>10}{r['qps']:>9.1f}{r['p50_ms']:>9.1f}"
                  f"{r['p99_ms']:>9.1f}{r['errors']:>8}")
        v, p = vmem_res[kind, c], peer_res[kind, c]
        print(f"{kind:>11}{c:>8}{'ratio':>12}{'':>10}{v['qps'] / p['qps']:>8.2f}x{v['p50_ms'] / p['p50_ms']:>8.2f}x"
              f"{v['p99_ms'] / p['p99_ms']:>8.2f}x")
    bad = sum(r["errors"] for r in list(peer_res.values()) + list(vmem_res.values()))
    if edits is not None:
        e = edits["during"]
        print(f"{kinds[0]:>11}{max(clients):>8}{'with edits':>12}{edits['requests']:>10}{edits['qps']:>9.1f}{edits['p50_ms']:>9.1f}"
              f"{edits['p99_ms']:>9.1f}{edits['errors']:>8}")
        print(f"edits mid-load: {e}")
        bad += edits["errors"] + e["http_missing"] + e["writer2_missing"] + len(e.get("add_errors", [])) \
            + (e.get("compact") != 200) \
            + (e.get("writer_rc") != 0)
        examples = edits["error_examples"]
    else:
        examples = []
    print(f"vmem serve stopped {stop_s:.1f} s after SIGTERM")
    if bad:
        print("ERRORS:", examples + [r["error_examples"] for r in vmem_res.values() if r["errors"]], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--writer":
        sys.path.insert(0, str(ROOT))
        writer(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
        sys.exit(0)
    sys.exit(main())

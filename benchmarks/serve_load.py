"""Bounded HTTP load on the Serve app: N concurrent clients for T seconds against /v1/classify (embedding
input) on 127.0.0.1; prints QPS, p50/p99 latency and the error count, then the same run with one compaction
triggered mid-load. Both runs must report 0 errors (the script exits 1 otherwise).

  .venv/bin/python benchmarks/serve_load.py --clients 8 --seconds 10 --items 20000 --dim 64

The memory is synthetic (clustered unit vectors, `pipeline.memory.synthetic`) in 2 IVF shards; before the
second run 10% of the items are deleted so the compaction has real work to do.
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time

import numpy as np

TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(base: str, queries: np.ndarray, clients: int, seconds: float, k: int, during=None) -> dict:
    """`clients` concurrent loops posting classify requests for `seconds`; optional `during` coroutine."""
    import httpx

    lat, errors = [], []
    stop = time.perf_counter() + seconds
    bodies = [{"embedding": q.tolist(), "k": k} for q in queries]

    async def client(c: int, http: "httpx.AsyncClient"):
        i = c
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/classify", json=bodies[i % len(bodies)])
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
            except Exception as e:  # noqa: BLE001 - a transport error is an error to report, not a crash
                errors.append(repr(e))
            lat.append(time.perf_counter() - t0)
            i += clients

    async with httpx.AsyncClient(base_url=base, timeout=60, limits=httpx.Limits(max_connections=clients + 2)) as h:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client(c, h)) for c in range(clients)]
        extra = None
        if during is not None:
            await asyncio.sleep(seconds / 3)
            extra = await during(h)
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "qps": len(lat) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "errors": len(errors), "error_examples": errors[:3],
            "during": extra}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    import httpx
    import ray
    from ray import serve

    from pipeline.config import load_config
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters
    from pipeline.runtime import setup_logging
    from pipeline.serve import build_app

    setup_logging("WARNING")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"workdir={tmp}/work", f"serve.port={port}", f"serve.token={TOKEN}",
                                 "memory.compact_threshold=0.99"])
        data = make_clusters(args.items, dim=args.dim, seed=0)
        build_synthetic_memory(cfg.memory_dir, data, num_shards=2, index_key="IVF64,Flat", nprobe=8)
        queries = make_clusters(256, dim=args.dim, seed=1, centres=data.centres).xb
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(cfg), name="bench", route_prefix="/")
            base = f"http://127.0.0.1:{port}"
            asyncio.run(load(base, queries, 2, 2.0, args.k))  # warm-up: encoder-free, loads the shards
            steady = asyncio.run(load(base, queries, args.clients, args.seconds, args.k))

            auth = {"Authorization": f"Bearer {TOKEN}"}
            dead = data.ids[: args.items // 10].tolist()
            r = httpx.post(f"{base}/v1/delete", json={"ids": dead}, headers=auth, timeout=120)
            assert r.status_code == 200, r.text

            async def compact(h):
                t0 = time.perf_counter()
                r = await h.post("/v1/compact", headers=auth, timeout=600)
                return {"status": r.status_code, "seconds": time.perf_counter() - t0,
                        "report": {k: v for k, v in r.json().items() if k in ("version", "removed", "added")}}

            during = asyncio.run(load(base, queries, args.clients, args.seconds, args.k, during=compact))
            stats = httpx.get(f"{base}/v1/stats").json()
        finally:
            serve.shutdown()
            ray.shutdown()

    print(f"\nServe load: {args.items} x {args.dim} synthetic items, 2 shards (IVF64,Flat), k={args.k}, "
          f"{args.clients} clients x {args.seconds:.0f} s, {args.cpus} CPUs, /v1/classify with JSON embeddings")
    print(f"{'run':<22}{'requests':>10}{'QPS':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, r in (("steady", steady), ("compaction mid-load", during)):
        print(f"{name:<22}{r['requests']:>10}{r['qps']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['errors']:>8}")
    print(f"compaction: {during['during']}; after: version {stats['version']}, tombstones {stats['tombstones']}")
    print(f"QPS ratio during/steady: {during['qps'] / steady['qps']:.2f}, "
          f"p99 ratio: {during['p99_ms'] / steady['p99_ms']:.2f}")
    bad = steady["errors"] + during["errors"]
    if bad or during["during"]["status"] != 200:
        print("ERRORS:", steady["error_examples"] + during["error_examples"], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

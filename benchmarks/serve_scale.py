"""RSS of `vmem serve`'s processes that are not shard searchers, at two memory sizes: how much each item
costs the ingress replicas (and, for reference, Serve's proxy and the shard replicas).

  .venv/bin/python benchmarks/serve_scale.py                      # 100k and 1M items, 64-d, IVF256,PQ16
  .venv/bin/python benchmarks/serve_scale.py --sizes 20000,200000

Each size: a synthetic memory (2 shards), `vmem serve` with shard deployments forced on
(serve.local_search_max_items=-1, so the ingress holds no index), 50 queries, then RSS per process from
/proc via psutil. Target (issue 10): the ingress grows by <= 16 bytes per item.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.serve_load import ROOT, free_port, wait_ready  # noqa: E402

ROLES = {"ingress": "ServeReplica:vmem:ingress", "shards": "ServeReplica:vmem:shard-", "proxy": "ProxyActor",
         "controller": "ServeController"}


def rss_by_role(pid: int) -> dict:
    """MiB of RSS summed per role over the descendants of `pid` (a role's processes, by command line)."""
    import psutil

    out = {role: 0.0 for role in ROLES}
    for p in psutil.Process(pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            for role, tag in ROLES.items():
                if tag in cmd:
                    out[role] += p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return out


def measure(n: int, dim: int, index_key: str, tmp: str) -> dict:
    import httpx

    from pipeline.config import load_config
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters

    port = free_port()
    overrides = [f"workdir={tmp}/work-{n}", f"serve.port={port}", "serve.local_search_max_items=-1",
                 "ray.num_cpus=2"]
    cfg = load_config(None, overrides)
    data = make_clusters(n, dim=dim, seed=0)
    t0 = time.perf_counter()
    build_synthetic_memory(cfg.memory_dir, data, num_shards=2, index_key=index_key, nprobe=16)
    print(f"built {n} x {dim} {index_key} in {time.perf_counter() - t0:.0f} s", flush=True)
    queries = data.xb[:50].copy()
    del data
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--log-level", "WARNING", "serve", *overrides],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", proc, timeout=600)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            for q in queries:
                r = c.post("/v1/classify", json={"embedding": q.tolist(), "k": 10})
                assert r.status_code == 200, r.text
        return rss_by_role(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--index", default="IVF256,PQ16")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        res = {n: measure(n, args.dim, args.index, tmp) for n in sizes}
    print(f"\nRSS of vmem serve's processes (MiB), {args.dim}-d {args.index}, 2 shards, shard deployments on")
    print(f"{'items':>10}" + "".join(f"{r:>12}" for r in ROLES))
    for n in sizes:
        print(f"{n:>10}" + "".join(f"{res[n][r]:>12.0f}" for r in ROLES))
    lo, hi = sizes[0], sizes[-1]
    per_item = {r: (res[hi][r] - res[lo][r]) * 2**20 / (hi - lo) for r in ROLES}
    print("bytes per item " + ", ".join(f"{r} {v:.0f}" for r, v in per_item.items()))
    ok = per_item["ingress"] <= 16
    print(f"ingress growth {per_item['ingress']:.0f} B/item: {'meets' if ok else 'misses'} the <= 16 B/item target")
    return 0


if __name__ == "__main__":
    sys.exit(main())

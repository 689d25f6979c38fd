"""An HTTP delete that makes compaction due answers in the time of a delete (issue 16): the compaction runs in
the replica's background thread (`pipeline.serve.upkeep`) instead of inside the request.

Real app (`create_api`) over a synthetic memory, requests through httpx's ASGI transport (no network in the
figures). Printed side by side, from one run:
  - p50 of deletes that do not cross `memory.compact_threshold`;
  - the delete that crosses it (today: answered at once, compaction after it);
  - the peer: the same delete followed by the compaction inside the request, which is what the service did
    before (and what a hand-written service that compacts on write does);
  - how long after the crossing delete the background compaction had committed (the work still happens).

  .venv/bin/python benchmarks/delete_threshold.py                 # 20k x 64, 2 shards
  .venv/bin/python benchmarks/delete_threshold.py --items 100000
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time

import httpx
import numpy as np

from pipeline.config import load_config
from pipeline.memory import VisualMemory
from pipeline.memory.synthetic import build_synthetic_memory, make_clusters
from pipeline.serve.api import create_api

TOKEN = "bench"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def build(items: int, dim: int, threshold: float):
    work = tempfile.mkdtemp(prefix="vmem-delete-bench-")
    cfg = load_config(None, [f"workdir={work}", f"memory.compact_threshold={threshold}", "memory.grace_period_s=0"])
    data = make_clusters(items, dim=dim, seed=1, num_classes=20)
    build_synthetic_memory(cfg.memory_dir, data, num_shards=2, index_key="IVF64,Flat", nprobe=8)
    return work, cfg, data


async def timed_deletes(app, batches):
    out = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for ids in batches:
            t = time.perf_counter()
            r = await client.post("/v1/delete", json={"ids": [int(i) for i in ids]}, headers=AUTH)
            out.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--small", type=int, default=30, help="single-id deletes below the threshold")
    args = ap.parse_args()
    threshold = 0.01
    cross = int(args.items * threshold) + 1  # one delete that alone crosses the threshold

    work, cfg, data = build(args.items, args.dim, threshold)
    try:
        memory = VisualMemory.open(cfg.memory_dir, cfg=cfg)
        app = create_api(cfg, memory, token=TOKEN)
        small = asyncio.run(timed_deletes(app, [[i] for i in data.ids[:args.small]]))
        t0 = time.perf_counter()
        crossing = asyncio.run(timed_deletes(app, [data.ids[args.small:args.small + cross]]))[0]
        while memory.stats()["manifest_version"] < 2:
            time.sleep(0.01)
        committed = time.perf_counter() - t0
        app.state.ctx.upkeep.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # The peer: the same crossing delete with the compaction inside the request, on a fresh copy.
    work, cfg, data = build(args.items, args.dim, threshold)
    try:
        memory = VisualMemory.open(cfg.memory_dir, cfg=cfg)  # no app: nothing compacts in the background
        memory.delete(ids=[int(i) for i in data.ids[:args.small]])
        t = time.perf_counter()
        memory.delete(ids=[int(i) for i in data.ids[args.small:args.small + cross]])
        memory.compact()
        inline = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)

    p50 = float(np.median(small))
    print(f"memory: {args.items:,} x {args.dim}, 2 shards, compact_threshold={threshold} ({cross} ids cross it)")
    print(f"{'delete below the threshold (p50)':48s} {1000 * p50:9.1f} ms")
    print(f"{'delete crossing the threshold (background)':48s} {1000 * crossing:9.1f} ms   "
          f"{crossing / p50:5.2f}x a plain delete")
    print(f"{'peer: same delete + compaction in the request':48s} {1000 * inline:9.1f} ms   "
          f"{inline / crossing:5.1f}x slower than ours")
    print(f"{'background compaction committed after':48s} {1000 * committed:9.1f} ms")


if __name__ == "__main__":
    main()

"""What fanning out to shards costs: a memory's N shards on one node against one faiss index holding every
vector (the peer a user would build instead), same trained quantizer, nprobe and queries, from one run.

Rows: one index (faiss `search`, ids only: the peer); one index through the router (the same memory in one
shard: ids, scores and metadata, the cost of the path without any fan-out); the router in this process (probed lists found once, shards on
threads for a few queries, OpenMP over rows for batches; what `vmem` uses on one node); the router over Ray
actors (what it uses for shards on other nodes: the per-call overhead of a remote shard). Columns: QPS one
query at a time and for a batch, and each as a ratio to the peer and to one shard through the router. Target
(issue 18): N shards >= 0.8x one index.

  .venv/bin/python benchmarks/fanout.py                        # 200k x 128, IVF1024,SQ8, 4 shards
  .venv/bin/python benchmarks/fanout.py --items 1000000 --dim 256 --shards 4 --ray
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import faiss
import numpy as np

from pipeline.index import train as itrain
from pipeline.index.manifest import ManifestStore
from pipeline.index.router import Router
from pipeline.index.shard import read_index
from pipeline.memory.synthetic import build_synthetic_memory, make_clusters


def qps(fn, xq: np.ndarray, batch: int) -> float:
    fn(xq[:batch])  # warm
    t = time.perf_counter()
    for s in range(0, len(xq), batch):
        fn(xq[s:s + batch])
    return len(xq) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--index-key", default="IVF1024,SQ8")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--ray", action="store_true", help="also time the router over Ray actors")
    args = ap.parse_args()

    data = make_clusters(args.items, dim=args.dim, seed=0, num_classes=100)
    rng = np.random.default_rng(1)
    xq = data.xb[rng.choice(args.items, args.queries, replace=False)]
    xq = xq + rng.normal(0, 0.02, xq.shape).astype(np.float32)
    work, one_work = tempfile.mkdtemp(prefix="vmem-fanout-"), tempfile.mkdtemp(prefix="vmem-fanout-1-")
    try:
        build_synthetic_memory(work, data, num_shards=args.shards, index_key=args.index_key, nprobe=args.nprobe)
        build_synthetic_memory(one_work, data, num_shards=1, index_key=args.index_key, nprobe=args.nprobe)
        store = ManifestStore(work)
        m = store.load()
        single = read_index(store.url(m.trained_path), m.trained_sha256, mmap=False)
        itrain.add_vectors(single, data.xb, data.ids)
        params = faiss.SearchParametersIVF(nprobe=args.nprobe)
        rows = {"one index (faiss, the peer)": lambda q: single.search(q, 10, params=params)}
        one = Router(one_work, use_ray=False, mmap=False)
        rows["one index through the router (1 shard)"] = lambda q: one.search(q, 10)
        local = Router(work, use_ray=False, mmap=False)
        rows[f"router, {args.shards} shards in this process"] = lambda q: local.search(q, 10)
        assert (local.search(xq, 10).I == single.search(xq, 10, params=params)[1]).all(), "answers differ"
        remote = None
        if args.ray:
            import ray

            ray.init(include_dashboard=False, log_to_driver=False)
            remote = Router(work, use_ray=True, mmap=False)
            rows[f"router, {args.shards} shards as Ray actors"] = lambda q: remote.search(q, 10)
        figures = {name: (qps(fn, xq, 1), qps(fn, xq, 100)) for name, fn in rows.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(one_work, ignore_errors=True)
    peer = figures["one index (faiss, the peer)"]
    path = figures["one index through the router (1 shard)"]
    print(f"{args.items:,} x {args.dim}, {args.index_key}, nprobe {args.nprobe}, {args.queries} queries, "
          f"{faiss.omp_get_max_threads()} OpenMP threads")
    print(f"{'':44s} {'QPS 1-at-a-time':>16s} {'/peer':>6s} {'/1 shard':>8s} {'QPS batch 100':>14s} {'/peer':>6s} "
          f"{'/1 shard':>8s}")
    for name, (one, batch) in figures.items():
        print(f"{name:44s} {one:16.0f} {one / peer[0]:6.2f} {one / path[0]:8.2f} {batch:14.0f} "
              f"{batch / peer[1]:6.2f} {batch / path[1]:8.2f}")


if __name__ == "__main__":
    main()

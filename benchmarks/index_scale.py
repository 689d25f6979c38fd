"""Index scale benchmark: build a sharded memory of synthetic clustered vectors and measure it.

  .venv/bin/python benchmarks/index_scale.py --items 5000000 --dim 256 --shards 4        (the full run)
  .venv/bin/python benchmarks/index_scale.py --items 200000 --dim 256 --shards 4          (a quick run)

Prints: build time, bytes/item (target <= PQ code size + 16), recall@10 vs exact search (exact = faiss flat over
all vectors in chunks), router QPS (batched) and p50/p99 single-query latency, and the same figures for ONE
faiss index holding all vectors (same trained index, same nprobe) in the same run, with the router/single ratio.
Writes the figures as JSON next to the memory (`<workdir>/index_scale.json`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import load_config  # noqa: E402
from pipeline.embed.parts import to_table, write_part  # noqa: E402
from pipeline.index.units import parse_count  # noqa: E402


LATENT = 24  # intrinsic dimension of the synthetic data


def clustered(rng, space, n: int, noise: float) -> np.ndarray:
    """Unit vectors around cluster centres in a LATENT-dim subspace, lifted to `dim` with a little ambient noise.

    Real image embeddings have a low intrinsic dimension; isotropic noise in all `dim` directions would make
    every point of a cluster nearly equidistant from the others, a case no compressed index (nor any real
    workload) resembles.
    """
    centers, lift = space
    z = centers[rng.integers(0, len(centers), n)] + noise * rng.standard_normal((n, LATENT), dtype=np.float32)
    x = z @ lift + 0.02 * rng.standard_normal((n, lift.shape[1]), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_data(emb_dir: str, n: int, dim: int, rows_per_part: int, seed: int = 0):
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(100, n // 2000), LATENT), dtype=np.float32)
    lift = rng.standard_normal((LATENT, dim), dtype=np.float32) / np.sqrt(LATENT)
    space = (centers, lift)
    os.makedirs(emb_dir, exist_ok=True)
    for p, start in enumerate(tqdm(range(0, n, rows_per_part), desc="write parts", unit="part")):
        m = min(rows_per_part, n - start)
        x = clustered(rng, space, m, 0.35)
        ids = np.arange(start, start + m, dtype=np.int64) * 2654435761 % (1 << 61) + 1  # spread, unique
        meta = {"id": ids, "key": [""] * m, "label": (ids % 100), "label_name": [""] * m,
                "source": [""] * m, "shard": [""] * m}
        write_part(to_table(meta, x), os.path.join(emb_dir, f"part-{p:05d}.parquet"))
    return clustered(rng, space, 10000, 0.35)


def latencies(fn, xq, n):
    out = []
    for q in xq[:n]:
        t = time.perf_counter()
        fn(q[None, :])
        out.append((time.perf_counter() - t) * 1000)
    return np.percentile(out, 50), np.percentile(out, 99)


def qps(fn, xq, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(xq)
        best = min(best, time.perf_counter() - t)
    return len(xq) / best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", default="5M")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--bytes-per-item", type=int, default=48, help="memory budget per item given to autofaiss")
    ap.add_argument("--index-key", default=None, help="explicit faiss key instead of autofaiss's choice")
    ap.add_argument("--train-sample", type=int, default=200000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--workdir", default="/tmp/vmem-index-scale")
    ap.add_argument("--keep", action="store_true", help="keep the generated data and memory")
    args = ap.parse_args()

    import faiss
    import ray

    from pipeline.index.build import build_index, vector_batches
    from pipeline.index.keys import key_cost
    from pipeline.index.manifest import ManifestStore
    from pipeline.index.recall import exact_knn, recall_at
    from pipeline.index.router import Router
    from pipeline.index.shard import read_index
    from pipeline.index.train import add_vectors
    from pipeline.runtime import setup_logging

    setup_logging("INFO")
    n, d = parse_count(args.items), args.dim
    shutil.rmtree(args.workdir, ignore_errors=True)
    overrides = [f"workdir={args.workdir}", f"index.num_shards={args.shards}", "index.recall_queries=200",
                 f"index.max_index_memory={n * args.bytes_per_item}", f"index.train_sample={args.train_sample}",
                 "index.memory_per_node=64GiB", f"ray.num_cpus={os.cpu_count()}", "index.build_batch_rows=100000"]
    if args.index_key:
        overrides.append(f"index.index_key={args.index_key}")
    cfg = load_config(None, overrides)
    emb_dir = cfg.embeddings_dir("train")
    t = time.perf_counter()
    pool = write_data(emb_dir, n, d, rows_per_part=250000)
    gen_s = time.perf_counter() - t
    xq = np.ascontiguousarray(pool[: args.queries])

    t = time.perf_counter()
    m = build_index(cfg, "train")
    build_s = time.perf_counter() - t
    ivf_code = key_cost(m.index_key, d).code_size

    t = time.perf_counter()
    _, gt = exact_knn(xq, vector_batches(emb_dir, 250000), args.k)
    exact_s = time.perf_counter() - t

    router = Router(cfg.memory_dir)
    rres = router.search(xq, args.k)
    r_qps = qps(lambda q: router.search(q, args.k), xq)
    r_p50, r_p99 = latencies(lambda q: router.search(q, args.k), xq, 200)
    router.close()

    store = ManifestStore(cfg.memory_dir)
    single = read_index(store.url(m.trained_path), m.trained_sha256, mmap=False)
    t = time.perf_counter()
    for x, ids in vector_batches(emb_dir, 250000):
        add_vectors(single, x, ids)
    single_add_s = time.perf_counter() - t
    faiss.extract_index_ivf(single).nprobe = m.nprobe
    _, sI = single.search(xq, args.k)
    s_qps = qps(lambda q: single.search(q, args.k), xq)
    s_p50, s_p99 = latencies(lambda q: single.search(q, args.k), xq, 200)

    fig = {
        "items": n, "dim": d, "shards": args.shards, "index_key": m.index_key, "nprobe": m.nprobe,
        "cpus": os.cpu_count(), "generate_s": round(gen_s, 1), "build_s": round(build_s, 1),
        "build_timings": m.build.get("timings"), "bytes_per_item": round(m.build["bytes_per_item"], 2),
        "code_size": int(ivf_code), "bytes_per_item_target": int(ivf_code) + 16,
        "router_recall@10": recall_at(rres.I, gt, args.k), "single_recall@10": recall_at(sI, gt, args.k),
        "router_equals_single": bool((rres.I == sI).all()), "exact_search_s": round(exact_s, 1),
        "router_qps": round(r_qps), "router_p50_ms": round(r_p50, 2), "router_p99_ms": round(r_p99, 2),
        "single_qps": round(s_qps), "single_p50_ms": round(s_p50, 2), "single_p99_ms": round(s_p99, 2),
        "single_add_s": round(single_add_s, 1), "router_vs_single_qps": round(r_qps / s_qps, 3),
        "build_recall_table": m.recall,
    }
    print(json.dumps({k: v for k, v in fig.items() if k != "build_recall_table"}, indent=2))
    with open(os.path.join(args.workdir, "index_scale.json"), "w") as f:
        json.dump(fig, f, indent=2)
    ray.shutdown()
    if not args.keep:
        shutil.rmtree(os.path.join(args.workdir, "embeddings"), ignore_errors=True)
        shutil.rmtree(os.path.join(args.workdir, "memory"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

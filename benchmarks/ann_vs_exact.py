"""ANN votes vs exact votes on several image sets and sizes: `vmem build` then `vmem eval`'s own table.

  .venv/bin/python benchmarks/ann_vs_exact.py                    (all sets, ~10 min on 2 cores)
  .venv/bin/python benchmarks/ann_vs_exact.py --sets fmnist-150 fmnist-1k

Each set is written as embedding parts, built with this project's build (index choice by size, re-rank,
settings chosen at the vote depth) and evaluated with `pipeline.eval.accuracy.evaluate` (the code behind
`vmem eval`): accuracy@k of every vote method for ANN and exact search over the same queries. Prints each
table, then per set: the index chosen, and the largest |ANN - exact| gap in points over every k and method
(issue #11's target: <= 0.3). Sets:

  fmnist-150 / -1k / -5k   Fashion-MNIST train subsets (raw pixels, L2-normalised, 784-d), 2,000 test queries
  fmnist-20k-sq8           20k items under a 32 MiB budget: 8-bit codes + exact re-rank (the demo's situation)
  fmnist-60k-ivf           all 60k items with a 1 ms latency budget: forced onto IVF + re-rank
  clusters-20k             synthetic: 20k x 64 around 50 class centres (`pipeline.memory.synthetic`)
Writes `<workdir>/ann_vs_exact.json`.
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

FMNIST = "/usr/share/datasets/fashion-mnist"
SETS = {  # name: (source, train items, extra overrides)
    "fmnist-150": ("fmnist", 150, []),
    "fmnist-1k": ("fmnist", 1000, []),
    "fmnist-5k": ("fmnist", 5000, []),
    "fmnist-20k-sq8": ("fmnist", 20000, ["index.max_index_memory=32MiB"]),
    "fmnist-60k-ivf": ("fmnist", 60000, ["index.max_index_memory=64MiB", "index.max_latency_ms=1"]),
    "clusters-20k": ("clusters", 20000, []),
}


def fmnist(split: str, n: int):
    from pipeline.data.sources import read_idx

    prefix = "train" if split == "train" else "t10k"
    x = read_idx(f"{FMNIST}/{prefix}-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32)
    y = read_idx(f"{FMNIST}/{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    x, y = x[:n], y[:n]
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def clusters(split: str, n: int):
    from pipeline.memory.synthetic import make_clusters

    base = make_clusters(10, dim=64, num_classes=50, seed=0)  # the class centres
    s = make_clusters(n, dim=64, spread=1.6, seed=1 if split == "train" else 2, centres=base.centres)
    return s.xb, s.labels


def write_split(emb_dir: str, x: np.ndarray, y: np.ndarray, id_offset: int) -> None:
    from pipeline.embed.parts import to_table, write_part

    os.makedirs(emb_dir, exist_ok=True)
    ids = np.arange(len(x), dtype=np.int64) * 7919 + id_offset
    meta = {"id": ids, "key": [f"k{i}" for i in ids], "label": y, "label_name": [f"c{v}" for v in y],
            "source": ["bench"] * len(x), "shard": [""] * len(x)}
    write_part(to_table(meta, x), os.path.join(emb_dir, "part-00000.parquet"))


def run_set(name: str, workdir: str, queries: int) -> dict:
    from pipeline.config import load_config
    from pipeline.eval.accuracy import evaluate
    from pipeline.memory.build import build_memory

    source, n, extra = SETS[name]
    work = os.path.join(workdir, name)
    shutil.rmtree(work, ignore_errors=True)
    cfg = load_config(None, [f"workdir={work}", "index.num_shards=2", "ray.num_cpus=2", "index.recall_queries=500",
                             f"eval.max_queries={queries}", *extra])
    load = fmnist if source == "fmnist" else clusters
    write_split(cfg.embeddings_dir("train"), *load("train", n), id_offset=11)
    write_split(cfg.embeddings_dir("test"), *load("test", queries), id_offset=10**12)
    t = time.perf_counter()
    m = build_memory(cfg, "train")
    build_s = time.perf_counter() - t
    table = evaluate(cfg)
    print(f"\n== {name}: {n:,} items, {m.index_key}, nprobe {m.nprobe}, rerank_k {m.rerank_k}")
    print(table.format())
    gaps = {f"{meth}@{k}": 100 * (table.get(meth, k, "exact") - table.get(meth, k, "ann"))
            for (search, meth) in table.rows if search == "ann" for k in table.ks}
    worst = max(gaps, key=lambda g: abs(gaps[g]))
    return {"items": n, "index_key": m.index_key, "kind": m.build["index_choice"]["kind"], "nprobe": m.nprobe,
            "rerank_k": m.rerank_k, "recall_at": m.build["recall_at"], "recall": m.build["recall"],
            "vote_agree": m.build["vote_agree"], "build_s": round(build_s, 1),
            "max_abs_gap_points": round(abs(gaps[worst]), 3), "worst": worst, "queries": table.n_queries}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--workdir", default="/tmp/vmem-ann-vs-exact")
    args = ap.parse_args()
    from pipeline.runtime import setup_logging

    setup_logging("WARNING")
    out = {name: run_set(name, args.workdir, args.queries) for name in args.sets}
    print(f"\n{'set':16s} {'items':>7s} {'index':22s} {'nprobe':>6s} {'rerank':>6s} {'recall@K':>8s} "
          f"{'vote agree':>10s} {'max |ANN-exact| (pts)':>22s}")
    for name, r in out.items():
        print(f"{name:16s} {r['items']:>7,} {r['index_key']:22s} {r['nprobe']:>6} {r['rerank_k']:>6} "
              f"{r['recall']:>8.4f} {r['vote_agree']:>10.4f} {r['max_abs_gap_points']:>14.2f} ({r['worst']})")
    with open(os.path.join(args.workdir, "ann_vs_exact.json"), "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latency of memory mutations on synthetic memories: add (one item, embedding given), delete (one id), time
until a delete is invisible to a query, and compaction throughput. Prints a table; targets: add and delete
p50 <= 20 ms (the paper quotes < 20 ms to delete a sample).

  .venv/bin/python benchmarks/memory_ops.py                 # 20k and 1M items
  .venv/bin/python benchmarks/memory_ops.py --sizes 20000   # quick
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import numpy as np

from pipeline.memory.memory import VisualMemory
from pipeline.memory.synthetic import build_synthetic_memory, make_clusters


def pct(xs, p):
    return float(np.percentile(np.asarray(xs) * 1000, p))


def bench(n: int, dim: int, ops: int, num_shards: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="vmem-bench-")
    try:
        nlist = int(max(16, min(4096, 4 * np.sqrt(n))))
        t0 = time.perf_counter()
        data = make_clusters(n, dim, 100, seed=0)
        build_synthetic_memory(tmp, data, num_shards=num_shards, index_key=f"IVF{nlist},Flat", nprobe=16)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        mem = VisualMemory.open(tmp)
        open_s = time.perf_counter() - t0
        mem.search(embeddings=data.xb[:1], k=10)  # load the searchers
        new = make_clusters(ops, dim, centres=data.centres, seed=1, prefix="new")
        add_t = []
        for i in range(ops):
            t = time.perf_counter()
            mem.add(embeddings=new.xb[i:i + 1], labels=[int(new.labels[i])], keys=[new.keys[i]])
            add_t.append(time.perf_counter() - t)
        rng = np.random.default_rng(0)
        victims = rng.choice(len(data.ids), ops, replace=False)
        del_t, invisible_t = [], []
        for j in victims:
            t = time.perf_counter()
            mem.delete(ids=[int(data.ids[j])])
            del_t.append(time.perf_counter() - t)
            nb = mem.search(embeddings=data.xb[j:j + 1], k=10)  # the item's own vector: it was its own top-1
            invisible_t.append(time.perf_counter() - t)
            assert int(data.ids[j]) not in nb.I[0]
        q_t = []
        for j in range(50):
            t = time.perf_counter()
            mem.search(embeddings=data.xb[j:j + 1], k=10)
            q_t.append(time.perf_counter() - t)
        rep = mem.compact(force=True)
        mem.close()
        return {"items": n, "dim": dim, "shards": num_shards, "index": f"IVF{nlist},Flat", "build_s": build_s,
                "open_s": open_s, "add_p50_ms": pct(add_t, 50), "add_p99_ms": pct(add_t, 99),
                "delete_p50_ms": pct(del_t, 50), "delete_p99_ms": pct(del_t, 99),
                "delete_invisible_p50_ms": pct(invisible_t, 50), "delete_invisible_p99_ms": pct(invisible_t, 99),
                "query_p50_ms": pct(q_t, 50), "compaction_s": rep["seconds"],
                "compaction_items_per_s": rep["items_per_s"], "erasure_verified": rep["erasure"]["verified"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 1000000])
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--ops", type=int, default=200)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args()
    rows = [bench(n, args.dim, args.ops, args.shards) for n in args.sizes]
    cols = ["items", "add_p50_ms", "add_p99_ms", "delete_p50_ms", "delete_p99_ms", "delete_invisible_p50_ms",
            "query_p50_ms", "compaction_s", "compaction_items_per_s"]
    print(" | ".join(f"{c:>14s}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:14.2f}" if isinstance(r[c], float) else f"{r[c]:>14}" for c in cols))
    if len(rows) > 1:
        print(f"ratio {rows[-1]['items']}/{rows[0]['items']}: add p50 x{rows[-1]['add_p50_ms'] / rows[0]['add_p50_ms']:.2f}, "
              f"delete p50 x{rows[-1]['delete_p50_ms'] / rows[0]['delete_p50_ms']:.2f}")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

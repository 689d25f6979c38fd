"""The trust report on the demo memory (`vmem demo` first): `vmem eval` (accuracy, calibration/ECE per vote
method, OOD study), `vmem eval --study paper` (each claim of the paper with a verdict) and the rerank study
(accuracy and latency per query without / with the `encoder` reranker, side by side, from one run).
Outputs land in <workdir>/eval/ (CSV, PNG, JSON).

  .venv/bin/python benchmarks/trust_demo.py                              # all three on configs/demo.yaml
  .venv/bin/python benchmarks/trust_demo.py --only rerank --queries 100 memory.rerank_k=20
"""
from __future__ import annotations

import argparse
import time

from pipeline.cli import main


def run(args, overrides) -> None:
    steps = {"eval": ["eval"], "paper": ["eval", "--study", "paper"],
             "rerank": ["eval", "--study", "rerank", "--queries", str(args.queries)]}
    for name in args.only or list(steps):
        t0 = time.perf_counter()
        print(f"\n=== vmem {' '.join(steps[name])} {' '.join(overrides)}", flush=True)
        rc = main([*steps[name], "--config", args.config, *overrides])
        print(f"=== {name}: rc={rc}, {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--only", action="append", choices=["eval", "paper", "rerank"])
    p.add_argument("--queries", type=int, default=200, help="query images of the rerank study")
    a, rest = p.parse_known_args()
    run(a, rest)

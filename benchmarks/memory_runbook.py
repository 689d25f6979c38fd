"""Long runs of the memory's acceptance runbooks (tests/runbook.py): many seeds, many ops, 2-4 writer processes,
one SIGKILLed mid-op per runbook, each checked against the exact oracle (tests/runbook_oracle.py). Prints one line
per seed and a table of violations by property; exits 1 if any property failed.

  .venv/bin/python benchmarks/memory_runbook.py --processes 4 --ops 40 --seeds 0 1 2 3 4
  .venv/bin/python benchmarks/memory_runbook.py --processes 3 --ops 20 --seeds 7 --s3   # on a moto S3 server
  .venv/bin/python benchmarks/memory_runbook.py --single-writer-ops   # only what the pre-Lance memory has
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import runbook as rb  # noqa: E402
from runbook_oracle import verify  # noqa: E402


def start_s3() -> str:
    """A moto S3 server on loopback with bucket `vmem-test`; sets the env the memory and Lance read."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    ThreadedMotoServer(ip_address="127.0.0.1", port=port).start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "VMEM_S3_ENDPOINT_URL": endpoint,
                       "VMEM_S3_REGION": "us-east-1"})
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="vmem-test")
    return endpoint


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--ops", type=int, default=40, help="ops per process")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--items", type=int, default=640, help="base items of the memory")
    ap.add_argument("--max-heavy", type=int, default=2, help="prunes and rebuilds per runbook (each)")
    ap.add_argument("--no-kill", action="store_true")
    ap.add_argument("--single-writer-ops", action="store_true", help="no relabel, no rebuild")
    ap.add_argument("--s3", action="store_true", help="run on s3:// against a local moto server")
    args = ap.parse_args()

    import ray

    extra = [f"storage.s3_endpoint_url={start_s3()}"] if args.s3 else []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    extra.append(f"ray.address={ray.get_runtime_context().gcs_address}")
    kinds = {k: v for k, v in rb.KINDS.items() if k not in ("relabel", "rebuild")} if args.single_writer_ops \
        else None
    total, failed = Counter(), 0
    tmp = tempfile.mkdtemp(prefix="vmem-runbook-")
    for seed in args.seeds:
        root = f"s3://vmem-test/runbook-{uuid.uuid4().hex[:8]}" if args.s3 else os.path.join(tmp, f"s{seed}")
        world = rb.World(workdir=root, n_base=args.items, seed=seed, overrides=extra)
        t0 = time.time()
        rb.build_world(world)
        plan = rb.plan_runbook(world, seed, args.processes, args.ops, kinds=kinds, max_heavy=args.max_heavy,
                               kill=not args.no_kill)
        run = rb.run_runbook(world, plan, os.path.join(tmp, f"journals-{seed}"), timeout_s=1800)
        report = verify(world, plan, run)
        total.update(report.counts)
        failed += not report.ok
        print(f"seed {seed}: {'ok' if report.ok else 'FAILED'} in {time.time() - t0:.0f} s")
        print(report.format(), flush=True)
    print(f"\n{len(args.seeds) - failed}/{len(args.seeds)} runbooks passed "
          f"({args.processes} processes x {args.ops} ops, {'s3' if args.s3 else 'local'})")
    for prop, n in sorted(total.items()):
        print(f"  {prop:40s} {n}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

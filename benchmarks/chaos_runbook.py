"""Long runs of the chaos runbook (tests/chaos.py, issue 17 item 8): per round, writers from several processes
(one SIGKILLed mid-op), same-key races, a truncated tar and part mid-run, a `vmem compact` SIGKILLed inside its
erasure, then `vmem compact` + `vmem build`, all checked against the exact oracle; optionally `vmem serve` with
an ingress replica SIGKILLed under HTTP writes. Prints one row per round and a summary table (ops, acks, errors
by kind, kills, lost, resurrected, duplicates, erasure reports verified); exits 1 if any property failed.

  .venv/bin/python benchmarks/chaos_runbook.py --rounds 5 --processes 4 --ops 30 --race-rounds 40
  .venv/bin/python benchmarks/chaos_runbook.py --seconds 1800          # rounds until 30 minutes have passed
  .venv/bin/python benchmarks/chaos_runbook.py --rounds 2 --s3         # on a moto S3 server
  .venv/bin/python benchmarks/chaos_runbook.py --rounds 1 --serve 120  # plus 120 s of HTTP writes per round
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import chaos  # noqa: E402
import runbook as rb  # noqa: E402
from memory_runbook import start_s3  # noqa: E402

COLUMNS = ("ops", "acks", "kills", "lost", "resurrected", "duplicates", "violations")


def _row(label: str, res: chaos.ChaosResult, seconds: float) -> dict:
    row = chaos.summary_row(res) if "kill_eraser" in res.steps else {
        "ops": res.report.stats.get("ops", 0), "acks": res.report.stats.get("acks", 0), "errors": dict(res.errors),
        "kills": int(bool(res.steps.get("serve", {}).get("killed"))),
        "lost": res.report.counts.get("acked_write_lost", 0),
        "resurrected": res.report.counts.get("deleted_id_returned", 0),
        "duplicates": res.report.stats.get("duplicates", 0), "reports": "-",
        "violations": sum(res.report.counts.values())}
    after = res.steps.get("kill_eraser", {}).get("seconds_after_kill")
    return {"run": label, **row, "erased_after_kill_s": after, "seconds": round(seconds), "ok": res.ok}


def _print_table(rows: list) -> None:
    head = ("run",) + COLUMNS + ("reports verified", "erased after kill (s)", "s", "result")
    print("\n" + " | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        tail = [r["reports"], str(r["erased_after_kill_s"]), str(r["seconds"]), "ok" if r["ok"] else "FAILED"]
        print(" | ".join([r["run"]] + [str(r[c]) for c in COLUMNS] + tail))
    errors = Counter()
    for r in rows:
        errors.update(r["errors"])
    print("\nerrors by kind (expected: NotFound races, race:UserError for every same-key loser; HTTP: statuses of "
          "writes during the replica kill)")
    for kind, n in sorted(errors.items()):
        print(f"  {kind:40s} {n}")
    total = Counter()
    for r in rows:
        total.update({c: r[c] for c in ("lost", "resurrected", "duplicates", "violations")})
    print("(reports verified: the others name only the files truncated on purpose, as `vmem compact` did)")
    print(f"\ntotal: {dict(total)}; {sum(r['ok'] for r in rows)}/{len(rows)} runs passed")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="chaos runbooks (seeds seed, seed+1, ...)")
    ap.add_argument("--seconds", type=float, default=0, help="keep starting rounds until this much time passed")
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--processes", type=int, default=4, help="writer processes")
    ap.add_argument("--ops", type=int, default=30, help="ops per writer")
    ap.add_argument("--race-rounds", type=int, default=30, help="same-key rounds (4 processes each)")
    ap.add_argument("--items", type=int, default=640, help="base items (in 8 tars)")
    ap.add_argument("--s3", action="store_true", help="run on s3:// against a local moto server")
    ap.add_argument("--serve", type=float, default=0, help="seconds of HTTP writes against vmem serve per round")
    args = ap.parse_args()

    import ray

    extra = [f"storage.s3_endpoint_url={start_s3()}"] if args.s3 else []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    extra.append(f"ray.address={ray.get_runtime_context().gcs_address}")
    tmp = tempfile.mkdtemp(prefix="vmem-chaos-")
    rows, t_start, r = [], time.time(), 0
    while r < args.rounds or time.time() - t_start < args.seconds:
        seed = args.seed + r
        root = f"s3://vmem-test/chaos-{uuid.uuid4().hex[:8]}" if args.s3 else os.path.join(tmp, f"s{seed}")
        world = chaos.chaos_world(root, seed, overrides=extra, n_base=args.items)
        plan = chaos.ChaosPlan(seed=seed, processes=args.processes, ops=args.ops, race_rounds=args.race_rounds)
        t0 = time.time()
        res = chaos.run_chaos(world, plan, os.path.join(tmp, f"journals-{seed}"), timeout_s=3600)
        rows.append(_row(f"{'s3' if args.s3 else 'local'} seed {seed}", res, time.time() - t0))
        print(f"seed {seed}: {'ok' if res.ok else 'FAILED'} in {time.time() - t0:.0f} s; steps {res.steps}")
        print(res.report.format(), flush=True)
        if args.serve:
            sworld = rb.World(workdir=os.path.join(tmp, f"serve-{seed}"), n_base=320, seed=seed)
            t0 = time.time()
            res = chaos.serve_chaos(sworld, seconds=args.serve, kill_after_s=args.serve / 3)
            rows.append(_row(f"serve seed {seed}", res, time.time() - t0))
            print(f"serve seed {seed}: {'ok' if res.ok else 'FAILED'}; steps {res.steps}")
            print(res.report.format(), flush=True)
        r += 1
    _print_table(rows)
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Compaction race (issue 17): 4 compaction loops beside writer processes for 5 minutes, then the checks.

On a synthetic memory (`--items` x `--dim`, 2 shards), `--writers` processes make single adds (new keys) and
single deletes (of their own earlier adds and of built items) through the Python API, each acknowledged edit
logged after its call returned; `--compactors` processes call `VisualMemory.compact(grace_s=0)` in a loop
(a compaction and its erasure at once, the busiest setting), all for `--seconds`. Then one last compaction and
the checks:
- manifest versions: every version the run committed folded a real change (it added or removed vectors), so
  their number is <= the edits acknowledged; a version with nothing in it would be a compaction that did not
  step aside;
- the erasure backlog is empty (every deleted id erased; nothing left pending);
- the oracle: every acknowledged add is found by its own vector, no deleted id is returned, no id twice, the
  item table's live ids equal the oracle's.

  .venv/bin/python benchmarks/compaction_race.py                    # 5 minutes, 2 writers, 4 compactors
  .venv/bin/python benchmarks/compaction_race.py --seconds 30       # quick
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.index.manifest import ManifestStore  # noqa: E402
from pipeline.memory import erasure  # noqa: E402
from pipeline.memory.memory import VisualMemory  # noqa: E402
from pipeline.memory.state import ITEMS, MemoryState  # noqa: E402
from pipeline.memory.synthetic import build_synthetic_memory, make_clusters  # noqa: E402
from pipeline.runtime import setup_logging  # noqa: E402

QUIET = "ERROR"  # the loops' expected "erasure deferred: another eraser holds the lease" would flood the output


def writer(mem_dir: str, w: int, dim: int, base_ids: list, until: float, log_path: str) -> None:
    """Single adds and deletes until `until`; each acknowledged edit is one JSON line, written after the call
    returned (an edit whose call raised is not logged: it was not acknowledged)."""
    setup_logging(QUIET)
    rng = random.Random(w)
    mem = VisualMemory.open(mem_dir)
    mine, i = [], 0
    victims = list(base_ids[w::8])  # built items only this writer deletes
    with open(log_path, "w") as log:
        while time.time() < until:
            if mine and rng.random() < 0.35:
                j = mine.pop(rng.randrange(len(mine))) if rng.random() < 0.6 or not victims else None
                victim = j["id"] if j else victims.pop()
                assert mem.delete(ids=[victim]) == 1
                log.write(json.dumps({"op": "delete", "id": victim}) + "\n")
            else:
                x = np.random.default_rng([w, i]).normal(size=(1, dim)).astype(np.float32)
                (new,) = mem.add(embeddings=x, labels=[i % 4], keys=[f"race-{w}-{i}"])
                mine.append({"id": new})
                log.write(json.dumps({"op": "add", "id": new, "w": w, "i": i}) + "\n")
                i += 1
            log.flush()
    mem.close()


def compactor(mem_dir: str, c: int, until: float, out_path: str) -> None:
    """`compact(grace_s=0)` in a loop until `until`; writes how many of its calls committed a version."""
    setup_logging(QUIET)
    mem = VisualMemory.open(mem_dir, upkeep=False)
    rng, calls, committed, errors = random.Random(100 + c), 0, 0, []
    while time.time() < until:
        try:
            r = mem.compact(grace_s=0)
            committed += int(bool(r and r.get("committed")))
        except Exception as e:  # noqa: BLE001 - counted and printed: the check fails on any
            errors.append(f"{type(e).__name__}: {e}"[:300])
        calls += 1
        time.sleep(rng.random() * 0.2)
    with open(out_path, "w") as f:
        json.dump({"calls": calls, "committed": committed, "errors": errors}, f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300.0, help="how long writers and compactors run")
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--compactors", type=int, default=4)
    ap.add_argument("--items", type=int, default=2000, help="built items")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--workdir", default=None, help="where the memory goes (default: a temporary folder)")
    args = ap.parse_args()

    tmp = args.workdir or tempfile.mkdtemp(prefix="vmem-race-")
    mem_dir = os.path.join(tmp, "memory")
    data = make_clusters(args.items, dim=args.dim, seed=3, num_classes=4)
    build_synthetic_memory(mem_dir, data, num_shards=2, index_key="IVF8,Flat")
    v0 = ManifestStore(mem_dir).current_version()
    until = time.time() + args.seconds
    ctx = mp.get_context("spawn")
    logs = [os.path.join(tmp, f"writer-{w}.jsonl") for w in range(args.writers)]
    outs = [os.path.join(tmp, f"compactor-{c}.json") for c in range(args.compactors)]
    procs = [ctx.Process(target=writer, args=(mem_dir, w, args.dim, data.ids.tolist(), until, logs[w]))
             for w in range(args.writers)]
    procs += [ctx.Process(target=compactor, args=(mem_dir, c, until, outs[c])) for c in range(args.compactors)]
    print(f"{args.writers} writer(s) and {args.compactors} compaction loop(s) on {mem_dir} for {args.seconds:.0f} s",
          flush=True)
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad_exit = [p.exitcode for p in procs if p.exitcode != 0]

    edits = [json.loads(line) for path in logs for line in open(path)]
    added = {e["id"]: e for e in edits if e["op"] == "add"}
    deleted = {e["id"] for e in edits if e["op"] == "delete"}
    comp = [json.load(open(o)) for o in outs]

    mem = VisualMemory.open(mem_dir, upkeep=False)
    mem.compact(grace_s=0)  # the last edits folded, the last deletes erased
    store = ManifestStore(mem_dir)
    made = [v for v in store.versions() if v > v0]
    empty = []
    for v in made:
        c = store.load(v).build.get("compaction", {})
        if not (c.get("removed", 0) or c.get("added", 0)):
            empty.append(v)
    backlog = erasure.backlog(mem_dir)

    live = (set(data.ids.tolist()) | set(added)) - deleted
    found = 0
    for i, e in added.items():
        if i in deleted:
            continue
        x = np.random.default_rng([e["w"], e["i"]]).normal(size=(1, args.dim)).astype(np.float32)
        found += int(i in mem.search(embeddings=x, k=10).I[0].tolist())
    dead = np.array(sorted(deleted), np.int64)
    xs = [np.random.default_rng([added[i]["w"], added[i]["i"]]).normal(size=(args.dim,)) for i in dead if i in added]
    row = {int(i): r for r, i in enumerate(data.ids)}
    xs += [data.xb[row[int(i)]] for i in dead if i not in added]
    leaked = int(np.isin(mem.search(embeddings=np.asarray(xs, np.float32), k=10).I, dead).sum()) if xs else 0
    state = MemoryState(mem_dir)
    table = state[ITEMS].read(["id"]).column("id").to_numpy()
    table_live = set(table.tolist()) - set(state.forgotten_ids().tolist())
    mem.close()

    report = {
        "seconds": args.seconds, "writers": args.writers, "compactors": args.compactors,
        "acknowledged_adds": len(added), "acknowledged_deletes": len(deleted),
        "compaction_calls": sum(c["calls"] for c in comp), "committed_by_loops": sum(c["committed"] for c in comp),
        "versions_made": len(made), "versions_without_a_change": empty, "pending_backlog_entries": len(backlog),
        "adds_found_by_own_vector": found, "adds_live": len(set(added) - deleted), "deleted_ids_returned": leaked,
        "duplicate_ids": int(len(table) - len(np.unique(table))), "table_live_equals_oracle": table_live == live,
        "errors": [e for c in comp for e in c["errors"]][:5], "bad_exit_codes": bad_exit,
    }
    print(json.dumps(report, indent=1))
    ok = (not empty and len(made) <= len(edits) and not backlog and found == report["adds_live"] and leaked == 0
          and report["duplicate_ids"] == 0 and report["table_live_equals_oracle"] and not report["errors"]
          and not bad_exit)
    print(f"compaction race {'PASSED' if ok else 'FAILED'}: {len(made)} version(s) for {len(edits)} acknowledged "
          f"edit(s), {len(backlog)} pending erasure entr(ies)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

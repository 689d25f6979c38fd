"""Edit soak: many single-item adds and deletes on one memory, through the Python API; does it stay small and fast?

On a copy of a memory (the demo memory `work/demo/memory` when `vmem demo` built it, else a synthetic one of
`--items` x `--dim`), N rounds of: one single-item add (a new key) and one single-item delete (the oldest item
added by the soak, once `--pool` of them are live). Beside the edits, a thread plays the memory's background
maintenance every `--maintain-s`: `MemoryState.maintain()` (state-table upkeep) and, when the memory asks for
it, `compact()` (folds the delta and the deletes into the shards, then erasure).

Printed at the start (first `--window` rounds) and at the end (last `--window` rounds), and the ratio end/start:
add p50, delete p50, query p50 (single-vector k=10 searches on the live memory), a fresh process's open + first
query, files under state/, and the commits per edit (table versions advanced by one add / one delete). At the end
the memory is checked against the oracle: every acknowledged add that was not deleted is found by its own
vector, no deleted id is returned by any query of the deleted items' vectors, the live ids of the item table
(minus the forget list) equal the oracle's.

Target (issue 19): after 100,000 single edits, add/delete p50, query p50 and fresh open within 1.2x of their
values at the start.

  .venv/bin/python benchmarks/edit_soak.py                      # 100,000 rounds (hours on 2 cores)
  .venv/bin/python benchmarks/edit_soak.py --rounds 2000        # quick
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque

import numpy as np

from pipeline.memory.memory import VisualMemory
from pipeline.memory.state import EDITS, FORGET, ITEMS, OVERLAYS, MemoryState
from pipeline.memory.synthetic import build_synthetic_memory, make_clusters

TARGET_RATIO = 1.2
_FRESH = r"""
import json, sys, time
import numpy as np
from pipeline.memory.memory import VisualMemory
q = np.load(sys.argv[2])
t = time.perf_counter()
mem = VisualMemory.open(sys.argv[1])
mem.search(embeddings=q, k=10)
print(json.dumps({"open_first_query_s": time.perf_counter() - t}))
"""


def files_under(path: str) -> int:
    return sum(len(f) for _, _, f in os.walk(path))


def p50_ms(xs) -> float:
    return float(np.median(np.asarray(xs)) * 1000) if len(xs) else float("nan")


def versions(state: MemoryState) -> int:
    return sum(state[t].version() for t in (ITEMS, FORGET, OVERLAYS, EDITS))


def fresh_open(mem_dir: str, q_path: str, repeats: int = 3) -> float:
    """Median seconds a new process takes to open the memory and answer its first query (imports excluded)."""
    out = []
    for _ in range(repeats):
        r = subprocess.run([sys.executable, "-c", _FRESH, mem_dir, q_path], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        out.append(json.loads(r.stdout.strip().splitlines()[-1])["open_first_query_s"])
    return float(np.median(out))


def query_p50(mem: VisualMemory, xq: np.ndarray) -> float:
    ts = []
    for q in xq:
        t = time.perf_counter()
        mem.search(embeddings=q[None], k=10)
        ts.append(time.perf_counter() - t)
    return p50_ms(ts)


class Maintenance(threading.Thread):
    """The memory's background maintenance, as a server runs it: state upkeep, and compaction when asked."""

    def __init__(self, mem: VisualMemory, every_s: float, compact: bool):
        super().__init__(daemon=True)
        self.mem, self.every_s, self.do_compact = mem, every_s, compact
        self.stop = threading.Event()
        self.upkeeps = self.compactions = 0
        self.errors = []

    def run(self):
        while not self.stop.wait(self.every_s):
            try:
                if self.mem.state.maintain():
                    self.upkeeps += 1
                if self.do_compact and self.mem.needs_compaction():
                    if self.mem.compact(grace_s=0) is not None:
                        self.compactions += 1
            except Exception as e:  # reported at the end: a soak measures, it does not stop on upkeep errors
                self.errors.append(f"{type(e).__name__}: {e}"[:300])


def source_memory(args, root: str) -> tuple:
    """(memory dir of a fresh copy, dim): the demo memory if built, else a synthetic one."""
    mem_dir = os.path.join(root, "work", "memory")
    if args.memory and os.path.isdir(args.memory):
        shutil.copytree(args.memory, mem_dir)
        print(f"soak on a copy of {args.memory}")
    else:
        data = make_clusters(args.items, args.dim, num_classes=10, seed=0)
        build_synthetic_memory(mem_dir, data, num_shards=2, index_key=f"IVF{max(16, int(np.sqrt(args.items)))},Flat")
        print(f"soak on a synthetic memory of {args.items:,} x {args.dim} (no demo memory at {args.memory})")
    m = VisualMemory.open(mem_dir)
    dim = m.dim
    m.close()
    return mem_dir, dim


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100_000)
    ap.add_argument("--memory", default="work/demo/memory", help="memory to copy (default: the demo memory)")
    ap.add_argument("--items", type=int, default=20_000, help="synthetic memory size when there is no demo")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--window", type=int, default=0, help="rounds measured at start and end (default rounds/5, "
                                                          "at most 500)")
    ap.add_argument("--pool", type=int, default=50, help="live soak items before each round deletes one")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--maintain-s", type=float, default=1.0)
    ap.add_argument("--no-compact", action="store_true", help="state upkeep only, no memory compaction")
    ap.add_argument("--no-upkeep", action="store_true", help="no background maintenance at all (the old way)")
    ap.add_argument("--keep", action="store_true", help="keep the soaked copy (its path is printed)")
    args = ap.parse_args(argv)
    window = args.window or max(1, min(500, args.rounds // 5))
    root = tempfile.mkdtemp(prefix="vmem-soak-")
    try:
        return _soak(args, root, window)
    finally:
        if args.keep:
            print(f"kept: {root}/work/memory")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _soak(args, root: str, window: int) -> dict:
    mem_dir, dim = source_memory(args, root)
    state_dir = os.path.join(mem_dir, "state")
    rng = np.random.default_rng(1)
    xq = rng.standard_normal((args.queries, dim)).astype(np.float32)
    q_path = os.path.join(root, "q.npy")
    np.save(q_path, xq[:1])
    mem = VisualMemory.open(mem_dir)

    start = {"query_p50_ms": query_p50(mem, xq), "fresh_open_s": fresh_open(mem_dir, q_path),
             "state_files": files_under(state_dir)}
    keeper = None
    if not args.no_upkeep:
        keeper = Maintenance(mem, args.maintain_s, compact=not args.no_compact)
        keeper.start()

    pool: deque = deque()  # (id, vector) of live soak items, oldest first
    deleted = []  # (id, vector) of every deleted soak item
    times = {"add": [], "delete": []}
    commits = {"add": [], "delete": []}
    t_soak = time.perf_counter()
    for r in range(args.rounds):
        x = rng.standard_normal(dim).astype(np.float32)
        x /= np.linalg.norm(x)
        measure = r < window or r >= args.rounds - window
        v0 = versions(mem.state) if measure else 0
        t = time.perf_counter()
        i = mem.add(embeddings=x[None], labels=[int(r % 10)], keys=[f"soak-{r}"])[0]
        times["add"].append(time.perf_counter() - t)
        if measure:
            commits["add"].append(versions(mem.state) - v0)
        pool.append((int(i), x))
        if len(pool) > args.pool:
            victim, vx = pool.popleft()
            v0 = versions(mem.state) if measure else 0
            t = time.perf_counter()
            assert mem.delete(ids=[victim]) == 1
            times["delete"].append(time.perf_counter() - t)
            if measure:
                commits["delete"].append(versions(mem.state) - v0)
            deleted.append((victim, vx))
        if (r + 1) % max(1, args.rounds // 10) == 0:
            print(f"  round {r + 1:,}/{args.rounds:,}: {time.perf_counter() - t_soak:.0f} s, "
                  f"{files_under(state_dir):,} files under state/", flush=True)
    if keeper is not None:
        keeper.stop.set()
        keeper.join()
    mem.refresh()
    end = {"query_p50_ms": query_p50(mem, xq), "fresh_open_s": fresh_open(mem_dir, q_path),
           "state_files": files_under(state_dir)}
    nd = len(times["delete"])
    start.update(add_p50_ms=p50_ms(times["add"][:window]), delete_p50_ms=p50_ms(times["delete"][:min(window, nd)]))
    end.update(add_p50_ms=p50_ms(times["add"][-window:]), delete_p50_ms=p50_ms(times["delete"][-window:]))
    start["commits_per_add"] = float(np.median(commits["add"][:window])) if commits["add"] else float("nan")
    end["commits_per_add"] = float(np.median(commits["add"][-window:])) if commits["add"] else float("nan")
    start["commits_per_delete"] = float(np.median(commits["delete"][:window])) if commits["delete"] else float("nan")
    end["commits_per_delete"] = float(np.median(commits["delete"][-window:])) if commits["delete"] else float("nan")

    # ----- the oracle -----
    live_soak = {i for i, _ in pool}
    found = 0
    for i, x in pool:
        found += int(i in mem.search(embeddings=x[None], k=10).I[0].tolist())
    leaked = 0
    dead_ids = np.array([i for i, _ in deleted], np.int64)
    for j in range(0, len(deleted), 256):
        xs = np.stack([x for _, x in deleted[j:j + 256]])
        leaked += int(np.isin(mem.search(embeddings=xs, k=10).I, dead_ids).sum())
    state = MemoryState(mem_dir)
    table_ids = state[ITEMS].read(["id"]).column("id").to_numpy()
    live_table = set(table_ids.tolist()) - set(state.forgotten_ids().tolist()) - set(dead_ids.tolist())
    soak_in_table = {i for i in live_table if i in live_soak or i in set(dead_ids.tolist())}
    oracle = {"acknowledged_live": len(live_soak), "found_by_own_vector": found, "deleted": len(deleted),
              "deleted_ids_returned": leaked, "duplicate_ids": int(len(table_ids) - len(np.unique(table_ids))),
              "deleted_still_live_in_table": int(np.isin(dead_ids, sorted(live_table)).sum()),
              "live_soak_in_table": len(soak_in_table & live_soak)}
    mem.close()

    keys = ["add_p50_ms", "delete_p50_ms", "query_p50_ms", "fresh_open_s", "state_files", "commits_per_add",
            "commits_per_delete"]
    print(f"\n{args.rounds:,} rounds (1 add + 1 delete each) in {time.perf_counter() - t_soak:.0f} s; window "
          f"{window} rounds; background maintenance: "
          f"{'off' if keeper is None else f'every {args.maintain_s} s, {keeper.upkeeps} upkeep(s), {keeper.compactions} compaction(s)'}")
    print(f"{'':22s}{'start':>10s}{'end':>10s}{'end/start':>11s}")
    ratios = {}
    for k in keys:
        a, b = start[k], end[k]
        ratios[k] = b / a if a else float("nan")
        print(f"{k:22s}{a:10.2f}{b:10.2f}{ratios[k]:10.2f}x")
    print("oracle:", json.dumps(oracle))
    if keeper is not None and keeper.errors:
        print(f"maintenance errors ({len(keeper.errors)}):", keeper.errors[:3])
    ok = (found == len(live_soak) and leaked == 0 and oracle["duplicate_ids"] == 0
          and oracle["deleted_still_live_in_table"] == 0 and oracle["live_soak_in_table"] == len(live_soak))
    within = all(ratios[k] <= TARGET_RATIO for k in ("add_p50_ms", "delete_p50_ms", "query_p50_ms", "fresh_open_s"))
    print(f"oracle {'PASSED' if ok else 'FAILED'}; p50s and fresh open within {TARGET_RATIO}x of the start: "
          f"{'yes' if within else 'no'}")
    return {"start": start, "end": end, "ratios": ratios, "oracle": oracle, "oracle_ok": ok, "within": within}


if __name__ == "__main__":
    main()

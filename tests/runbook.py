"""Randomized runbooks of memory edits run by several writer processes at once (acceptance harness, issue 9).

A *world* is a workdir with synthetic L2-normalised vectors written as an embeddings part and a memory built from
it by `build_memory` (IVF at full nprobe, so every search is exact). A *plan* gives each process a list of ops
(add, delete by id/label/source, relabel, compact, prune, rebuild) drawn from one seed. Process p owns its key
space (keys `rb<seed>-p<p>-b<j>-...`), its labels (1000 + 10p + 0..9) and sources (`proc-p-batch-j`), and
deletes by label/source only what it owns; base items may be deleted by id by anyone and are relabelled only by
their owner (base position % processes). With that, every process's effect on the oracle is fixed by its own
ops, whatever the interleaving (see runbook_oracle.py).

Each child (multiprocessing `spawn`: Lance is not fork-safe) appends to its own JSONL journal, fsync'd per
record: `begin` before an op, `ack` after it returned, `err` if it raised, `violation` when a check right after
its own op fails (an acked add not found by get_item or its self-query; a deleted id still returned/found).
The parent may SIGKILL one child in the middle of an op; its last op is then unacknowledged and may go either way.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

NLIST = 16
OWN_LABELS = 10
KINDS = {"add": 4.0, "delete_ids": 2.0, "delete_label": 1.0, "delete_source": 1.0, "relabel": 1.5,
         "compact": 2.5, "prune": 0.4, "rebuild": 0.3}
HEAVY = ("prune", "rebuild")  # each runs Ray work: at most `max_heavy` of each per runbook
EXPECTED_ERRORS = ("NotFound",)  # a race with another writer's delete may make an op's id unknown


@dataclass
class World:
    """Where the memory lives and how its base items are drawn (every process regenerates them)."""
    workdir: str
    n_base: int = 640
    dim: int = 32
    seed: int = 0
    k: int = 10
    overrides: List[str] = field(default_factory=list)  # extra config overrides (ray.address, storage...)
    tars: int = 0  # > 0: base items in that many WebDataset tars, one embedding part each (erasure rewrites them)

    def config_overrides(self) -> List[str]:
        # memory.grace_period_s stays at the product default: it is what keeps concurrent readers safe.
        return [f"workdir={self.workdir}", f"index.index_key=IVF{NLIST},Flat", "index.num_shards=2",
                "index.recall_queries=50", "index.recall_split=null", "index.train_sample=100000",
                *self.overrides]

    def config(self):
        from pipeline import storage
        from pipeline.config import load_config

        cfg = load_config(None, self.config_overrides())
        storage.configure(cfg.storage)
        return cfg

    def base(self):
        from pipeline.memory.synthetic import make_clusters

        return make_clusters(self.n_base, self.dim, 10, seed=self.seed, prefix="base")


def write_embeddings(world: World) -> None:
    """The base items as the embeddings part `vmem build` reads (label names, source `base`)."""
    from pipeline.embed.parts import to_table, write_part
    from pipeline import storage

    b, cfg = world.base(), world.config()
    n = len(b.ids)
    if world.tars:
        from erasure_scan import write_samples

        write_samples(world.workdir, b, n // world.tars, source="base")
        return
    meta = {"id": b.ids.tolist(), "key": b.keys, "label": b.labels.tolist(),
            "label_name": [f"class_{int(c)}" for c in b.labels], "source": ["base"] * n, "shard": [""] * n}
    write_part(to_table(meta, b.xb), storage.join(cfg.embeddings_dir("train"), "part-00000.parquet"))


def build_world(world: World) -> None:
    """Write the embeddings and build the memory in a spawned process (its Ray job gets the storage env)."""
    write_embeddings(world)
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_build_child, args=(asdict(world),))
    p.start()
    p.join(600)
    if p.exitcode != 0:
        raise RuntimeError(f"building the runbook memory failed (exit {p.exitcode})")


def _build_child(world: dict) -> None:
    from pipeline.memory.build import build_memory

    build_memory(World(**world).config())


# ---------------------------------------------------------------- plans

def add_batch(world: World, seed: int, p: int, j: int, n: int, label: int):
    """(keys, ids, vectors, source) of process p's j-th add: new points around the base class centres."""
    from pipeline.memory.synthetic import make_clusters

    s = make_clusters(n, world.dim, centres=world.base().centres, seed=seed * 1000 + p * 100 + j,
                      prefix=f"rb{seed}-p{p}-b{j}")
    return s.keys, s.ids, s.xb, f"proc-{p}-batch-{j}"


def plan_runbook(world: World, seed: int, processes: int, ops: int, kinds: Optional[Dict[str, float]] = None,
                 max_heavy: int = 1, kill: bool = True) -> dict:
    """Per-process op lists drawn from `seed`; `kill` picks one process and an op index to SIGKILL it at."""
    rng = np.random.default_rng(seed)
    kinds = dict(KINDS if kinds is None else kinds)
    names = sorted(kinds)
    base_ids = world.base().ids
    heavy_left = {h: max_heavy for h in HEAVY}
    plans = []
    for p in range(processes):
        own: Dict[int, dict] = {}  # planned-live own items (this process's view): id -> label/source
        mine = [int(i) for pos, i in enumerate(base_ids) if pos % processes == p]
        steps, batches = [], 0
        while len(steps) < ops:
            w = np.array([kinds[n] if heavy_left.get(n, 1) > 0 else 0.0 for n in names])
            kind = names[rng.choice(len(names), p=w / w.sum())]
            labels = sorted({m["label"] for m in own.values()})
            sources = sorted({m["source"] for m in own.values() if m["source"] != "base"})  # only its own
            if kind == "add":
                label = 1000 + 10 * p + int(rng.integers(OWN_LABELS))
                n = int(rng.integers(1, 6))
                _, ids, _, src = add_batch(world, seed, p, batches, n, label)
                steps.append({"op": "add", "batch": batches, "n": n, "label": label})
                own.update({int(i): {"label": label, "source": src} for i in ids})
                batches += 1
            elif kind == "delete_ids":
                pool = list(own) if own and rng.random() < 0.5 else base_ids.tolist()
                ids = [int(i) for i in rng.choice(pool, size=min(len(pool), int(rng.integers(1, 4))), replace=False)]
                steps.append({"op": "delete_ids", "ids": ids})
                for i in ids:
                    own.pop(i, None)
            elif kind == "delete_label" and labels:
                label = int(rng.choice(labels))
                steps.append({"op": "delete_label", "label": label})
                own = {i: m for i, m in own.items() if m["label"] != label}
            elif kind == "delete_source" and sources:
                src = str(rng.choice(sources))
                steps.append({"op": "delete_source", "source": src})
                own = {i: m for i, m in own.items() if m["source"] != src}
            elif kind == "relabel":
                label = 1000 + 10 * p + int(rng.integers(OWN_LABELS))
                pool = list(own) + mine
                ids = [int(i) for i in rng.choice(pool, size=min(len(pool), int(rng.integers(1, 4))), replace=False)]
                steps.append({"op": "relabel", "ids": ids, "label": label})
                for i in ids:  # a relabelled base item now belongs to this process's labels
                    own[i] = {"label": label, "source": own.get(i, {}).get("source", "base")}
            elif kind in ("compact", "prune", "rebuild"):
                if kind in heavy_left:
                    heavy_left[kind] -= 1
                steps.append({"op": kind})
        plans.append(steps)
    victim = int(rng.integers(processes)) if kill else None
    kill_at = int(rng.integers(1, max(2, ops - 1))) if kill else None
    return {"seed": seed, "processes": processes, "ops": plans, "kill": victim, "kill_at": kill_at}


# ---------------------------------------------------------------- the child: run ops, journal, check own ops

class Journal:
    """Append-only JSONL, fsync'd after every record: what it holds survives a SIGKILL of the writer."""

    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)

    def write(self, **rec) -> None:
        self.f.write(json.dumps(rec, default=_jsonable) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())


def _jsonable(o):
    return o.tolist() if isinstance(o, np.ndarray) else int(o) if isinstance(o, np.integer) else str(o)


def read_journal(path: str) -> List[dict]:
    """The records of a journal (a torn last line of a killed writer is dropped)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    return [json.loads(line) for line in lines[:-1] if line]


def child_main(world: dict, seed: int, p: int, steps: List[dict], journal_path: str,
               hold_at: Optional[int] = None) -> None:
    """Run process p's ops against the memory, journalling each and checking its own effect right after.

    `hold_at`: after journalling `begin` of that op, wait for the parent's go (it SIGKILLs us moments later),
    so the kill reliably lands inside the op instead of after the last one.
    """
    jr = Journal(journal_path)
    try:
        _child_ops(World(**world), seed, p, steps, jr, hold_at)
    except BaseException as e:  # e.g. the memory cannot be opened: the parent reports it
        jr.write(i=-1, phase="crashed", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=8))
        raise


def _child_ops(world: World, seed: int, p: int, steps: List[dict], jr: Journal, hold_at: Optional[int]) -> None:
    jr.write(i=-1, phase="started", pid=os.getpid())
    ctx = _ChildState(world, seed, p)
    for i, op in enumerate(steps):
        jr.write(i=i, phase="begin", op=op)
        if i == hold_at:
            _wait_for(jr.f.name + ".go", timeout_s=60)
        try:
            result = ctx.execute(op)
        except Exception as e:  # journalled, judged by the parent (expected races vs. bugs)
            jr.write(i=i, phase="err", op=op, kind=type(e).__name__, error=f"{e}",
                     trace=traceback.format_exc(limit=6))
            continue
        jr.write(i=i, phase="ack", op=op, result=result)
        try:
            problems = ctx.check(op)
        except Exception as e:
            problems = [f"check after {op['op']} raised {type(e).__name__}: {e}"]
        for what in problems:
            jr.write(i=i, phase="violation", op=op, what=what)
    _close(ctx.mem)
    jr.write(i=len(steps), phase="done")


def _close(mem) -> None:
    """Close a memory if its API has close() (waits for a background compaction today)."""
    if hasattr(mem, "close"):
        mem.close()


def _wait_for(path: str, timeout_s: float) -> None:
    t0 = time.time()
    while not os.path.exists(path) and time.time() - t0 < timeout_s:
        time.sleep(0.002)


class _ChildState:
    def __init__(self, world: World, seed: int, p: int):
        from pipeline.memory import VisualMemory

        self.world, self.seed, self.p = world, seed, p
        self.cfg = world.config()
        self.mem = VisualMemory.open(self.cfg.memory_dir, cfg=self.cfg)
        b = world.base()
        self.vec = {int(i): x for i, x in zip(b.ids, b.xb)}  # vectors of every item this process may touch
        self.label = {int(i): int(c) for i, c in zip(b.ids, b.labels)}
        self.source = {int(i): "base" for i in b.ids}
        self.gone: set = set()  # ids this process saw deleted by its own acked ops
        self.last: List[int] = []  # ids the last op touched (what check() looks at)

    def search(self, x: np.ndarray):
        return self.mem.search(embeddings=x, k=self.world.k, nprobe=NLIST)

    def execute(self, op: dict):
        kind, mem = op["op"], self.mem
        if kind == "add":
            keys, ids, xb, src = add_batch(self.world, self.seed, self.p, op["batch"], op["n"], op["label"])
            got = mem.add(embeddings=xb, labels=[op["label"]] * len(ids), keys=keys,
                          label_names=[f"p{self.p}-{op['label']}"] * len(ids), sources=[src] * len(ids))
            for i, x in zip(ids, xb):
                self.vec[int(i)], self.label[int(i)], self.source[int(i)] = x, op["label"], src
            self.last = [int(i) for i in ids]
            return {"ids": [int(i) for i in got]}
        if kind == "delete_ids":
            self.last = list(op["ids"])
            return {"deleted": int(mem.delete(ids=op["ids"]))}
        if kind in ("delete_label", "delete_source"):
            field_, value = ("label", op["label"]) if kind == "delete_label" else ("source", op["source"])
            table = self.label if field_ == "label" else self.source
            self.last = [i for i, v in table.items() if v == value and i not in self.gone]
            n = mem.delete(**{field_: value})
            return {"deleted": int(n)}
        if kind == "relabel":
            n = mem.relabel(op["ids"], op["label"], label_name=f"p{self.p}-{op['label']}")
            self.last = [i for i in op["ids"] if i not in self.gone]
            for i in op["ids"]:
                self.label[int(i)] = op["label"]
            return {"relabelled": int(n)}
        if kind == "compact":
            rep = mem.compact()
            return {"compacted": rep is not None}
        if kind == "prune":
            # A threshold no item reaches on this data keeps the oracle exact; the pruned ids are journalled anyway.
            rep = mem.prune(hard=True, soft=True, threshold=10 ** 6)
            v = np.asarray(rep.get("v_hard", []))
            pruned = np.asarray(rep.get("ids", []))[v >= rep.get("threshold", 10 ** 6)] if len(v) else []
            return {"pruned": [int(i) for i in pruned], "hard_pruned": int(rep.get("hard_pruned", 0))}
        if kind == "rebuild":
            from pipeline.memory.build import build_memory

            m = build_memory(self.cfg)
            return {"version": int(getattr(m, "version", -1))}
        raise ValueError(f"unknown op {kind!r}")

    def check(self, op: dict) -> List[str]:
        """What must hold right after this process's own acked op (other writers only remove other items)."""
        from pipeline.errors import NotFound

        kind, out = op["op"], []
        ids = [i for i in self.last if i in self.vec]
        if kind == "add":
            nb = self.search(np.stack([self.vec[i] for i in ids]))
            for row, i in enumerate(ids):
                if i not in nb.I[row]:
                    out.append(f"acked add {i} missing from its own self-query top-{self.world.k}")
                try:
                    item = self.mem.get_item(i)
                    if int(item["label"]) != self.label[i]:
                        out.append(f"acked add {i}: get_item label {item['label']} != {self.label[i]}")
                except NotFound:
                    out.append(f"acked add {i}: get_item raised NotFound")
        elif kind.startswith("delete") and ids:
            self.gone.update(ids)
            nb = self.search(np.stack([self.vec[i] for i in ids]))
            back = sorted(set(nb.I.ravel().tolist()) & self.gone)
            if back:
                out.append(f"deleted id(s) {back[:5]} returned right after the acked delete")
            for i in ids:
                try:
                    self.mem.get_item(i)
                    out.append(f"deleted id {i}: get_item still finds it")
                except NotFound:
                    pass
        elif kind == "relabel":
            for i in ids:
                try:
                    if int(self.mem.get_item(i)["label"]) != op["label"]:
                        out.append(f"relabelled id {i}: get_item label is not {op['label']}")
                except NotFound:
                    pass  # deleted by another writer (the parent checks that someone did)
        return out


# ---------------------------------------------------------------- the parent: spawn, kill, collect

@dataclass
class RunResult:
    journals: List[List[dict]]
    exitcodes: List[Optional[int]]
    killed: Optional[int]
    killed_mid_op: bool
    seconds: float


def run_runbook(world: World, plan: dict, journal_dir: str, timeout_s: float = 300.0) -> RunResult:
    """Start one spawned process per op list, SIGKILL the planned victim mid-op, wait, return the journals."""
    os.makedirs(journal_dir, exist_ok=True)
    ctx = mp.get_context("spawn")
    paths = [os.path.join(journal_dir, f"proc-{p}.jsonl") for p in range(plan["processes"])]
    for path in paths + [p + ".go" for p in paths]:
        if os.path.exists(path):
            os.remove(path)
    victim = plan.get("kill")
    holds = [plan["kill_at"] if p == victim else None for p in range(plan["processes"])]
    procs = [ctx.Process(target=child_main, args=(asdict(world), plan["seed"], p, steps, paths[p], holds[p]),
                         daemon=True) for p, steps in enumerate(plan["ops"])]
    delay = np.random.default_rng(plan["seed"]).uniform(0.0, 0.03)  # how far into the op the kill lands
    t0 = time.time()
    for pr in procs:
        pr.start()
    killed_mid = False
    while any(pr.is_alive() for pr in procs) and time.time() - t0 < timeout_s:
        if victim is not None and procs[victim].is_alive():
            recs = read_journal(paths[victim])
            if recs and recs[-1]["phase"] == "begin" and recs[-1]["i"] == plan["kill_at"]:
                open(paths[victim] + ".go", "w").close()
                time.sleep(delay)
                os.kill(procs[victim].pid, signal.SIGKILL)
                procs[victim].join()
                killed_mid = read_journal(paths[victim])[-1]["phase"] == "begin"
                victim = None
        time.sleep(0.005)
    for pr in procs:
        if pr.is_alive():  # over time: stop it; the parent reports the timeout as a violation
            os.kill(pr.pid, signal.SIGKILL)
        pr.join()
    killed = plan.get("kill") if victim is None and plan.get("kill") is not None else None
    return RunResult([read_journal(p) for p in paths], [pr.exitcode for pr in procs], killed, killed_mid,
                     time.time() - t0)

"""The chaos runbook (issue 17 item 8): the randomized writer runbook of runbook.py with, at the same time or
right after it, everything that broke the memory at its edges, all judged by runbook_oracle.py's oracle.

One `run_chaos` is, in order:
1. the writer runbook (add, delete by id/label/source, relabel, compact, prune; one writer SIGKILLed mid-op)
   from several spawned processes, and beside them
2. same-key races: `race_processes` spawned processes meet at a barrier each round and add the same key
   (each its own vector): exactly one ack per key, every other one refused "already in the memory";
3. mid-run (once the writers are under way), a truncated tar under shards/ and a truncated embedding part,
   each holding items the chaos process then deletes: the writers' compactions and erasures meet them;
   then a `vmem compact` SIGKILLed inside its erasure while the writers go on (their next compaction takes
   the dead holder's lease over); afterwards `vmem compact` must erase everywhere else and exit non-zero
   naming both files (stderr and the report's `in_doubt`), with no traceback;
4. the remedy its message names ("restore it"), then a `vmem compact` SIGKILLed inside its erasure (kill
   point `VMEM_COMPACT_HANG_AT=erase`), then a `vmem compact` that must erase at once (the dead holder's lease
   is taken over: `verified: true`, not deferred, no backlog left) and a `vmem build` that must succeed;
5. the oracle's check (0 acked writes lost, 0 deleted ids returned, labels, exact search), and the chaos
   checks: 0 duplicate ids in the item table, live count equal to the oracle's, every erasure report
   `verified: true` or naming only the files broken on purpose, no trace of an erased base item anywhere
   (tests/erasure_scan.py, independently of the product's own report).

`serve_chaos` is the HTTP part: `vmem serve` with 2 ingress replicas behind HAProxy, HTTP writers, one ingress
replica SIGKILLed while they write; then every acked add is found and every acked delete is gone.

The chaos process journals its own edits like a writer (runbook.Journal), so the oracle applies them the same
way; race items, whose vectors the journals do not describe, are handed to the oracle as `extra` items.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

import runbook as rb
from runbook_oracle import DEAD, LIVE, MAYBE, Item, Report, _last_line, verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RACE_LABEL, HTTP_LABEL = 900, 950  # labels no writer of the runbook deletes by (theirs are 1000 + 10p + j)
BAD_TAR, BAD_PART, GOOD_TARS = 1, 2, (3, 4)  # which tar / whose part is truncated; tars whose items are erased
ALREADY = "already in the memory"


@dataclass
class ChaosPlan:
    seed: int = 0
    processes: int = 3  # writers of the runbook
    ops: int = 10  # ops per writer
    race_processes: int = 4
    race_rounds: int = 8
    kinds: Dict[str, float] = field(default_factory=lambda: {k: v for k, v in rb.KINDS.items() if k != "rebuild"})
    bad_files: bool = True  # step 3 (a rebuild reads every part: `vmem build` runs after the remedy instead)
    kill_eraser: bool = True  # step 4
    kill_eraser_mid_run: bool = True  # also SIGKILL a `vmem compact` inside its erasure while the writers go on


def chaos_world(workdir: str, seed: int, overrides=(), n_base: int = 640, tars: int = 8) -> rb.World:
    return rb.World(workdir=workdir, n_base=n_base, seed=seed, overrides=list(overrides), tars=tars)


# ------------------------------------------------------------------------------------- CLI through a subprocess

def vmem(world: rb.World, *argv: str, env: Optional[dict] = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`vmem <argv>` on the world's config, as users run it."""
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv, *world.config_overrides()], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def json_docs(text: str) -> List[dict]:
    """The JSON documents a command printed, in order (vmem compact prints one or two)."""
    docs, dec, i = [], json.JSONDecoder(), 0
    while (i := text.find("{", i)) >= 0:
        try:
            doc, end = dec.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        docs.append(doc)
        i = end
    return docs


def erasures_of(out: str) -> List[object]:
    """Every `erasure` value `vmem compact` printed: a report summary (dict), a deferral (str) or None."""
    return [d["erasure"] for d in json_docs(out) if "erasure" in d]


# ------------------------------------------------------------------------------------- same-key races

def race_item(world: rb.World, seed: int, rnd: int, p: int):
    """(key, vector) process p adds in round `rnd`: one key per round, a different vector per process."""
    from pipeline.memory.synthetic import make_clusters

    s = make_clusters(1, world.dim, centres=world.base().centres, seed=seed * 7919 + rnd * 31 + p, prefix="x")
    return f"race{seed}-r{rnd}", s.xb[0]


def race_child(world: dict, seed: int, p: int, rounds: int, barrier, journal_path: str) -> None:
    """Meet the other racers at the barrier, then add this round's key with this process's vector."""
    import threading as _t

    from pipeline.memory import VisualMemory

    jr = rb.Journal(journal_path)
    w = rb.World(**world)
    cfg = w.config()
    mem = VisualMemory.open(cfg.memory_dir, cfg=cfg)
    jr.write(i=-1, phase="started", pid=os.getpid())
    for r in range(rounds):
        key, x = race_item(w, seed, r, p)
        try:
            barrier.wait(timeout=600)
        except _t.BrokenBarrierError:
            jr.write(i=r, phase="err", key=key, kind="BrokenBarrier", error="another racer is gone")
            break
        jr.write(i=r, phase="begin", key=key)
        try:
            ids = mem.add(embeddings=x[None, :], labels=[RACE_LABEL], keys=[key], sources=["race"],
                          label_names=["race"])
        except Exception as e:  # judged by the parent: only "already in the memory" is expected
            jr.write(i=r, phase="err", key=key, kind=type(e).__name__, error=str(e))
            continue
        jr.write(i=r, phase="ack", key=key, ids=[int(i) for i in ids])
    rb._close(mem)
    jr.write(i=rounds, phase="done")


def start_races(world: rb.World, plan: ChaosPlan, journal_dir: str):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(plan.race_processes)
    paths = [os.path.join(journal_dir, f"race-{p}.jsonl") for p in range(plan.race_processes)]
    procs = [ctx.Process(target=race_child, args=(asdict(world), plan.seed, p, plan.race_rounds, barrier, path),
                         daemon=True) for p, path in enumerate(paths)]
    for pr in procs:
        pr.start()
    return procs, paths, barrier  # the barrier must outlive the children's start (its semaphores die with it)


def judge_races(world: rb.World, plan: ChaosPlan, journals: List[List[dict]], exitcodes, report: Report
                ) -> Dict[int, Item]:
    """Exactly one ack per key (its vector is the one stored), every loser refused as a duplicate key."""
    acks, errs, done = defaultdict(list), defaultdict(list), 0
    for p, recs in enumerate(journals):
        for r in recs:
            if r["phase"] == "ack":
                acks[r["i"]].append((p, r["ids"]))
            elif r["phase"] == "err":
                errs[r["i"]].append((p, r["kind"], r["error"]))
        if recs and recs[-1]["phase"] == "done" and exitcodes[p] == 0:
            done += 1
        else:
            report.fail("racer_crashed_or_hung", f"racer {p}: exit {exitcodes[p]}, journal ends with "
                                                 f"{recs[-1] if recs else 'nothing'}")
    items: Dict[int, Item] = {}
    for rnd in range(plan.race_rounds):
        if len(acks[rnd]) != 1:
            report.fail("same_key_acks_not_one", f"round {rnd}: {len(acks[rnd])} acks {acks[rnd]}")
        for p, kind, error in errs[rnd]:
            if ALREADY not in error:
                report.fail("same_key_wrong_error", f"round {rnd} racer {p}: {kind}: {_last_line(error)}")
        for n, (p, ids) in enumerate(acks[rnd]):
            _, x = race_item(world, plan.seed, rnd, p)
            # two acks for one key: neither vector is sure (the report already fails)
            items[int(ids[0])] = Item(x, "race", {RACE_LABEL}, LIVE if len(acks[rnd]) == 1 else MAYBE)
    report.stats.update(race_rounds=plan.race_rounds, race_acks=sum(len(a) for a in acks.values()),
                        race_refused=sum(len(e) for e in errs.values()))
    return items


# ------------------------------------------------------------------------------------- the chaos process's edits

class ChaosOps:
    """The chaos process's own edits, journalled like a writer's so that the oracle applies them."""

    def __init__(self, world: rb.World, path: str):
        self.world, self.jr, self.i = world, rb.Journal(path), 0
        self.jr.write(i=-1, phase="started", pid=os.getpid())

    def op(self, op: dict, run):
        self.jr.write(i=self.i, phase="begin", op=op)
        try:
            result = run()
        except Exception as e:
            self.jr.write(i=self.i, phase="err", op=op, kind=type(e).__name__, error=str(e))
            self.i += 1
            raise
        self.jr.write(i=self.i, phase="ack", op=op, result=result)
        self.i += 1
        return result

    def delete(self, ids: List[int]) -> int:
        """Delete each id as an op of its own: a writer may have deleted one already (NotFound, journalled)."""
        from pipeline.memory import VisualMemory

        cfg = self.world.config()
        mem = VisualMemory.open(cfg.memory_dir, cfg=cfg)
        n = 0
        try:
            for i in ids:
                try:
                    n += self.op({"op": "delete_ids", "ids": [int(i)]},
                                 lambda: {"deleted": int(mem.delete(ids=[int(i)]))})["deleted"]
                except Exception:  # noqa: BLE001 - journalled; the oracle judges it
                    pass
        finally:
            rb._close(mem)
        return n

    def unacked(self, op: dict) -> None:
        """An op the chaos process killed: begun, never acknowledged."""
        self.jr.write(i=self.i, phase="begin", op=op)
        self.i += 1

    def done(self) -> None:
        self.jr.write(i=self.i, phase="done")


def base_ids_of_tar(world: rb.World, t: int, n: int, skip: int = 0) -> List[int]:
    per = world.n_base // world.tars
    return [int(i) for i in world.base().ids[t * per + skip: t * per + skip + n]]


def files_of(world: rb.World):
    from pipeline.embed.stage import part_name
    from pipeline import storage

    tar = storage.join(world.workdir, "shards", "train", f"train-{BAD_TAR:05d}.tar")
    part = storage.join(world.workdir, "embeddings", "train", part_name(BAD_PART))
    return tar, part


def truncate(url: str) -> bytes:
    """Cut the file mid-member (local or s3://); returns the original bytes (to restore it later)."""
    from pipeline import storage

    data = storage.read_bytes(url)
    storage.atomic_write_bytes(url, data[: len(data) // 2 + 100])
    return data


def _wait_for_progress(paths: List[str], records: int, timeout_s: float = 600) -> None:
    t0 = time.time()
    while sum(len(rb.read_journal(p)) for p in paths) < records and time.time() - t0 < timeout_s:
        time.sleep(0.2)


def chaos_mid_run(world: rb.World, plan: ChaosPlan, ops: ChaosOps, writer_paths: List[str], out: dict) -> None:
    """(thread) once the writers are under way: truncate a tar and a part, delete items they hold (and items
    of good tars), the originals to `out` for the remedy; then SIGKILL a `vmem compact` inside its erasure
    (a few tries: a writer's erasure may hold the lease, and the compaction then defers instead)."""
    try:
        _wait_for_progress(writer_paths, records=2 * len(writer_paths) + 4)
        if plan.bad_files:
            tar, part = files_of(world)
            out["originals"] = {tar: truncate(tar), part: truncate(part)}
        ids = base_ids_of_tar(world, BAD_TAR, 2) + base_ids_of_tar(world, BAD_PART, 2) + \
            base_ids_of_tar(world, GOOD_TARS[0], 2)
        ops.delete(ids)
        for attempt in range(5 if plan.kill_eraser_mid_run else 0):
            ops.unacked({"op": "compact"})
            if kill_during_erasure(world)["reached"]:
                out["eraser_killed_mid_run"] = attempt + 1
                break
    except Exception as e:  # noqa: BLE001 - reported by the parent
        out["error"] = f"{type(e).__name__}: {e}"


def kill_during_erasure(world: rb.World, timeout_s: float = 600) -> dict:
    """`vmem compact` stopped at its erasure (kill point), SIGKILLed there; the hang marker removed."""
    from pipeline import storage

    marker = storage.join(world.config().memory_dir, ".hang-erase")
    env = {**os.environ, "PYTHONPATH": ROOT, "VMEM_COMPACT_HANG_AT": "erase"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "compact", *world.config_overrides()], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not storage.exists(marker) and proc.poll() is None and time.time() - t0 < timeout_s:
        time.sleep(0.2)
    reached = storage.exists(marker)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    if reached:
        storage.remove(marker)
    return {"reached": reached, "pid": proc.pid, "output": out[-3000:], "killed_at": time.time()}


# ------------------------------------------------------------------------------------- the run

@dataclass
class ChaosResult:
    report: Report
    steps: Dict[str, dict] = field(default_factory=dict)  # what each chaos step saw (exit codes, reports)
    errors: Counter = field(default_factory=Counter)  # errors by kind (expected ones included)

    @property
    def ok(self) -> bool:
        return self.report.ok


def run_chaos(world: rb.World, plan: ChaosPlan, journal_dir: str, timeout_s: float = 1800) -> ChaosResult:
    """Build the world, run every step of the chaos runbook, check everything; see the module docstring."""
    os.makedirs(journal_dir, exist_ok=True)
    for name in os.listdir(journal_dir):
        os.remove(os.path.join(journal_dir, name))
    rb.build_world(world)
    wplan = rb.plan_runbook(world, plan.seed, plan.processes, plan.ops, kinds=plan.kinds)
    ops = ChaosOps(world, os.path.join(journal_dir, "chaos.jsonl"))
    res = ChaosResult(Report())
    report = res.report

    racers, race_paths, barrier = start_races(world, plan, journal_dir)
    broken: dict = {}
    writer_paths = [os.path.join(journal_dir, "journals", f"proc-{p}.jsonl") for p in range(plan.processes)]
    breaker = threading.Thread(target=chaos_mid_run, args=(world, plan, ops, writer_paths, broken), daemon=True)
    breaker.start()
    run = rb.run_runbook(world, wplan, os.path.join(journal_dir, "journals"), timeout_s=timeout_s)
    for pr in racers:
        pr.join(timeout_s)
        if pr.is_alive():  # (the barrier lives until here)
            os.kill(pr.pid, signal.SIGKILL)
            pr.join()
    breaker.join(timeout_s)
    if "error" in broken or breaker.is_alive() or (plan.bad_files and "originals" not in broken):
        report.fail("chaos_step_failed", f"mid-run chaos: {broken.get('error', 'never ended')}")
    res.steps["mid_run"] = {"eraser_killed_at_try": broken.get("eraser_killed_mid_run")}
    race_items = judge_races(world, plan, [rb.read_journal(p) for p in race_paths], [pr.exitcode for pr in racers],
                             report)

    if broken.get("originals"):
        _bad_files_step(world, broken["originals"], res)
    if plan.kill_eraser:
        _kill_eraser_step(world, ops, res)
    ops.done()

    # the writers' journals and the chaos process's, judged by one oracle
    joined = rb.RunResult(run.journals + [rb.read_journal(ops.jr.f.name)], run.exitcodes + [0], run.killed,
                          run.killed_mid_op, run.seconds)
    res.report = verify(world, wplan, joined, extra=race_items)
    res.report.counts.update(report.counts)
    for prop, ex in report.examples.items():
        res.report.examples[prop].extend(ex)
    res.report.stats.update(report.stats)
    _check_after(world, res, set(broken.get("originals", {})))
    race_journals = [rb.read_journal(p) for p in race_paths]
    for recs in joined.journals:
        res.errors.update(r["kind"] for r in recs if r["phase"] == "err")
    for recs in race_journals:
        res.errors.update(f"race:{r['kind']}" for r in recs if r["phase"] == "err")
    res.report.stats["ops"] = sum(r["phase"] == "begin" for recs in joined.journals + race_journals for r in recs)
    return res


def _bad_files_step(world: rb.World, originals: Dict[str, bytes], res: ChaosResult) -> None:
    """With both files still truncated: `vmem compact` erases everything else and exits non-zero naming them;
    then the remedy its message names (restore the file)."""
    from pipeline import storage

    out = vmem(world, "compact")
    step = res.steps["bad_files"] = {"rc": out.returncode, "erasures": erasures_of(out.stdout)}
    report = res.report
    if out.returncode == 0:
        report.fail("bad_file_not_reported", f"vmem compact exited 0 with truncated {sorted(originals)}")
    for url in originals:
        if f"erasure in doubt for {url}" not in out.stderr:
            report.fail("bad_file_not_named", f"{url} not named on stderr: {_last_line(out.stderr)}")
    if "Traceback" in out.stderr:
        report.fail("traceback", f"vmem compact with bad files: {out.stderr[-1500:]}")
    named = {u for e in step["erasures"] if isinstance(e, dict) for u in e.get("in_doubt", [])}
    if named != set(originals):
        report.fail("bad_file_not_in_report", f"in_doubt {sorted(named)} != {sorted(originals)}")
    for url, data in originals.items():  # the remedy: "restore it"
        storage.atomic_write_bytes(url, data)


def _kill_eraser_step(world: rb.World, ops: ChaosOps, res: ChaosResult) -> None:
    """Deletes, a `vmem compact` SIGKILLed inside its erasure, then a compaction that must erase at once and a
    `vmem build` that must commit."""
    from pipeline.memory import erasure

    report = res.report
    ops.delete(base_ids_of_tar(world, GOOD_TARS[1], 3, skip=4))
    ops.unacked({"op": "compact"})
    killed = kill_during_erasure(world)
    step = res.steps["kill_eraser"] = {"reached": killed["reached"]}
    if not killed["reached"]:
        report.fail("chaos_step_failed", f"the compaction never reached its erasure: {killed['output'][-800:]}")
        return
    out = vmem(world, "compact")
    step.update(rc=out.returncode, erasures=erasures_of(out.stdout),
                seconds_after_kill=round(time.time() - killed["killed_at"], 1))
    runs = [e for e in step["erasures"] if isinstance(e, dict)]
    if out.returncode != 0 or not runs or not all(e.get("verified") for e in runs):
        report.fail("erasure_after_kill_not_verified", f"rc {out.returncode}, erasure {step['erasures']}, "
                                                       f"stderr {_last_line(out.stderr)}")
    if any(isinstance(e, str) for e in step["erasures"]):
        report.fail("erasure_after_kill_deferred", f"{step['erasures']}")
    left = erasure.backlog(world.config().memory_dir)
    if left:
        report.fail("erasure_backlog_left", f"{len(left)} pending erasure(s) after the compaction")
    out = vmem(world, "build")
    step["build_rc"] = out.returncode
    if out.returncode != 0:
        report.fail("build_after_kill_failed", _last_line(out.stderr))


def check_counts(world: rb.World, items: Dict[int, Item], report: Report) -> None:
    """0 duplicate ids in the item table; the memory's live count equals the oracle's (after its check)."""
    from pipeline.memory import VisualMemory
    from pipeline.memory.state import ITEMS

    cfg = world.config()
    mem = VisualMemory.open(cfg.memory_dir, cfg=cfg)
    ids = mem.state[ITEMS].dataset().to_table(columns=["id"]).column("id").to_numpy()
    uniq, counts = np.unique(ids, return_counts=True)
    for i in uniq[counts > 1][:8]:
        report.fail("duplicate_ids", f"id {int(i)} has {int(counts[uniq == i][0])} rows in the item table")
    report.stats["duplicates"] = int((counts > 1).sum())
    live = sum(1 for it in items.values() if it.state == LIVE)
    stats = mem.stats()
    if stats["live_items"] != live:
        report.fail("count_differs_from_oracle", f"memory says {stats['live_items']} live items, oracle {live}")
    rb._close(mem)


def _check_after(world: rb.World, res: ChaosResult, broken: set) -> None:
    """Chaos checks beside the oracle's: duplicate ids, live count, erasure reports, an independent scan."""
    from erasure_scan import Needles, list_files, scan_tree
    from pipeline import storage

    report, items = res.report, res.report.items
    if not items:  # the memory did not open (reported by verify)
        return
    check_counts(world, items, report)

    reports = [u for u in list_files(world.workdir) if "/erasure/report-" in u and u.endswith(".json")]
    verified = 0
    for url in reports:
        r = storage.read_json(url)
        verified += bool(r.get("verified"))
        if not r.get("verified") and (r.get("found") or not r.get("in_doubt") or set(r["in_doubt"]) - broken):
            report.fail("erasure_report_not_verified", f"{url.rsplit('/', 1)[-1]}: found {r.get('found')}, "
                                                       f"in doubt {r.get('in_doubt')}")
    report.stats.update(erasure_reports=len(reports), reports_verified=verified)

    b = world.base()
    dead = {int(i): k for i, k in zip(b.ids, b.keys) if items.get(int(i)) and items[int(i)].state == DEAD}
    hits = scan_tree(world.workdir, Needles(dead)).hits if dead else []
    for h in hits[:8]:
        report.fail("erased_item_left_a_trace", str(h))
    report.stats["erased_base_items_scanned"] = len(dead)


def summary_row(res: ChaosResult) -> dict:
    """One row of the benchmark's table."""
    s, c = res.report.stats, res.report.counts
    acked = s.get("acked", {})
    return {"ops": s.get("ops", 0),
            "acks": sum(acked.values()) + s.get("race_acks", 0),
            "errors": dict(res.errors), "kills": int(s.get("killed") is not None) + int(
                res.steps.get("kill_eraser", {}).get("reached", False)) + int(
                bool(res.steps.get("mid_run", {}).get("eraser_killed_at_try"))),
            "lost": c.get("acked_write_lost", 0), "resurrected": c.get("deleted_id_returned", 0),
            "duplicates": s.get("duplicates", 0) + c.get("same_key_acks_not_one", 0),
            "reports": f"{s.get('reports_verified', 0)}/{s.get('erasure_reports', 0)}",
            "violations": sum(c.values())}


# ------------------------------------------------------------------------------------- vmem serve, a replica killed

def _http_item(world: rb.World, seed: int, w: int, n: int):
    """(key, vector) of HTTP writer w's n-th add."""
    from pipeline.memory.synthetic import make_clusters

    s = make_clusters(1, world.dim, centres=world.base().centres, seed=seed * 104729 + w * 7919 + n, prefix="h")
    return f"http{seed}-w{w}-{n}", s.xb[0]


def _ingress_replicas(pid: int) -> List[int]:
    """Pids of the ingress replicas (Ray sets their title to `ray::ServeReplica:<app>:ingress`)."""
    import psutil

    out = []
    for c in psutil.Process(pid).children(recursive=True):
        try:
            cmd = " ".join(c.cmdline())
        except psutil.Error:
            continue
        if "ServeReplica" in cmd and "ingress" in cmd:
            out.append(c.pid)
    return out


def _http_writer(base: str, world: rb.World, seed: int, w: int, stop: threading.Event, log: List[dict]) -> None:
    """Adds and deletes through HTTP, a new connection each (HAProxy spreads them over the replicas)."""
    import httpx

    from pipeline.data.ids import stable_id

    rng = np.random.default_rng(seed * 10 + w)
    auth = {"Authorization": "Bearer chaos-token"}
    mine: List[int] = []
    base_ids = world.base().ids
    n = 0
    while not stop.is_set():
        if rng.random() < 0.65 or not mine:
            key, x = _http_item(world, seed, w, n)
            rec = {"op": "add", "key": key, "n": n, "w": w, "id": stable_id(key)}
            n += 1
            try:
                r = httpx.post(f"{base}/v1/items", json={"embedding": x.tolist(), "label": HTTP_LABEL, "key": key,
                                                          "source": "http"}, headers=auth, timeout=120)
                rec["acked"] = r.status_code == 201
                rec["status"] = r.status_code
                if rec["acked"]:
                    rec["id"] = int(r.json()["id"])
                    mine.append(rec["id"])
            except httpx.HTTPError as e:
                rec.update(acked=False, status=type(e).__name__)
        else:
            pool = mine if rng.random() < 0.7 else base_ids.tolist()
            i = int(pool[int(rng.integers(len(pool)))])
            rec = {"op": "delete", "id": i}
            try:
                r = httpx.delete(f"{base}/v1/items/{i}", headers=auth, timeout=120)
                rec["acked"] = r.status_code == 200
                rec["status"] = r.status_code
            except httpx.HTTPError as e:
                rec.update(acked=False, status=type(e).__name__)
            if i in mine:
                mine.remove(i)
        log.append(rec)


def _http_races(base: str, world: rb.World, rounds: int, racers: int, report: Report) -> List[dict]:
    """Same key through HTTP from `racers` threads at once (new connections: both ingress replicas): exactly
    one 201 per key, every other answer the duplicate-key refusal (422 "already in the memory")."""
    import httpx

    from pipeline.data.ids import stable_id

    log: List[dict] = []
    for rnd in range(rounds):
        barrier, answers = threading.Barrier(racers), [None] * racers

        def post(p: int) -> None:
            key, x = race_item(world, world.seed, rnd, p)
            barrier.wait(120)
            try:
                r = httpx.post(f"{base}/v1/items", json={"embedding": x.tolist(), "label": RACE_LABEL, "key": key,
                                                          "source": "race"},
                               headers={"Authorization": "Bearer chaos-token"}, timeout=120)
                answers[p] = (r.status_code, r.text)
            except httpx.HTTPError as e:
                answers[p] = (type(e).__name__, str(e))

        threads = [threading.Thread(target=post, args=(p,)) for p in range(racers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        won = [p for p, a in enumerate(answers) if a and a[0] == 201]
        if len(won) != 1:
            report.fail("same_key_acks_not_one", f"HTTP round {rnd}: {len(won)} answers 201: {answers}")
        for p, a in enumerate(answers):
            if p not in won and not (a and a[0] == 422 and ALREADY in a[1]):
                report.fail("same_key_wrong_error", f"HTTP round {rnd} racer {p}: {a}")
        key, _ = race_item(world, world.seed, rnd, 0)
        log += [{"op": "race", "p": p, "rnd": rnd, "id": stable_id(key), "acked": len(won) == 1} for p in won]
    return log


def _http_get(base: str, i: int, timeout_s: float = 180) -> int:
    """GET /v1/items/<i>'s status, retried while the service is restarting a replica (5xx, connection)."""
    import httpx

    t0 = time.time()
    while True:
        try:
            code = httpx.get(f"{base}/v1/items/{i}", timeout=60).status_code
            if code < 500:
                return code
        except httpx.HTTPError:
            code = -1
        if time.time() - t0 > timeout_s:
            return code
        time.sleep(1)


def serve_chaos(world: rb.World, seconds: float = 40, writers: int = 2, kill_after_s: float = 10,
                start_timeout_s: float = 300, race_rounds: int = 4) -> ChaosResult:
    """`vmem serve` (2 ingress replicas behind HAProxy) under HTTP writes; one ingress replica SIGKILLed; then
    same-key HTTP races (exactly one 201 per key), every acked add is found (HTTP and a fresh open after the
    stop) and every acked delete is gone."""
    import uuid

    from pipeline.memory.synthetic import build_synthetic_memory
    from runbook_oracle import check_memory
    from test_serve_stop import MARK, free_port, processes_marked

    res = ChaosResult(Report())
    report = res.report
    cfg = world.config()
    build_synthetic_memory(cfg.memory_dir, world.base(), num_shards=2, index_key=f"IVF{rb.NLIST},Flat",
                           nprobe=rb.NLIST, source="base")
    port = free_port()
    mark = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": ROOT, "VMEM_TOKEN": "chaos-token", MARK: mark}
    args = ["serve", *world.config_overrides(), f"serve.port={port}", "serve.ingress_replicas=2", "ray.num_cpus=2"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    log: List[dict] = []
    try:
        if not _wait_healthy(base, proc, start_timeout_s):
            report.fail("chaos_step_failed", "vmem serve did not answer /healthz")
            return res
        stop = threading.Event()
        threads = [threading.Thread(target=_http_writer, args=(base, world, world.seed, w, stop, log), daemon=True)
                   for w in range(writers)]
        for t in threads:
            t.start()
        time.sleep(kill_after_s)
        replicas = _ingress_replicas(proc.pid)
        res.steps["serve"] = {"ingress_replicas": len(replicas)}
        if len(replicas) < 2:
            report.fail("chaos_step_failed", f"expected 2 ingress replicas, found {replicas}")
        if replicas:
            os.kill(replicas[0], signal.SIGKILL)
            res.steps["serve"]["killed"] = replicas[0]
        time.sleep(max(0.0, seconds - kill_after_s))
        stop.set()
        for t in threads:
            t.join(300)
        log += _http_races(base, world, race_rounds, 4, report)
        # through HTTP, whichever replica answers: acked adds found, acked deletes gone
        items = _http_oracle(world, log)
        for i, it in items.items():
            if it.source == "base" and it.state == LIVE:
                continue  # base items: checked after the stop
            code = _http_get(base, i)
            if it.state == LIVE and code != 200:
                report.fail("acked_write_lost", f"acked add {i}: GET answered {code}")
            elif it.state == DEAD and code != 404:
                report.fail("deleted_id_returned", f"acked delete {i}: GET answered {code}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        res.steps.setdefault("serve", {})["exit"] = proc.returncode
        for pid, _, _ in processes_marked(mark):  # never leave a replica behind for the next test
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    sub = Report()
    items = _http_oracle(world, log)
    check_memory(world, items, sub)  # a fresh open: every property of the oracle
    check_counts(world, items, sub)
    report.counts.update(sub.counts)
    for prop, ex in sub.examples.items():
        report.examples[prop].extend(ex)
    acks = sum(r["acked"] for r in log if r["op"] != "race")
    report.stats.update(sub.stats, ops=len(log), acks=acks, killed=res.steps["serve"].get("killed"))
    res.errors.update(str(r["status"]) for r in log if not r["acked"] and r["op"] != "race")
    return res


def _wait_healthy(base: str, proc, timeout_s: float) -> bool:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout_s and proc.poll() is None:
        try:
            if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


def _http_oracle(world: rb.World, log: List[dict]) -> Dict[int, Item]:
    """Base items plus the HTTP writers' adds, with their deletes applied (unacked: maybe)."""
    b = world.base()
    items = {int(i): Item(x, "base", {int(c)}) for i, x, c in zip(b.ids, b.xb, b.labels)}
    for rec in log:
        if rec["op"] == "add":
            _, x = _http_item(world, world.seed, rec["w"], rec["n"])
            items[rec["id"]] = Item(x, "http", {HTTP_LABEL}, LIVE if rec["acked"] else MAYBE)
        elif rec["op"] == "race":
            _, x = race_item(world, world.seed, rec["rnd"], rec["p"])
            items[rec["id"]] = Item(x, "race", {RACE_LABEL}, LIVE if rec["acked"] else MAYBE)
        elif rec["id"] in items and items[rec["id"]].state != DEAD:
            items[rec["id"]].state = DEAD if rec["acked"] else MAYBE
    return items

"""Scale benchmark (issue 19): one memory of 100k, 1M, 10M synthetic items through the REAL commands.

  nice -n 10 .venv/bin/python benchmarks/scale.py --items 100k,1M            (about an hour here)
  nohup nice -n 10 .venv/bin/python benchmarks/scale.py --items 10M --resume > work/scale/10M.log 2>&1 &

Data: clustered unit vectors (`benchmarks.index_scale.clustered`: clusters in a 24-d subspace lifted to the
encoder width, as real image embeddings have a low intrinsic dimension) of width 384 = DINOv2 ViT-S/14's output
(configs/paper/imagenet_dinov2_s14.yaml). 384 rather than 768 because of the disk here (`df -h /work`: 77 GB
free of 252 GB, shared): at 10M items the embedding parts are 10M x 384 x 4 B = 15.4 GB, the shards' re-rank
vectors as much again (float32, the default), the codes ~0.6 GB, and a compaction writes new shards beside the
old ones until erasure: ~48 GB at the peak. 768-d would need ~95 GB. Labels = cluster % 100, so the kNN
vote of `vmem eval` has something to find. Each size writes its training split (`embeddings/train`, parts of
250k rows as `vmem embed` writes them: `pipeline.embed.parts.write_part`) and a 10k-item `test` split (the
held-out recall queries of the build and the queries of `vmem eval`).

Steps, each in its own process, as a user runs them (CLI steps: `.venv/bin/vmem ...` with config overrides on
configs/demo.yaml; API steps: this file with `--worker STEP`, opening the memory through the Python API):
  generate  the embedding parts (this process; no RSS)
  build     `vmem build` (autofaiss under a byte budget of --bytes-per-item per item, target recall 0.95)
  open      a fresh process: VisualMemory.open + the first query
  exact     exact top-10 of 1,000 test queries over the parts (the ground truth of `query`)
  query     single-query p50/p99 (200 queries), batch QPS and recall@10 of 1,000 queries (memory.search)
  add       1,000 single adds (one call and one commit each), p50/p99
  delete    1,000 single deletes of built items, p50/p99; then the query p50 after the 2,000 edits
  compact   `vmem compact memory.grace_period_s=0` (folds the delta + deletions, erases the deleted items)
  audit     `vmem audit` when the command exists (skipped with a note otherwise)
  eval      `vmem eval --no-ood --no-exact eval.max_queries=10000` (ks 10, plurality)
  serve     `vmem serve`: RSS of the ingress and shard replicas once /healthz answers (--skip serve to omit)

For every step: wall seconds, the peak RSS of each process of its tree (sampled every 0.25 s with psutil; the
driver, Ray's raylet/GCS, each Ray worker by its task name), disk bytes per item of the workdir after it, and
the growth factor from the previous size. Ray start-up (~5-10 s) is inside every CLI step's wall time, as a
user sees it. Resumable: the finished steps of each size are kept in --results (JSON, committed: the machine,
date and figures `vmem plan` reads); --resume skips them. Writes <results>.csv, <results>.png (log-log time vs
items per step) and --markdown (docs/scale.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Dict, List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.index_scale import LATENT, clustered  # noqa: E402
from pipeline.index.units import parse_count  # noqa: E402

STEPS = ["generate", "build", "open", "exact", "query", "add", "delete", "compact", "audit", "eval", "serve"]
ROWS_PER_PART = 250_000
TEST_ITEMS = 10_000
EDITS = 1000
QUERIES = 1000
VMEM = os.path.join(os.path.dirname(sys.executable), "vmem")  # the venv's console script
# Children import `pipeline` from ROOT, so a snapshot of a commit (`git archive HEAD | tar -x -C DIR`; run
# DIR/benchmarks/scale.py with the repo's venv) is measured as committed while others edit the working tree.
CHILD_ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
PY = sys.executable


def size_name(n: int) -> str:
    for unit, v in (("B", 10 ** 9), ("M", 10 ** 6), ("k", 10 ** 3)):
        if n >= v and n % v == 0:
            return f"{n // v}{unit}"
    return str(n)


def base_ids(start: int, m: int) -> np.ndarray:
    """The ids of rows start..start+m of the training parts: unique, all of 19 digits like the 63-bit hashes
    `stable_id` gives real items (an id such as 1 is also every JSON `1`: `vmem audit` would rightly flag it)."""
    return np.arange(start, start + m, dtype=np.int64) * 2654435761 % (1 << 61) + (1 << 61)


# ---------------------------------------------------------------- data

def space(n: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(100, n // 2000), LATENT), dtype=np.float32)
    lift = rng.standard_normal((LATENT, dim), dtype=np.float32) / np.sqrt(LATENT)
    return rng, (centers, lift)


def write_split(emb_dir: str, rng, sp, n: int, first_id: int, key_prefix: str) -> None:
    """`n` labelled items as embedding parts of ROWS_PER_PART rows (atomic writes; a finished part is kept)."""
    from tqdm import tqdm

    from pipeline.embed.parts import to_table, write_part

    os.makedirs(emb_dir, exist_ok=True)
    for p, start in enumerate(tqdm(range(0, n, ROWS_PER_PART), desc=f"write {emb_dir}", unit="part")):
        m = min(ROWS_PER_PART, n - start)
        x, c = clustered(rng, sp, m, 0.35, labels=True)  # drawn even when the part exists: same stream on resume
        url = os.path.join(emb_dir, f"part-{p:05d}.parquet")
        if os.path.exists(url):
            continue
        ids = base_ids(first_id + start, m)
        lab = (c % 100).astype(np.int64)
        meta = {"id": ids, "key": [f"{key_prefix}/{first_id + start + i:09d}" for i in range(m)], "label": lab,
                "label_name": [f"class_{l}" for l in lab], "source": ["scale"] * m, "shard": [""] * m}
        write_part(to_table(meta, x), url)


def generate(workdir: str, n: int, dim: int) -> dict:
    rng, sp = space(n, dim)
    write_split(os.path.join(workdir, "embeddings", "train"), rng, sp, n, 0, "train")
    write_split(os.path.join(workdir, "embeddings", "test"), rng, sp, TEST_ITEMS, n, "test")
    return {}


def extra_vectors(n: int, dim: int, count: int, seed: int) -> np.ndarray:
    """`count` new vectors from the same clusters (the adds), drawn apart from the parts' stream."""
    _, sp = space(n, dim)
    return clustered(np.random.default_rng(seed), sp, count, 0.35, labels=True)


# ---------------------------------------------------------------- measuring a process tree

def _role(p) -> str:
    try:
        cmd = p.cmdline()
    except Exception:
        return "?"
    head = " ".join(cmd[:3])
    if head.startswith("ray::"):
        return head.split()[0]  # the Ray worker's current task / actor name
    for name in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "haproxy"):
        if name in head:
            return name
    return os.path.basename(cmd[0]) if cmd else "?"


def _run_measured(cmd: List[str], timeout: float, cwd: str = ROOT, env=None, until=None,
                 log_path: str = os.devnull) -> dict:
    """Run `cmd` in its own session; sample the RSS of every process of its tree; return wall seconds, exit
    status, peak RSS per process (by role) and the peak of the tree's sum. `until(proc)` True ends the run
    early (serve: once it answers), after which the whole session is stopped."""
    import psutil

    t0 = time.perf_counter()
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or CHILD_ENV, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    root = psutil.Process(proc.pid)
    peaks: Dict[int, List] = {}  # pid -> [role, peak rss]
    import threading

    chunks: List[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    try:
        tree_peak, status, early = _sample(proc, root, peaks, t0, timeout, until)
    finally:  # also on SIGTERM / Ctrl-C of this driver: no step outlives it (a later run would race it)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: the step's driver and the Ray it started
                proc.wait(60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.perf_counter() - t0
    reader.join(10)
    out = b"".join(chunks)
    log.close()
    if status == "ok" and early is None and proc.returncode != 0:
        status = f"failed (exit {proc.returncode}; see {log_path})"
    by_role: Dict[str, int] = {}
    anon: Dict[str, int] = {}
    for role, rss, rss_anon in peaks.values():
        by_role[role] = max(by_role.get(role, 0), rss)
        anon[role] = max(anon.get(role, 0), rss_anon)
    return {"wall_s": round(wall, 2), "status": status, "tree_peak_rss": tree_peak,
            "rss": dict(sorted(by_role.items(), key=lambda kv: -kv[1])),
            "rss_anon": dict(sorted(anon.items(), key=lambda kv: -kv[1])),
            "stdout": out.decode(errors="replace"), "early": early}


def _rss_anon(pid: int) -> int:
    """Anonymous resident bytes (heap, arrays): RSS without the file pages of memory-mapped shard files, which
    the OS may drop and which grow with the pages a search touched rather than with what the process holds."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _sample(proc, root, peaks: Dict[int, List], t0: float, timeout: float, until):
    """Poll the RSS of `proc`'s tree until it exits, times out or `until` says so: (tree peak, status, early)."""
    import psutil

    tree_peak, status, early = 0, "ok", None
    while proc.poll() is None:
        total = 0
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            rec = peaks.setdefault(p.pid, ["?", 0, 0])
            role = _role(p)
            if role not in ("?", "ray::IDLE") or rec[0] == "?":
                rec[0] = role if p.pid != proc.pid else "driver"
            rec[1] = max(rec[1], rss)
            rec[2] = max(rec[2], _rss_anon(p.pid))
        tree_peak = max(tree_peak, total)
        if time.perf_counter() - t0 > timeout:
            status = "timeout"
            break
        if until is not None:
            early = until(proc)
            if early is not None:
                break
        time.sleep(0.25)
    return tree_peak, status, early


def du(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


# ---------------------------------------------------------------- API steps (run in a child: --worker STEP)

def _cfg(workdir: str):
    from pipeline.config import load_config

    return load_config(None, overrides(workdir, 0))


def _queries(workdir: str) -> np.ndarray:
    from pipeline.index.build import vector_batches

    return np.concatenate([x for x, _ in vector_batches(os.path.join(workdir, "embeddings", "test"), 65536)])[:QUERIES]


def _pct(ms: List[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def delete_rows(n: int, round_: int) -> np.ndarray:
    """The rows round `round_` deletes: random rows (every part and every shard), none a previous round deleted
    (those are erased: deleting them again would count as nothing), never row 0, whose id 2^61 is 7 zero bytes
    and a 0x20 (any binary file holds that: erasure's raw-bytes check rightly calls it a trace; real ids are
    63-bit hashes)."""
    taken = np.zeros(0, np.int64)
    for r in range(round_ + 1):
        pool = np.setdiff1d(np.arange(1, n), taken, assume_unique=True)
        rows = np.random.default_rng(7 + r).choice(pool, size=min(EDITS, len(pool)), replace=False)
        taken = np.union1d(taken, rows)
    return np.sort(rows)


def worker(step: str, workdir: str, n: int, dim: int, round_: int = 0) -> dict:
    """One API step in this (fresh) process; returns its figures."""
    t_start = time.perf_counter()
    if step == "exact":
        from pipeline.index.build import vector_batches
        from pipeline.index.recall import exact_knn

        _, gt = exact_knn(_queries(workdir), vector_batches(os.path.join(workdir, "embeddings", "train"), 250000), 10)
        np.save(os.path.join(workdir, "gt.npy"), gt)
        return {}
    from pipeline import storage
    from pipeline.memory.memory import VisualMemory

    cfg = _cfg(workdir)
    storage.configure(cfg.storage)
    xq = _queries(workdir)
    t = time.perf_counter()
    mem = VisualMemory.open(cfg.memory_dir, cfg=cfg)
    if step == "open":
        mem.search(embeddings=xq[:1], k=10)
        return {"open_first_query_s": round(time.perf_counter() - t, 3),
                "process_to_answer_s": round(time.perf_counter() - t_start, 3)}

    def single_p(count: int) -> dict:
        mem.search(embeddings=xq[:5], k=10)  # warm
        ms = []
        for q in xq[:count]:
            t = time.perf_counter()
            mem.search(embeddings=q[None, :], k=10)
            ms.append((time.perf_counter() - t) * 1000)
        return _pct(ms)

    if step == "query":
        from pipeline.index.recall import recall_at

        gt = np.load(os.path.join(workdir, "gt.npy"))
        single = single_p(200)
        best, res = float("inf"), None
        for _ in range(3):
            t = time.perf_counter()
            res = mem.search(embeddings=xq, k=10)
            best = min(best, time.perf_counter() - t)
        return {"query_p50_ms": single["p50_ms"], "query_p99_ms": single["p99_ms"],
                "batch_qps": round(len(xq) / best, 1), "recall@10": round(float(recall_at(res.I, gt, 10)), 4),
                "nprobe": mem.snapshot().base.manifest.nprobe}
    if step == "add":  # round r > 0 (`--redo`): new keys and vectors
        x, c = extra_vectors(n, dim, EDITS, seed=12345 + round_)
        ms = []
        for i in range(EDITS):
            t = time.perf_counter()
            mem.add(embeddings=x[i:i + 1], labels=[int(c[i] % 100)],
                    keys=[f"scale-add{round_ or ''}/{i:06d}"])
            ms.append((time.perf_counter() - t) * 1000)
        return {f"add_{k}": v for k, v in _pct(ms).items()}
    if step == "delete":
        ids = base_ids(0, n)[delete_rows(n, round_)]
        ms = []
        for i in ids:
            t = time.perf_counter()
            mem.delete(ids=[int(i)])
            ms.append((time.perf_counter() - t) * 1000)
        after = single_p(200)
        res = mem.search(embeddings=xq, k=10)
        leaked = int(np.isin(res.I, ids).sum())
        return {**{f"delete_{k}": v for k, v in _pct(ms).items()}, "query_p50_after_edits_ms": after["p50_ms"],
                "deleted_returned": leaked}
    raise SystemExit(f"unknown worker step {step}")


# ---------------------------------------------------------------- the driver

def overrides(workdir: str, n: int, bytes_per_item: int = 48, shards: int = 2) -> List[str]:
    o = [f"workdir={workdir}", "ray.num_cpus=2", f"index.num_shards={shards}", "index.target_recall=0.95",
         "memory.k=10", "eval.ks=[10]", "eval.methods=[plurality]", "index.memory_per_node=16GiB",
         f"eval.max_queries={TEST_ITEMS}", "memory.grace_period_s=0"]
    if n:
        o.append(f"index.max_index_memory={n * bytes_per_item}")
    return o


def shards_for(n: int, shards: str) -> int:
    """`--shards`: a number, or auto = 2, and one per 1M items above 2M: a populate task holds ~6.5 KB per item
    of its shard (measured at 1M: 3.9 GB for 500k), so 10M on 2 shards would need 2 x 32 GB at once here."""
    if shards != "auto":
        return int(shards)
    return max(2, -(-n // 1_000_000))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_command(name: str) -> bool:
    out = subprocess.run([VMEM, "--help"], capture_output=True, text=True, cwd=ROOT, env=CHILD_ENV).stdout
    return any(line.strip().startswith(name + " ") or line.strip() == name for line in out.splitlines())


def run_step(step: str, workdir: str, n: int, args) -> dict:
    ov = overrides(workdir, n, args.bytes_per_item, shards_for(n, args.shards))
    timeout = args.timeout
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, f"{step}.log")

    def run_measured(cmd, timeout, **kw):  # every step's stderr in <workdir>/<step>.log
        return _run_measured(cmd, timeout, log_path=log_path, **kw)

    if step == "generate":
        t = time.perf_counter()
        generate(workdir, n, args.dim)
        return {"wall_s": round(time.perf_counter() - t, 2), "status": "ok", "rss": {}, "tree_peak_rss": 0}
    if step in ("open", "exact", "query", "add", "delete"):
        r = run_measured([PY, os.path.abspath(__file__), "--worker", step, "--workdir", workdir,
                          "--items", str(n), "--dim", str(args.dim), "--round", str(args.round)], timeout)
        if r["status"] == "ok":
            r.update(json.loads(r["stdout"].strip().splitlines()[-1]))
        return r
    if step == "build":
        return {**run_measured([VMEM, "build", *ov], timeout), **manifest_figures(workdir)}
    if step == "compact":
        return run_measured([VMEM, "compact", *ov], timeout)
    if step == "audit":
        if not has_command("audit"):
            return {"status": "skipped: no `vmem audit` command yet", "wall_s": None, "rss": {}, "tree_peak_rss": 0}
        return run_measured([VMEM, "audit", *ov], timeout)
    if step == "eval":
        return run_measured([VMEM, "eval", "--no-ood", "--no-exact", *ov], timeout)
    if step == "serve":
        port = free_port()
        env = dict(CHILD_ENV, VMEM_TOKEN="scale-bench")

        def ready(proc):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    return r.status if r.status == 200 else None
            except Exception:
                return None

        t0 = time.perf_counter()
        state = {"up": None}

        def until(proc):  # keep sampling 10 s after the first 200, so every replica has loaded its shard
            if state["up"] is None and ready(proc):
                state["up"] = time.perf_counter() - t0
            return "up" if state["up"] is not None and time.perf_counter() - t0 > state["up"] + 10 else None

        r = run_measured([VMEM, "serve", *ov, f"serve.port={port}"], timeout, env=env, until=until)
        r["ready_s"] = round(state["up"], 2) if state["up"] else None
        r["status"] = "ok" if state["up"] else r["status"] if r["status"] != "ok" else "never answered /healthz"
        return r
    raise ValueError(step)


def manifest_figures(workdir: str) -> dict:
    """What the build chose and measured, from the newest manifest (the workdir is removed after the run)."""
    import glob

    paths = sorted(glob.glob(os.path.join(workdir, "memory", "manifests", "v*.json")))
    if not paths:
        return {}
    with open(paths[-1]) as f:
        m = json.load(f)
    b = m.get("build", {})
    return {"index_key": m.get("index_key"), "nprobe": m.get("nprobe"), "rerank_k": m.get("rerank_k"),
            "build_recall@10": b.get("recall"), "index_bytes_per_item": round(b.get("bytes_per_item", 0), 1),
            "trainer": b.get("trainer"),
            "build_timings": {k: round(v, 1) for k, v in b.get("timings", {}).items()}}


def load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"sizes": {}}


def save(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # a kill mid-write leaves the previous results


def machine() -> dict:
    import psutil

    try:
        commit = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h %cI"], capture_output=True,
                                text=True).stdout.strip() or open(os.path.join(ROOT, "COMMIT")).read().strip()
    except OSError:
        commit = "?"
    return {"commit": commit, "host_cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "note": "2 cores shared with other agents' work; times are upper bounds of an idle machine's"}


# ---------------------------------------------------------------- report: CSV, PNG, markdown

COLUMNS = ["wall_s", "driver_rss_mb", "driver_anon_mb", "max_worker_rss_mb", "tree_peak_rss_mb", "disk_bytes_per_item"]


def rows(data: dict) -> List[dict]:
    out, prev = [], {}
    for name, size in sorted(data["sizes"].items(), key=lambda kv: kv[1]["items"]):
        n = size["items"]
        for step in STEPS:
            r = size["steps"].get(step)
            if r is None:
                continue
            rss = r.get("rss", {})
            workers = [v for k, v in rss.items() if k.startswith("ray::")]
            row = {"items": n, "step": step, "status": r.get("status"), "wall_s": r.get("wall_s"),
                   "driver_rss_mb": round(rss.get("driver", 0) / 2 ** 20) or None,
                   "driver_anon_mb": round(r.get("rss_anon", {}).get("driver", 0) / 2 ** 20) or None,
                   "max_worker_rss_mb": round(max(workers) / 2 ** 20) if workers else None,
                   "tree_peak_rss_mb": round(r.get("tree_peak_rss", 0) / 2 ** 20) or None,
                   "disk_bytes_per_item": r.get("disk_bytes_per_item"),
                   "figures": {k: v for k, v in r.items() if k not in ("rss", "rss_anon", "stdout", "early", "status", "wall_s",
                                                                      "tree_peak_rss", "disk_bytes",
                                                                      "disk_bytes_per_item", "finished_at")}}
            p = prev.get(step)
            row["time_growth"] = (round(row["wall_s"] / p["wall_s"], 2)
                                  if p and p.get("wall_s") and row["wall_s"] else None)
            row["driver_rss_growth"] = (round(row["driver_rss_mb"] / p["driver_rss_mb"], 2)
                                        if p and p.get("driver_rss_mb") and row["driver_rss_mb"] else None)
            if step == "serve":  # the processes a deployment sizes: ingress and shard replicas
                for role, key in (("ray::ServeReplica:vmem:ingress", "ingress_rss_mb"),
                                  ("ray::ServeReplica:vmem:shard", "shard_replica_rss_mb")):
                    vals = [v for k, v in rss.items() if k.startswith(role)]
                    if vals:
                        row["figures"][key] = round(max(vals) / 2 ** 20)
            if step == "build":
                row["populate_task_rss_mb"] = round(rss.get("ray::populate_shard", 0) / 2 ** 20) or None
                if row["populate_task_rss_mb"]:
                    row["figures"]["populate_task_rss_mb"] = row["populate_task_rss_mb"]
            prev[step] = row
            out.append(row)
    return out


def write_reports(data: dict, results: str, markdown: Optional[str]) -> None:
    import csv

    table = rows(data)
    base = os.path.splitext(results)[0]
    with open(base + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        keys = ["items", "step", "status", *COLUMNS, "time_growth", "driver_rss_growth", "figures"]
        w.writerow(keys)
        for r in table:
            w.writerow([json.dumps(r[k], sort_keys=True) if k == "figures" else r[k] for k in keys])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for step in STEPS:
            pts = [(r["items"], r["wall_s"]) for r in table if r["step"] == step and r["wall_s"]
                   and r["status"] == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=step)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("items")
        ax.set_ylabel("wall seconds (one process per step)")
        ax.set_title("vmem scale benchmark: time per step vs memory size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(base + ".png", dpi=110)
        plt.close(fig)
    except Exception as e:  # the CSV and table still matter without a plot
        print(f"plot skipped: {e}")
    if markdown:
        notes = ""
        if os.path.exists(markdown):  # hand-written findings below the marker survive every rewrite
            with open(markdown) as f:
                old = f.read()
            if NOTES in old:
                notes = "\n" + old[old.index(NOTES):]
        with open(markdown + ".tmp", "w") as f:
            f.write(markdown_table(data, table) + notes)
        os.replace(markdown + ".tmp", markdown)


NOTES = "<!-- notes: kept by benchmarks/scale.py -->"


def _fmt(v, spec="") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def markdown_table(data: dict, table: List[dict]) -> str:
    m = data.get("machine", {})
    lines = [
        "# Scale benchmark (`benchmarks/scale.py`)", "",
        f"Measured {data.get('updated', '?')} on {m.get('host_cpus', '?')} CPU cores, {m.get('ram_gib', '?')} GiB "
        f"RAM ({m.get('note', '')}). Synthetic clustered {data.get('dim', 384)}-d vectors (DINOv2 ViT-S/14's "
        "width), 2 shards (1 per 1M items above 2M: `shards` in the JSON), autofaiss under "
        f"{data.get('bytes_per_item', 48)} B/item, target recall@10 0.95. Every step is one process as a user runs "
        "it (CLI steps include Ray start-up). RSS = peak resident set sampled every 0.25 s: `driver` = the "
        "command's own process, `anon` = its anonymous part (RssAnon: without the file pages of memory-mapped "
        "shard and re-rank files, recorded from 10M on), `worker` = the largest Ray worker. Disk = bytes under the workdir (embedding "
        "parts included) per item, after the step. Growth = this size's time (or driver RSS) / the previous "
        "size's. Raw figures: `benchmarks/results/scale.json` / `.csv`; plot: `benchmarks/results/scale.png`.",
        "",
        "| items | step | status | wall s | x time | driver RSS MB | x RSS | driver anon MB | worker RSS MB | "
        "tree RSS MB | disk B/item | figures |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in table:
        figs = ", ".join(f"{k} {v}" for k, v in r["figures"].items() if v is not None and k not in ("nprobe",))
        lines.append(f"| {r['items']:,} | {r['step']} | {r['status']} | {_fmt(r['wall_s'])} | "
                     f"{_fmt(r['time_growth'])} | {_fmt(r['driver_rss_mb'])} | {_fmt(r['driver_rss_growth'])} | "
                     f"{_fmt(r['driver_anon_mb'])} | "
                     f"{_fmt(r['max_worker_rss_mb'])} | {_fmt(r['tree_peak_rss_mb'])} | "
                     f"{_fmt(r['disk_bytes_per_item'])} | {figs} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", default="100k,1M", help="comma-separated sizes, e.g. 100k,1M,10M")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "work", "scale"))
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "scale.json"))
    ap.add_argument("--markdown", default=os.path.join(ROOT, "docs", "scale.md"))
    ap.add_argument("--resume", action="store_true", help="skip the steps --results already holds for a size")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out (e.g. serve)")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds one step may run (then: timeout)")
    ap.add_argument("--bytes-per-item", type=int, default=48, help="autofaiss index memory budget per item")
    ap.add_argument("--shards", default="auto", help="index.num_shards (auto: 2 up to 2M items, then 1 per 1M)")
    ap.add_argument("--keep", action="store_true", help="keep each size's workdir (default: removed when done)")
    ap.add_argument("--report", action="store_true", help="only rewrite the CSV, plot and table from --results")
    ap.add_argument("--redo", default="", help="comma-separated steps to run again on the kept workdir even if "
                    "--results holds them (with --round: adds use new keys, deletes new rows)")
    ap.add_argument("--round", type=int, default=0, help="edit round of add/delete (0: the first run's keys/rows)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally`s that stop a running step
    if args.worker:
        from pipeline.runtime import setup_logging

        setup_logging("WARNING")
        fig = worker(args.worker, args.workdir, int(args.items), args.dim, args.round)
        print(json.dumps(fig))
        return 0

    os.makedirs(args.workdir, exist_ok=True)
    data = load(args.results)
    if args.report:
        write_reports(data, args.results, args.markdown)
        return 0
    data.update({"dim": args.dim, "bytes_per_item": args.bytes_per_item, "machine": machine()})
    skip = {s for s in args.skip.split(",") if s}
    redo = {s for s in args.redo.split(",") if s}
    for n in [parse_count(s) for s in args.items.split(",")]:
        name = size_name(n)
        wd = os.path.abspath(os.path.join(args.workdir, name))
        size = data["sizes"].get(name)
        if size is None or not args.resume:
            shutil.rmtree(wd, ignore_errors=True)
            size = data["sizes"][name] = {"items": n, "steps": {}}
        size["shards"] = shards_for(n, args.shards)
        for step in STEPS:
            if step in skip or (step not in redo and step in size["steps"]
                                and size["steps"][step].get("status") == "ok"):
                continue
            print(f"[{name}] {step} ...", flush=True)
            r = run_step(step, wd, n, args)
            r.pop("stdout", None)
            r.pop("early", None)
            r["disk_bytes"] = du(wd)
            r["disk_bytes_per_item"] = round(r["disk_bytes"] / n, 1)
            r["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            if step in redo:
                r["round"] = args.round
            size["steps"][step] = r
            data["updated"] = r["finished_at"][:10]
            save(args.results, data)
            write_reports(data, args.results, args.markdown)
            print(f"[{name}] {step}: {r['status']} in {r.get('wall_s')} s; "
                  f"{json.dumps({k: v for k, v in r.items() if k not in ('rss', 'finished_at')})}", flush=True)
            if step in ("generate", "build") and r["status"] != "ok":
                print(f"[{name}] cannot go on without {step}", flush=True)
                break
        done = [size["steps"].get(s, {}).get("status", "") for s in STEPS if s not in skip]
        if not args.keep and all(st == "ok" or st.startswith("skipped") for st in done):
            shutil.rmtree(wd, ignore_errors=True)  # 10M needs the disk 1M held
    return 0


if __name__ == "__main__":
    sys.exit(main())

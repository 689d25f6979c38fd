"""`vmem audit`: the whole-workdir scan for traces of erased items, as an on-demand Ray job.

Erasure itself checks only the files that held the items it erased (`erasure.py`); the audit reads every file
under the workdir (and the memory dir, if elsewhere), local or s3://, in parallel Ray tasks, and looks for any
erased item in it:
- by format: Parquet `id` columns, tar samples (json keys -> stable ids), faiss ids, JSON integers;
- in the raw bytes: decimal strings (one regex pass per file: every run of 13+ digits is looked up, never one
  substring scan per id) and, for ids given explicitly (`--ids`), the 8-byte little-endian form at any
  alignment;
- file names (blobs are named by id), and every version still on disk of the state tables (read by Lance).
It also checks the sha256 of every file the current manifest lists (index, metadata, re-rank vectors) against
the manifest: opening a shard checks the re-rank vectors' shape only (they are memory-mapped, and hashing them
would read every vector at each open), so bit rot in them is this job's to find.
Which ids are erased: the forget list keeps only a salted digest of an erased id, so every id-like value the
audit meets is hashed with the memory's salt and looked up among the digests of erased rows (no raw id of an
erased item exists anywhere to compare with, by design); ids passed with `--ids` are matched directly too.

Resumable: the files done (with their findings) are appended to `memory/audit/progress.jsonl` after each
batch of tasks, so a killed audit goes on where it stopped (`--restart` starts over). The verdict is written
atomically to `memory/audit/report-<time>.json`: files, bytes, ids checked, verdict, traces by file, and files
that could not be read, signed (a digest keyed with the memory's secret salt: `verify_report`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from typing import Dict, Iterable, List, Optional, Set

import numpy as np

from pipeline import storage

log = logging.getLogger("vmem.audit")

_DIGITS = re.compile(rb"-?\d{13,20}")
_STRUCTURED = (".parquet", ".tar", ".index", ".json", ".jsonl")  # formats read for ids whatever their size


def audit_dir(memory_dir: str) -> str:
    return storage.join(memory_dir, "audit")


def erased_digests(state) -> Set[str]:
    """Salted digests of every erased item (forget rows marked erased)."""
    from pipeline.memory.state import FORGET

    if not state[FORGET].exists():
        return set()
    t = state[FORGET].read(["digest", "erased"], "erased = true")
    return set(t.column("digest").to_pylist())


class Matcher:
    """Whether an id-like value is an erased item: salted digest look-up, or membership of explicit ids."""

    def __init__(self, salt: bytes, digests: Set[str], ids: Iterable[int] = (), raw_scan_max_bytes: int = 256 << 20):
        self.salt, self.digests, self.raw_scan_max_bytes = salt, set(digests), raw_scan_max_bytes
        self.ids = np.unique(np.asarray(list(ids), np.int64))
        self._seen: Dict[int, bool] = {}

    def erased(self, values: Iterable[int]) -> Set[int]:
        out = set()
        explicit = set(self.ids.tolist())
        for v in values:
            v = int(v)
            if not -(1 << 63) <= v < (1 << 63):
                continue
            hit = self._seen.get(v)
            if hit is None:
                d = hashlib.blake2b(v.to_bytes(8, "little", signed=True), key=self.salt, digest_size=16).hexdigest()
                hit = self._seen[v] = v in explicit or d in self.digests
                if len(self._seen) > 1_000_000:
                    self._seen.clear()
            if hit:
                out.add(v)
        return out


def scan_file(url: str, data: bytes, matcher: Matcher) -> Dict[str, object]:
    """Findings in one file: {"ids": number of id-like values looked at, "found": erased ids found, "how"}."""
    from pipeline.memory.erasure import _raw_hits, _structured_ids

    values = np.unique(np.asarray(_structured_ids(url, data), np.int64))
    how: Dict[int, str] = {i: "by format" for i in matcher.erased(values.tolist())}
    if len(data) <= matcher.raw_scan_max_bytes:
        runs = {int(m.group()) for m in _DIGITS.finditer(data) if len(m.group().lstrip(b"-")) <= 19}
        for i in matcher.erased(runs):
            how.setdefault(i, "decimal string")
        if len(matcher.ids):
            distinct = matcher.ids[np.abs(matcher.ids) >= (1 << 40)]
            if len(distinct):
                hit = _raw_hits(data, distinct, {}, [])
                for i in distinct[hit].tolist():
                    how.setdefault(int(i), "int64 bytes")
    name_runs = {int(m.group()) for m in _DIGITS.finditer(url.rsplit("/", 1)[-1].encode())
                 if len(m.group().lstrip(b"-")) <= 19}
    for i in matcher.erased(name_runs):
        how.setdefault(i, "file name")
    return {"ids": int(len(values) + len(set(how))), "found": len(how), "how": sorted(set(how.values()))}


def _scan_batch(urls: List[str], matcher: Matcher, env: dict, sums: Optional[Dict[str, str]] = None) -> List[dict]:
    """One Ray task: scan these files (one read each; `sums`: the expected sha256 of some of them)."""
    import os

    import ray

    os.environ.update(env)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return [dict(r, node=node) for r in _scan_files(urls, matcher, sums or {})]


def _scan_files(urls: List[str], matcher: Matcher, sums: Dict[str, str]) -> List[dict]:
    from pipeline.index.shard import sha256_url

    out = []
    for url in urls:
        try:
            fs, path = storage.filesystem(url)
            size = fs.size(path)
            if size > matcher.raw_scan_max_bytes and not url.endswith(_STRUCTURED):
                # Too big for the raw-byte scan and of no format that holds ids (re-rank vectors): only hashed
                # (streamed) when the manifest lists it.
                r = {"file": url, "bytes": int(size), "ids": 0, "found": 0, "how": [], "raw": False}
                out.append(_checked(r, url, sums, lambda: sha256_url(url)))
                continue
            data = storage.read_bytes(url)
        except FileNotFoundError:
            out.append({"file": url, "gone": True})
            continue
        try:
            r = scan_file(url, data, matcher)
        except Exception as e:  # noqa: BLE001 - an unreadable file is a finding of its own, never fatal
            out.append({"file": url, "bytes": len(data), "unreadable": f"{type(e).__name__}: {e}"[:300]})
            continue
        out.append(_checked({"file": url, "bytes": len(data), **r}, url, sums,
                            lambda: hashlib.sha256(data).hexdigest()))
    return out


def _checked(r: dict, url: str, sums: Dict[str, str], digest) -> dict:
    """`r` with "corrupt" set when `url` is a manifest file whose content does not hash to the manifest's sha256."""
    want = sums.get(url)
    if want and digest() != want:
        r["corrupt"] = f"sha256 differs from the manifest's {want[:12]}..."
    return r


def _manifest_sums(memory_dir: str) -> Dict[str, str]:
    """url -> sha256 of every file of the current manifest (empty before the first build)."""
    from pipeline.index.manifest import ManifestStore

    store = ManifestStore(memory_dir)
    if store.current_version() is None:
        return {}
    return {store.url(rel): sha for e in store.load().shards for rel, sha in e.files() if sha}


def _lance_tables(state, matcher: Matcher) -> List[dict]:
    """Every version still on disk of every state table with an `id` column (Lance's own reader)."""
    from pipeline.memory.state import OVERLAYS, SCHEMAS

    out = []
    for name in SCHEMAS:
        ds = state[name].dataset()
        if ds is None:
            continue
        col = "id" if "id" in ds.schema.names else ("target" if name == OVERLAYS else None)
        if col is None:
            continue
        for v in ds.versions():
            where = f"{state[name].url}@v{v['version']}"
            try:
                t = ds.checkout_version(v["version"]).to_table(columns=[col])
            except (OSError, ValueError) as e:
                out.append({"file": where, "unreadable": str(e)[:300]})
                continue
            vals = t.column(col).drop_null().to_pylist()
            if col == "target":
                vals = [int(x) for x in vals if isinstance(x, str) and x.lstrip("-").isdigit() and len(x) < 21]
            found = matcher.erased(vals)
            out.append({"file": where, "bytes": 0, "ids": len(vals), "found": len(found),
                        "how": ["lance version"] if found else []})
    return out


def _list_files(roots: List[str]) -> List[str]:
    from pipeline.memory.erasure import _files

    return sorted({u for r in roots for u in _files(r)})


def run_audit(memory_dir: str, cfg=None, ids: Iterable[int] = (), restart: bool = False,
              files_per_task: int = 16, progress: bool = True) -> dict:
    """Scan every file under the workdir for erased items in Ray tasks (Ray is started locally if needed);
    resumes from `memory/audit/progress.jsonl` unless `restart`. Writes and returns the report."""
    import ray
    from tqdm.auto import tqdm

    from pipeline.memory.erasure import workdir_of
    from pipeline.memory.state import MemoryState

    t0 = time.time()
    state = MemoryState(memory_dir)
    matcher = Matcher(state.salt(), erased_digests(state), ids)
    workdir = workdir_of(memory_dir, cfg)
    roots = [workdir] + ([] if storage.join(memory_dir, "").startswith(storage.join(workdir, "")) else [memory_dir])
    skip = storage.join(audit_dir(memory_dir), "")
    files = [u for u in _list_files(roots) if not u.startswith(skip)]
    prog_url = storage.join(audit_dir(memory_dir), "progress.jsonl")
    done: Dict[str, dict] = {}
    if not restart and storage.exists(prog_url):
        for line in storage.read_bytes(prog_url).splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a torn last line of a killed run: that batch is scanned again
            done[r["file"]] = r
        log.info("audit: resuming, %d of %d file(s) already scanned", len(done), len(files))
    todo = [u for u in files if u not in done]
    if not ray.is_initialized():
        if cfg is not None:
            from pipeline.runtime import init_ray

            init_ray(cfg)
        else:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_scan_batch)  # over every node
    m_ref = ray.put(matcher)
    env = storage.worker_env()
    sums = _manifest_sums(memory_dir)
    batches = [todo[i:i + files_per_task] for i in range(0, len(todo), files_per_task)]
    pending = [task.remote(b, m_ref, env, {u: sums[u] for u in b if u in sums}) for b in batches]
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in done.values())
    bar = tqdm(total=len(files), initial=len(done), desc="audit", unit="file", disable=not progress or None)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for r in ray.get(ready[0]):
                done[r["file"]] = r
                lines += json.dumps(r).encode() + b"\n"
                bar.update(1)
            storage.atomic_write_bytes(prog_url, lines)  # resumable: the files done so far
    finally:
        bar.close()
    tables = _lance_tables(state, matcher)
    results = [done[u] for u in files if u in done] + tables
    traces = {r["file"]: {"ids": r["found"], "how": r["how"]} for r in results if r.get("found")}
    unreadable = {r["file"]: r["unreadable"] for r in results if r.get("unreadable")}
    corrupt = {r["file"]: r["corrupt"] for r in results if r.get("corrupt")}
    verdict = ("traces found" if traces else "in doubt: unreadable files" if unreadable
               else "corrupt files" if corrupt else "clean")
    report = {"verdict": verdict, "clean": not traces and not unreadable and not corrupt, "workdir": workdir,
              "files": sum(1 for u in files if u in done and not done[u].get("gone")),
              "table_versions": len(tables),
              "large_files_not_read": sum(1 for r in results if r.get("raw") is False),
              "ray_nodes": len({r["node"] for r in done.values() if r.get("node")}),
              "bytes": int(sum(r.get("bytes", 0) for r in results)),
              "ids_checked": {"erased_digests": len(matcher.digests), "explicit_ids": int(len(matcher.ids))},
              "id_values_seen": int(sum(r.get("ids", 0) for r in results)),
              "checksums_checked": sum(1 for r in results if r.get("file") in sums),
              "traces": traces, "unreadable": unreadable, "corrupt": corrupt, "resumed_files": len(files) - len(todo),
              "started_at": t0, "finished_at": time.time(), "seconds": time.time() - t0}
    report["signature"] = _sign(state.salt(), report)
    url = storage.join(audit_dir(memory_dir), f"report-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-"
                                              f"{time.time_ns() % 10**9:09d}.json")
    storage.atomic_write_json(url, report)
    storage.remove(prog_url)
    report["report"] = url
    return report


def _sign(salt: bytes, report: dict) -> str:
    body = json.dumps({k: v for k, v in report.items() if k not in ("signature", "report")}, sort_keys=True)
    return hashlib.blake2b(body.encode(), key=salt, digest_size=16).hexdigest()


def verify_report(memory_dir: str, report: dict) -> bool:
    """Whether `report` is unchanged since the audit of this memory signed it (keyed with the memory's salt)."""
    from pipeline.memory.state import MemoryState

    return report.get("signature") == _sign(MemoryState(memory_dir).salt(), report)


def format_report(report: dict, max_lines: int = 20) -> List[str]:
    """Human lines: the verdict, then one line per file with traces, unreadable or corrupt."""
    lines = [f"audit: {report['verdict']}: {report['files']:,} file(s), {report['bytes']:,} bytes, "
             f"{report['ids_checked']['erased_digests']:,} erased item(s) checked"
             f"{', ' + str(report['ids_checked']['explicit_ids']) + ' explicit id(s)' if report['ids_checked']['explicit_ids'] else ''}"
             f" in {report['seconds']:.1f} s; report {report.get('report', '')}"]
    for f, t in list(report["traces"].items())[:max_lines]:
        lines.append(f"  trace: {f}: {t['ids']} erased id(s) ({', '.join(t['how'])})")
    for f, why in list(report["unreadable"].items())[:max_lines]:
        lines.append(f"  unreadable: {f}: {why} (restore or remove it, then audit again)")
    for f, why in list(report.get("corrupt", {}).items())[:max_lines]:
        lines.append(f"  corrupt: {f}: {why} (rebuild with `vmem build` or roll back to an older version)")
    return lines


def read_ids(path: Optional[str]) -> List[int]:
    """Ids from a file: a JSON list/object keys, or one per line."""
    if not path:
        return []
    from pipeline.errors import UserError

    try:
        text = storage.read_bytes(path).decode()
    except FileNotFoundError:
        raise UserError(f"--ids {path}: no such file") from None
    try:
        obj = json.loads(text)
        vals = list(obj) if isinstance(obj, (list, dict)) else [obj]
        return [int(v) for v in vals]
    except (ValueError, TypeError):
        pass
    try:
        return [int(x) for x in text.split()]
    except ValueError:
        raise UserError(f"--ids {path}: expected integer ids (a JSON list or one per line)") from None

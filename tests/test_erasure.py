"""Erasure means no trace under the workdir (issue 9), at a cost that follows what it erases (issues 17, 19).

After deletes and `vmem compact` (run through the CLI with `memory.grace_period_s=0`), every file under the
workdir is scanned for every deleted item by tests/erasure_scan.py, independently of the product's own
erasure report; the product's erasure rewrites and checks only the files that held the items (its report
names them), and `vmem audit` reads every file (its report counts every file under the workdir).

The workdir comes from the real stages on Fashion-MNIST (WebDataset tars, embedding parts, memory), and the
edits touch every artifact that can hold an item: a blob (an added image), the soft-pruning gamma overlay, the
interventions file, shards, logs. Deliberate exception (lead's decision): the forget list keeps a salted hash
of each erased id, which the scan cannot and need not match (see erasure_scan.py).

The fast tests use a synthetic workdir of the same layout (tars, embedding parts with their `_manifest.json`,
a memory whose items name their tar): erasure opens only the files that held the erased items (reads counted),
a killed eraser's lease is taken over at once, a truncated tar or part is reported and does not block, the
pending backlog is drained in one pass, and a compaction with nothing to fold commits no version.
"""
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import uuid

import pytest

from erasure_scan import PER_TAR, Needles, list_files, scan_tree
from erasure_scan import synthetic_workdir as _synthetic_workdir

CLASS = 3  # the class deleted by label


def _overrides(workdir, extra=()):
    return [f"workdir={workdir}", "data.splits={train: 240}", "data.samples_per_shard=64", "embed.image_size=64",
            "embed.pretrained=false", "embed.batch_size=32", "index.index_key=IVF8,Flat", "index.num_shards=2",
            "index.recall_queries=20", "index.recall_split=null", "ray.num_cpus=2", "memory.grace_period_s=0",
            *extra]


def _prepare(ov, image_path, result_path):
    """Spawned: stages -> memory -> edits that leave traces everywhere -> deletes. Writes {id: key} deleted."""
    import json

    from pipeline.cli import main
    from pipeline.config import load_config
    from pipeline import storage

    cfg = load_config(None, ov)
    storage.configure(cfg.storage)
    for argv in (["shards", "--split", "train"], ["embed", "--split", "train"], ["build"]):
        assert main([*argv, *ov]) == 0, argv
    from pipeline.embed.parts import read_embeddings

    t = read_embeddings(cfg.embeddings_dir("train"), ["id", "key", "label", "shard"]).to_pandas()
    by_label = t[t.label == CLASS]
    others = t[t.label != CLASS].head(3)
    # by_label.iloc[0] is relabelled to 5 below, and a delete by label deletes by the *current* label, so
    # it stays live; the items deleted are the rest of the class, three others by id and the added image.
    moved = int(by_label.id.iloc[0])
    dead = {int(i): k for i, k in zip(by_label.id, by_label.key) if int(i) != moved} | \
        {int(i): k for i, k in zip(others.id, others.key)}
    assert main(["add", image_path, "--label", "9", "--key", "erase-me-new", *ov]) == 0
    from pipeline.data.ids import stable_id

    new_id = stable_id("erase-me-new")
    dead[new_id] = "erase-me-new"
    victim = int(others.id.iloc[0])
    assert main(["intervene", "--item", f"{victim}:2", "--relabel", f"{moved}:5", *ov]) == 0
    assert main(["prune", "--no-hard", *ov]) == 0  # gamma overlay: one value per item id
    assert main(["delete", "--label", str(CLASS), *ov]) == 0
    ids = [a for i in list(others.id) + [new_id] for a in ("--id", str(int(i)))]
    assert main(["delete", *ids, *ov]) == 0
    tars = sorted(set(t[t.id.isin(list(dead))].shard))
    with open(result_path, "w") as f:
        json.dump({"dead": {str(i): k for i, k in dead.items()}, "tars": tars}, f)


def _run_erasure(tmp_path, workdir, extra=()):
    import json

    from PIL import Image

    ov = _overrides(workdir, extra)
    image = tmp_path / "new.png"
    Image.new("L", (28, 28), 200).save(image)
    result = tmp_path / "dead.json"
    p = mp.get_context("spawn").Process(target=_prepare, args=(ov, str(image), str(result)))
    p.start()
    p.join(600)
    assert p.exitcode == 0, "preparing the workdir failed (see the log above)"
    prepared = json.loads(result.read_text())
    dead = {int(i): k for i, k in prepared["dead"].items()}
    out = _vmem("compact", *ov)
    assert out.returncode == 0, out.stderr[-3000:]
    return dead, prepared["tars"], ov


def _json_docs(text):
    """The JSON documents `vmem compact` printed, in order."""
    import json

    docs, dec, i = [], json.JSONDecoder(), 0
    while (i := text.find("{", i)) >= 0:
        doc, end = dec.raw_decode(text, i)
        docs.append(doc)
        i = end
    return docs


def _vmem(*argv, env=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _cache_files(workdir):
    """Local copies of this workdir's s3:// files (pipeline.storage.local_copy's cache)."""
    cache = os.path.join(tempfile.gettempdir(), "vmem-cache")
    prefix = workdir.split("://", 1)[1].replace("/", "__")
    return [os.path.join(cache, n) for n in os.listdir(cache) if n.startswith(prefix)] if os.path.isdir(cache) else []


def _report_files(workdir):
    """The product's newest erasure report (JSON under .../erasure/report-*.json) and the files it checked."""
    from pipeline import storage

    reports = [u for u in list_files(workdir) if "/erasure/report-" in u and u.endswith(".json")]
    assert reports, "compaction wrote no erasure report"
    rep = storage.read_json(sorted(reports)[-1])
    return rep, rep["files_checked"]


def _rel(workdir, url):
    root = workdir.split("://", 1)[-1].rstrip("/")
    return str(url).split("://", 1)[-1].split(root + "/", 1)[-1]


def _check(workdir, dead, tars, ov):
    needles = Needles(dead)
    scan = scan_tree(workdir, needles, _cache_files(workdir) if "://" in workdir else ())
    assert len(scan.files) > 10  # tars, parts, shards, manifests at least
    assert not scan.hits, f"{len({h.id for h in scan.hits})} of {len(dead)} erased items left traces in " \
                          f"{len({h.path for h in scan.hits})} files:\n{scan.summary(workdir)}"

    rep, listed = _report_files(workdir)
    assert rep.get("verified") is True and rep["in_doubt"] == []
    # By locator: the image tars it checked are exactly those that held the erased items (not every tar).
    checked_tars = {_rel(workdir, u) for u in listed if str(u).endswith(".tar")}
    assert checked_tars == {_rel(workdir, t) for t in tars}

    # The whole-workdir scan is `vmem audit`: clean, and it read every file under the workdir.
    out = _vmem("audit", *ov)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    from pipeline import storage

    audits = [u for u in list_files(workdir) if "/audit/report-" in u]
    audit = storage.read_json(sorted(audits)[-1])
    on_disk = [u for u in list_files(workdir) if "/audit/" not in u]
    assert audit["verdict"] == "clean" and audit["files"] == len(on_disk) and audit["ids_checked"]["erased_digests"] >= len(dead)


@pytest.mark.slow
def test_compact_leaves_no_trace_of_deleted_items(tmp_path, fmnist_dir):
    workdir = str(tmp_path / "work")
    dead, tars, ov = _run_erasure(tmp_path, workdir)
    assert len(dead) > 20
    _check(workdir, dead, tars, ov)


@pytest.mark.slow
def test_compact_leaves_no_trace_on_s3(tmp_path, fmnist_dir, s3_server):
    workdir = f"s3://vmem-test/erasure-{uuid.uuid4().hex[:8]}"
    dead, tars, ov = _run_erasure(tmp_path, workdir, [f"storage.s3_endpoint_url={s3_server}"])
    _check(workdir, dead, tars, ov)


def test_the_scan_finds_a_planted_trace_in_every_format(tmp_path):
    """The scanner itself: one erased item planted in each format is found there, and clean files give nothing."""
    import json

    import faiss
    import lance
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.ids import stable_id
    from pipeline.data.shards import tar_key

    keys = {f"train/{i:06d}": stable_id(f"train/{i:06d}") for i in range(8)}
    ids = list(keys.values())
    dead = {ids[0]: "train/000000"}
    live = ids[1:]
    planted = {
        "parquet": lambda p, i: pq.write_table(pa.table({"id": pa.array([i] + live, pa.int64())}), p),
        "strings.parquet": lambda p, i: pq.write_table(pa.table({"k": [dead.get(i, "x"), "y"]}), p),
        "json": lambda p, i: open(p, "w").write(json.dumps({"gamma": {str(i): 0.5}, "live": live[:2]})),
        "jsonl": lambda p, i: open(p, "w").write("\n".join(json.dumps({"id": x}) for x in [live[0], i])),
        "index": lambda p, i: faiss.write_index(_idmap(np.array([i] + live, np.int64)), p),
        "ivf.index": lambda p, i: faiss.write_index(_ivf(np.array([i] + live, np.int64)), p),
        "bin": lambda p, i: open(p, "wb").write(b"\x00" * 7 + int(i).to_bytes(8, "little") + b"\x01"),
        "tar": lambda p, i: _tar(p, [k for k, v in keys.items() if v in (i, live[0])], tar_key),
    }
    needles = Needles(dead)
    for name, write in planted.items():
        clean, dirty = tmp_path / "clean", tmp_path / "dirty"
        clean.mkdir(exist_ok=True)
        dirty.mkdir(exist_ok=True)
        write(str(clean / f"f.{name}"), live[-1])
        write(str(dirty / f"f.{name}"), ids[0])
        assert not scan_tree(str(clean), needles).hits, name
        assert {h.id for h in scan_tree(str(dirty), needles).hits} == {ids[0]}, name
        (clean / f"f.{name}").unlink()
        (dirty / f"f.{name}").unlink()
    # Lance: a row deleted in the latest version is still found in an older version on disk
    uri = str(tmp_path / "lance" / "items.lance")
    lance.write_dataset(pa.table({"id": pa.array(ids, pa.int64())}), uri)
    lance.dataset(uri).delete(f"id = {ids[0]}")
    hits = scan_tree(str(tmp_path / "lance"), needles).hits
    assert any(h.how.startswith("lance v1") for h in hits) and not any(h.how.startswith("lance v2") for h in hits)
    assert any(h.how == "file name" for h in scan_tree(str(tmp_path), Needles({ids[0]: "k"}),
                                                        [_touch(tmp_path / f"{ids[0]}.png")]).hits)


def _touch(path):
    path.write_bytes(b"\x89PNG")
    return str(path)


def _idmap(ids):
    import faiss
    import numpy as np

    index = faiss.IndexIDMap2(faiss.IndexFlatIP(4))
    index.add_with_ids(np.random.default_rng(0).standard_normal((len(ids), 4)).astype("float32"), ids)
    return index


def _ivf(ids):
    import faiss
    import numpy as np

    x = np.random.default_rng(0).standard_normal((64, 4)).astype("float32")
    index = faiss.index_factory(4, "IVF2,Flat")
    index.train(x)
    index.add_with_ids(x[:len(ids)], ids)
    return index


def _tar(path, keys, tar_key):
    import io
    import json
    import tarfile

    with tarfile.open(path, "w") as tar:
        for k in keys:
            for ext, data in (("png", b"\x89PNG"), ("json", json.dumps({"label": 1}).encode())):
                info = tarfile.TarInfo(f"{tar_key(k)}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------ a synthetic workdir (fast)

def _pick(data, tar_indices, per=2):
    """`per` item ids from each of these tars."""
    return [int(data.ids[t * PER_TAR + j]) for t in tar_indices for j in range(per)]


class _ReadSpy:
    """Counts every file opened for reading through Python (fsspec's local files, `open`) under a root."""

    def __init__(self, monkeypatch, root):
        import builtins

        from pipeline import storage

        self.root, self.opened = str(root), []
        real_open, real_read = builtins.open, storage.read_bytes

        def spy_open(file, mode="r", *a, **k):
            if isinstance(file, str) and file.startswith(self.root) and "r" in mode and "+" not in mode:
                self.opened.append(file)
            return real_open(file, mode, *a, **k)

        def spy_read(url, *a, **k):
            self.opened.append(str(url))
            return real_read(url, *a, **k)

        monkeypatch.setattr(builtins, "open", spy_open)
        monkeypatch.setattr(storage, "read_bytes", spy_read)

    def under(self, *folder):
        base = "/".join([self.root, *folder]) + "/"
        return {p for p in self.opened if p.startswith(base)}


def test_erasure_reads_only_the_files_that_held_the_erased_items(tmp_path, monkeypatch):
    from pipeline.index.train import shard_of
    from pipeline.memory.memory import VisualMemory

    root = str(tmp_path / "work")
    data, tars, part_urls = _synthetic_workdir(root)
    mem = VisualMemory.open(f"{root}/memory")
    held = [2, 7]
    dead = _pick(data, held, per=3)
    mem.delete(ids=dead)
    spy = _ReadSpy(monkeypatch, root)
    report = mem.compact(grace_s=0)
    monkeypatch.undo()
    assert report["erasure"]["verified"] and report["erased_ids"] == len(dead)
    # Of 12 tars and 12 parts, erasure opened exactly the 2 of each that held the erased items.
    assert spy.under("shards", "train") == {tars[t] for t in held}
    assert {p for p in spy.under("embeddings", "train") if p.endswith(".parquet")} == {part_urls[t] for t in held}
    # Faiss shards: only those `shard_of` routes the erased ids to (compaction and verification alike).
    routed = {int(s) for s in shard_of(dead, 4)}
    opened_shards = {int(p.rsplit("/", 1)[-1].split("-")[1].split(".")[0])
                     for p in spy.under("memory", "shards") if p.endswith(".index")}
    assert opened_shards and opened_shards <= routed
    # And the items are gone from those files (the independent scanner).
    keys = {int(i): data.keys[list(data.ids).index(i)] for i in dead}
    hits = scan_tree(root, Needles(keys)).hits
    assert not hits, [str(h) for h in hits][:10]
    mem.close()


def test_a_killed_eraser_is_taken_over_at_once_then_build_succeeds(tmp_path, fmnist_dir):
    """SIGKILL of `vmem compact` while it erases (holding the lease): the next compaction takes the lease over
    at once (dead pid on this host), erases the whole backlog, and `vmem build` commits."""
    import signal
    import time

    from pipeline import storage
    from pipeline.memory import erasure
    from pipeline.memory.memory import VisualMemory

    root = str(tmp_path / "work")
    data, tars, _ = _synthetic_workdir(root)
    ov = [f"workdir={root}", "memory.grace_period_s=0", "index.index_key=IVF8,Flat", "index.num_shards=4",
          "index.recall_queries=10", "index.recall_split=null", "ray.num_cpus=2"]
    mem = VisualMemory.open(f"{root}/memory")
    dead = _pick(data, [1, 4])
    mem.delete(ids=dead)
    mem.close()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "VMEM_COMPACT_HANG_AT": "erase"}
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "compact", *ov], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hang = f"{root}/memory/.hang-erase"
    deadline = time.time() + 300
    while not os.path.exists(hang) and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert os.path.exists(hang), "the compaction never reached its erasure"
    p.send_signal(signal.SIGKILL)
    p.wait()
    os.remove(hang)
    gen, holder = erasure.leases.current(erasure.lease_folder(f"{root}/memory"))
    assert holder["pid"] == p.pid and not holder.get("released")  # the dead eraser's lease is left behind
    assert erasure.backlog(f"{root}/memory")  # and its pending ids
    out = _vmem("compact", *ov)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "deferred" not in out.stdout and '"verified": true' in out.stdout, out.stdout[-2000:]
    assert erasure.backlog(f"{root}/memory") == []
    keys = {int(i): data.keys[list(data.ids).index(i)] for i in dead}
    assert not scan_tree(root, Needles(keys)).hits
    out = _vmem("build", *ov)
    assert out.returncode == 0, out.stderr[-3000:]
    mem = VisualMemory.open(f"{root}/memory")
    assert mem.stats()["items"] == len(data.ids) - len(dead)
    assert not set(mem.search(embeddings=data.xb[:50], k=20).I.ravel().tolist()) & set(dead)
    mem.close()
    assert storage.exists(f"{root}/memory/erasure")


def _truncate(url, keep=0.5):
    with open(url, "rb") as f:
        data = f.read()
    with open(url, "wb") as f:
        f.write(data[: int(len(data) * keep) + 100])  # mid-member: not on a block boundary


@pytest.mark.parametrize("bad", ["tar", "part"])
def test_a_truncated_file_is_reported_and_does_not_block(tmp_path, bad):
    """A truncated tar (or embedding part) holding an erased item: compaction commits, erases everywhere else,
    reports the file (exit 2, one stderr line naming it and what to do), and a later compaction retries only
    that file; once it is removed (the remedy), erasure is verified and the backlog is empty."""
    import json

    from pipeline import storage
    from pipeline.memory import erasure
    from pipeline.memory.memory import VisualMemory

    root = str(tmp_path / "work")
    data, tars, part_urls = _synthetic_workdir(root)
    ov = [f"workdir={root}", "memory.grace_period_s=0"]
    mem = VisualMemory.open(f"{root}/memory")
    dead = _pick(data, [3, 9])
    mem.delete(ids=dead)
    mem.close()
    broken = tars[3] if bad == "tar" else part_urls[3]
    _truncate(broken)
    out = _vmem("compact", *ov)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"erasure in doubt for {broken}" in out.stderr and "restore it" in out.stderr
    assert "Traceback" not in out.stderr
    report = _json_docs(out.stdout)[0]
    assert report["version"] == 2  # the compaction itself committed
    assert report["erasure"]["in_doubt"] == [broken] and report["erasure"]["verified"] is False
    assert report["erased_ids"] == 2  # the two items of the good tar; the two in the bad file are in doubt
    good = {int(i): data.keys[list(data.ids).index(i)] for i in dead[2:]}
    assert not scan_tree(root, Needles(good), skip=[broken]).hits  # erased everywhere but the bad file
    mem = VisualMemory.open(f"{root}/memory")
    assert mem.stats()["items"] == len(data.ids) - len(dead)
    mem.close()
    left = erasure.backlog(f"{root}/memory")
    assert len(left) == 1 and len(left[0]["ids"]) == 2  # kept, with its locator, for the retry
    # The next compaction retries that file alone (still unreadable: still reported), never blocking.
    out = _vmem("compact", *ov)
    assert out.returncode == 2 and f"erasure in doubt for {broken}" in out.stderr
    storage.remove(broken)  # the remedy the message names
    out = _vmem("compact", *ov)
    assert out.returncode == 0, out.stderr[-3000:]
    assert erasure.backlog(f"{root}/memory") == []
    dead_all = {int(i): data.keys[list(data.ids).index(i)] for i in dead}
    hits = scan_tree(root, Needles(dead_all)).hits
    assert not hits, [str(h) for h in hits][:10]


@pytest.mark.parametrize("bad", ["tar", "part"])
def test_a_file_restored_from_an_old_backup_is_swept_for_every_erased_item(tmp_path, bad):
    """The chaos run's case: a backup taken before an erasure is restored as the remedy for a truncated file.
    It holds an item erased earlier (while the file was fine) as well as the one whose erasure it blocked: the
    retry erases both there, and an independent scan finds neither anywhere."""
    from pipeline.memory.memory import VisualMemory

    root = str(tmp_path / "work")
    data, tars, part_urls = _synthetic_workdir(root)
    ov = [f"workdir={root}", "memory.grace_period_s=0"]
    broken = tars[3] if bad == "tar" else part_urls[3]
    with open(broken, "rb") as f:
        backup = f.read()  # before any erasure
    first, second = _pick(data, [3], per=2)
    mem = VisualMemory.open(f"{root}/memory")
    mem.delete(ids=[first])
    assert mem.compact(grace_s=0)["erasure"]["verified"]  # erased from the file while it was fine
    mem.delete(ids=[second])
    mem.close()
    _truncate(broken)
    out = _vmem("compact", *ov)
    assert out.returncode == 2 and f"erasure in doubt for {broken}" in out.stderr, out.stderr[-3000:]
    with open(broken, "wb") as f:
        f.write(backup)  # the remedy, from a backup older than the first erasure
    out = _vmem("compact", *ov)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "back in 1 file(s) that returned from doubt" in out.stderr
    dead = {i: data.keys[list(data.ids).index(i)] for i in (first, second)}
    hits = scan_tree(root, Needles(dead)).hits
    assert not hits, [str(h) for h in hits][:10]


def test_one_backlog_drained_in_one_pass_and_no_empty_versions(tmp_path):
    """Compactions during the grace period append to one backlog; the first erasure after it drains every
    entry in one pass (one report). A compaction with nothing to fold or remove commits no version, and one
    that cannot erase says why ("deferred: ...") with erased_ids 0."""
    import time

    from pipeline.memory import erasure, lease
    from pipeline.memory.memory import VisualMemory

    root = str(tmp_path / "work")
    data, tars, _ = _synthetic_workdir(root)
    mem = VisualMemory.open(f"{root}/memory")
    for t in (0, 5, 8):
        mem.delete(ids=_pick(data, [t]))
        r = mem.compact(grace_s=3600)
        assert r["erased_ids"] == 0 and r["erasure"].startswith("deferred: grace period")
    v = mem.version
    assert v == 4 and len(erasure.backlog(mem.memory_dir)) == 3
    assert mem.compact(grace_s=3600) is None and mem.version == v  # deleted ids only wait: no new version
    # Another live eraser holds the lease: the drain defers and says so.
    held, _ = lease.acquire(erasure.lease_folder(mem.memory_dir), "erasure")
    st = erasure.drain(mem.memory_dir, mem.state, now=time.time() + 7200)
    assert st["status"] == "deferred" and "another eraser" in erasure.deferred_text(st)
    held.release()
    reports = erasure.erase_due(mem.memory_dir, mem.state, now=time.time() + 7200)
    assert len(reports) == 1 and reports[0]["pending_consumed"] == 3 and reports[0]["verified"]
    assert reports[0]["erased_ids"] == 6 and erasure.backlog(mem.memory_dir) == []
    assert mem.compact(grace_s=0) is None and mem.version == v
    mem.close()


def _compaction_loop(memory_dir, ids, rounds, out_path):
    """Spawned: delete two of `ids` per round (none when `ids` is empty), then compact with no grace."""
    import json

    from pipeline.memory.memory import VisualMemory

    mem = VisualMemory.open(memory_dir)
    reports = []
    for r in range(rounds):
        if ids:
            mem.delete(ids=ids[2 * r:2 * r + 2])
        rep = mem.compact(grace_s=0)
        reports.append(rep and {k: v for k, v in rep.items() if k != "erasure"} |
                       {"erasure": rep["erasure"] if isinstance(rep.get("erasure"), (str, type(None)))
                        else {"verified": rep["erasure"]["verified"]}})
    mem.close()
    with open(out_path, "w") as f:
        json.dump(reports, f)


def test_racing_compactions_commit_only_real_changes_and_leave_no_backlog(tmp_path):
    """Three processes delete and compact in loops, a fourth only compacts: every manifest version records a
    real change (no "removed 0, added 0"), an erasure that could not run said "deferred: ...", and after a final
    compaction the backlog is empty and no deleted item is left anywhere."""
    import json

    from pipeline.index.manifest import ManifestStore
    from pipeline.memory import erasure
    from pipeline.memory.memory import VisualMemory

    root = str(tmp_path / "work")
    data, _, _ = _synthetic_workdir(root)
    memory_dir = f"{root}/memory"
    rounds = 4
    owned = [_pick(data, [t], per=2 * rounds) for t in (0, 4, 8)]
    ctx = mp.get_context("spawn")
    outs = [str(tmp_path / f"out{i}.json") for i in range(4)]
    procs = [ctx.Process(target=_compaction_loop, args=(memory_dir, ids, rounds, o))
             for ids, o in zip(owned + [[]], outs)]
    [p.start() for p in procs]
    [p.join(600) for p in procs]
    assert all(p.exitcode == 0 for p in procs)
    reports = [r for o in outs for r in json.loads(open(o).read()) if r]
    for r in reports:
        e = r["erasure"]
        assert e is None or (isinstance(e, str) and e.startswith("deferred: ")) or e["verified"], r
        if isinstance(e, str):
            assert r["erased_ids"] == 0
    mem = VisualMemory.open(memory_dir)
    mem.compact(grace_s=0)
    mem.close()
    store = ManifestStore(memory_dir)
    for v in store.versions()[1:]:
        c = store.load(v).build["compaction"]
        assert c["removed"] + c["added"] > 0, f"v{v} changed nothing: {c}"
    assert erasure.backlog(memory_dir) == []
    dead = [i for ids in owned for i in ids]
    keys = {int(i): data.keys[list(data.ids).index(i)] for i in dead}
    hits = scan_tree(root, Needles(keys)).hits
    assert not hits, [str(h) for h in hits][:10]
    mem = VisualMemory.open(memory_dir)
    assert mem.stats()["items"] == len(data.ids) - len(dead)
    mem.close()

"""`vmem audit` (pipeline/memory/audit.py): the whole-workdir scan as a Ray job. After a real erasure it passes
on the workdir; an erased id planted on purpose (a JSON value, a decimal inside a log line, a Parquet id column)
is found there and only there; local and on the S3 test server; resumable from its progress file."""
import json
import os
import subprocess
import sys
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from erasure_scan import PER_TAR, synthetic_workdir
from pipeline import storage


def _erased_workdir(root):
    from pipeline.memory.memory import VisualMemory

    data, _, _ = synthetic_workdir(root)
    mem = VisualMemory.open(storage.join(root, "memory"))
    dead = [int(data.ids[t * PER_TAR + j]) for t in (1, 6) for j in range(3)]
    mem.delete(ids=dead)
    assert mem.compact(grace_s=0)["erasure"]["verified"]
    mem.close()
    return data, dead


def _plant(root, erased_id):
    """Three traces of one erased id, in three formats; returns their URLs."""
    a, b, c = (storage.join(root, "leaks", n) for n in ("notes.json", "run.log", "export.parquet"))
    storage.atomic_write_json(a, {"kept": {"item": erased_id}})
    storage.atomic_write_bytes(b, f"12:00:01 erased item{erased_id}, done\n".encode())
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": pa.array([1 << 50, erased_id], pa.int64())}), buf)
    storage.atomic_write_bytes(c, buf.getvalue().to_pybytes())
    return {a, b, c}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_audit_passes_clean_and_finds_a_planted_trace(tmp_path, where, request, ray_session):
    from pipeline.memory.audit import run_audit, verify_report

    if where == "s3":
        request.getfixturevalue("s3_server")
    root = str(tmp_path / "work") if where == "local" else f"s3://vmem-test/audit-{uuid.uuid4().hex[:8]}"
    data, dead = _erased_workdir(root)
    memory_dir = storage.join(root, "memory")
    clean = run_audit(memory_dir, progress=False)
    assert clean["verdict"] == "clean" and not clean["traces"] and not clean["unreadable"]
    assert clean["ids_checked"]["erased_digests"] == len(dead) and clean["files"] > 12 + 12 + 8
    stored = storage.read_json(clean["report"])
    assert stored["verdict"] == "clean" and verify_report(memory_dir, stored)
    assert not verify_report(memory_dir, {**stored, "verdict": "clean", "files": stored["files"] + 1})
    planted = _plant(root, dead[0])
    found = run_audit(memory_dir, progress=False)
    assert found["verdict"] == "traces found"
    assert set(found["traces"]) == planted, found["traces"]
    assert all(t["ids"] == 1 for t in found["traces"].values())
    # A live id written the same way is no trace.
    for url in planted:
        storage.remove(url)
    _plant(root, int(data.ids[0]))
    assert run_audit(memory_dir, progress=False)["verdict"] == "clean"
    # One flipped byte in a file of the current manifest (the shard's largest) is a corrupt file, named.
    from pipeline.index.manifest import ManifestStore

    store = ManifestStore(memory_dir)
    rel = store.load().shards[0].files()[-1][0]
    raw = bytearray(storage.read_bytes(store.url(rel)))
    raw[len(raw) // 2] ^= 0xFF
    storage.atomic_write_bytes(store.url(rel), bytes(raw))
    bad = run_audit(memory_dir, progress=False)
    assert bad["verdict"] == "corrupt files" and list(bad["corrupt"]) == [store.url(rel)], bad["corrupt"]
    assert not bad["clean"] and bad["checksums_checked"] >= 2


def test_audit_resumes_from_its_progress_file(tmp_path, ray_session):
    from pipeline.memory.audit import audit_dir, run_audit

    root = str(tmp_path / "work")
    _erased_workdir(root)
    memory_dir = storage.join(root, "memory")
    first = storage.join(root, "shards", "train", "train-00000.tar")
    # A killed audit left this: one file done (with a finding, so the report shows the resume was used).
    storage.atomic_write_bytes(storage.join(audit_dir(memory_dir), "progress.jsonl"),
                               json.dumps({"file": first, "bytes": 1, "ids": 1, "found": 1, "how": ["x"]}).encode()
                               + b"\n{torn")
    resumed = run_audit(memory_dir, progress=False)
    assert resumed["resumed_files"] == 1 and set(resumed["traces"]) == {first}
    assert not storage.exists(storage.join(audit_dir(memory_dir), "progress.jsonl"))
    again = run_audit(memory_dir, progress=False)  # finished: the next audit starts from scratch
    assert again["resumed_files"] == 0 and again["verdict"] == "clean"


def test_vmem_audit_exit_codes(tmp_path):
    """Through the CLI: exit 0 on a clean workdir, 1 with one line per file holding a trace."""
    root = str(tmp_path / "work")
    _, dead = _erased_workdir(root)
    ov = [f"workdir={root}", "ray.num_cpus=2"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = lambda: subprocess.run([sys.executable, "-m", "pipeline.cli", "audit", *ov], env=env,  # noqa: E731
                                 capture_output=True, text=True, timeout=600)
    out = run()
    assert out.returncode == 0 and "audit: clean" in out.stdout, out.stdout + out.stderr[-3000:]
    planted = _plant(root, dead[-1])
    out = run()
    assert out.returncode == 1 and "audit: traces found" in out.stdout, out.stdout + out.stderr[-3000:]
    assert all(f"trace: {u}" in out.stderr for u in planted)


def _audit_on_two_nodes(memory_dir, out_path):
    """Spawned: a 2-node local Ray cluster (Ray's own `cluster_utils`, two raylets), then the audit on it."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.memory.audit import run_audit

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        report = run_audit(memory_dir, progress=False, files_per_task=2)
        with open(out_path, "w") as f:
            json.dump({"nodes": len(ray.nodes()), **{k: report[k] for k in ("verdict", "files", "ray_nodes")}}, f)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_audit_spreads_over_a_two_node_ray_cluster(tmp_path):
    import multiprocessing as mp

    root = str(tmp_path / "work")
    _erased_workdir(root)
    out = tmp_path / "out.json"
    p = mp.get_context("spawn").Process(target=_audit_on_two_nodes, args=(storage.join(root, "memory"), str(out)))
    p.start()
    p.join(600)
    assert p.exitcode == 0
    r = json.loads(out.read_text())
    assert r["nodes"] == 2 and r["ray_nodes"] == 2 and r["verdict"] == "clean" and r["files"] > 30

"""Crash during compaction: a real subprocess is SIGKILLed at each step; the memory reopens with nothing lost."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.index.manifest import ManifestStore
from pipeline.memory.memory import VisualMemory
from pipeline.memory.synthetic import build_synthetic_memory, make_clusters

SCRIPT = "from pipeline.memory.memory import VisualMemory; VisualMemory.open({d!r}).compact()"


def _live_ids(mem_dir):
    mem = VisualMemory.open(mem_dir)
    nb = mem.search(embeddings=np.eye(32, dtype=np.float32), k=2000)
    ids = set(nb.I[nb.I >= 0].tolist())
    stats = mem.stats()
    mem.close()
    return ids, stats


@pytest.mark.parametrize("step", ["start", "shard", "before_commit", "after_commit", "before_erase"])
def test_kill_during_compaction_loses_nothing(tmp_path, step):
    data = make_clusters(600, 32, 5, seed=2)
    mem_dir = str(tmp_path / "memory")
    build_synthetic_memory(mem_dir, data, index_key="IVF4,Flat", nprobe=4)
    mem = VisualMemory.open(mem_dir)
    extra = make_clusters(20, 32, centres=data.centres, seed=4, prefix="extra")
    added = mem.add(embeddings=extra.xb, labels=extra.labels.tolist(), keys=extra.keys)
    dead = data.ids[:40].tolist() + added[:2]
    mem.delete(ids=dead)
    mem.close()
    expected = (set(data.ids.tolist()) | set(added)) - set(dead)

    env = {**os.environ, "VMEM_COMPACT_HANG_AT": step, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(d=mem_dir)], env=env)
    marker = os.path.join(mem_dir, f".hang-{step}")
    deadline = time.time() + 60
    while not os.path.exists(marker):
        assert proc.poll() is None, f"compaction exited before reaching {step}"
        assert time.time() < deadline, f"compaction never reached {step}"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    ids, stats = _live_ids(mem_dir)
    assert ids == expected
    assert stats["live_items"] == len(expected)
    committed = step in ("after_commit", "before_erase")
    assert stats["version"] == (2 if committed else 1)
    # and a later compaction (no hang) finishes the job and erases the deleted ids
    mem = VisualMemory.open(mem_dir)
    report = mem.compact(force=True, grace_s=0)
    assert report["erasure"]["verified"]
    mem.close()
    ids, stats = _live_ids(mem_dir)
    assert ids == expected and stats["tombstones"] == 0 and stats["delta_items"] == 0
    # nothing superseded survives, also what a killed compaction left behind
    folders = {e.path.split("/")[1] for e in ManifestStore(mem_dir).load().shards}
    assert sorted(os.listdir(os.path.join(mem_dir, "shards"))) == sorted(folders)

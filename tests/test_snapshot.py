"""A snapshot is a value: its answers do not change while other processes add, delete, compact and erase;
the memory's next snapshot sees every one of those edits. Real Lance state, real faiss shards, real processes."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

EDITOR = textwrap.dedent("""
    import sys
    import numpy as np
    from pipeline.config import load_config
    from pipeline.memory import VisualMemory

    workdir, seed, victims = sys.argv[1], int(sys.argv[2]), [int(i) for i in sys.argv[3].split(",")]
    cfg = load_config(None, [f"workdir={workdir}", "memory.grace_period_s=0"])
    mem = VisualMemory.open(cfg.memory_dir, cfg=cfg)
    rng = np.random.default_rng(seed)
    xq = np.load(f"{workdir}/queries.npy")
    # New items right on top of the queries: any reader that saw them would change its answer.
    mem.add(embeddings=xq[:5] + rng.normal(0, 1e-3, (5, xq.shape[1])).astype(np.float32), labels=[9] * 5,
            keys=[f"editor-{seed}-{i}" for i in range(5)])
    assert mem.delete(ids=victims) == len(victims)
    mem.relabel([int(i) for i in mem.search(embeddings=xq[5:6], k=1).I[0]], 8)
    report = mem.compact()
    print("compacted", None if report is None else report["version"])
""")


def test_a_snapshot_answers_the_same_while_other_processes_edit_compact_and_erase(make_config, tmp_path):
    from pipeline.data.ids import stable_id
    from pipeline.memory import VisualMemory
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters

    cfg = make_config("memory.grace_period_s=0")
    data = make_clusters(800, dim=16, seed=7, num_classes=5)
    build_synthetic_memory(cfg.memory_dir, data, num_shards=2, index_key="IVF4,Flat", nprobe=4)
    mem = VisualMemory.open(cfg.memory_dir, cfg=cfg)
    mem.add(embeddings=data.xb[:3] * -1, labels=[1, 2, 3], keys=["delta-a", "delta-b", "delta-c"])  # a delta
    rng = np.random.default_rng(0)
    xq = data.xb[rng.choice(len(data.xb), 20, replace=False)]
    np.save(tmp_path / "work" / "queries.npy", xq)

    snap = mem.snapshot()
    before = snap.search(xq, 10)
    preds = [(p.label, [n.id for n in p.neighbors]) for p in snap.predict(before, "rank")]
    victims = sorted({int(i) for i in before.I[:, :3].reshape(-1)})[:8]  # items the snapshot returns
    for seed in (1, 2):  # two editing processes, one after the other (each compacts and erases)
        mine = victims[:4] if seed == 1 else victims[4:]
        out = subprocess.run([sys.executable, "-c", EDITOR, str(tmp_path / "work"), str(seed),
                              ",".join(map(str, mine))], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "compacted 2" in out.stdout or "compacted 3" in out.stdout, out.stdout

    after = snap.search(xq, 10)  # the same snapshot, after adds, deletes, relabels, two compactions, erasure
    np.testing.assert_array_equal(after.I, before.I)
    np.testing.assert_array_equal(after.D, before.D)
    np.testing.assert_array_equal(after.labels, before.labels)
    assert [(p.label, [n.id for n in p.neighbors]) for p in snap.predict(after, "rank")] == preds

    fresh = mem.snapshot()  # the memory itself follows: a new snapshot holds every edit
    assert fresh is not snap and fresh.version == 3
    nb = fresh.search(xq, 10)
    assert not np.isin(nb.I, victims).any()
    added = {stable_id(f"editor-{seed}-{i}") for seed in (1, 2) for i in range(5)}
    assert np.isin(nb.I[:5, :3], list(added)).sum(axis=1).min() >= 2  # each editor's item next to its query


ADDER = textwrap.dedent("""
    import sys
    import numpy as np
    from pipeline.memory import VisualMemory
    import pipeline.index.changes as changes

    memory_dir, key, bump = sys.argv[1], sys.argv[2], sys.argv[3] == "bump"
    if not bump:  # a writer killed after its commit, before its token: the edit is committed, never acknowledged
        changes.bump = lambda memory_dir: None
    x = np.load(sys.argv[4])
    print(VisualMemory.open(memory_dir).add(embeddings=x, labels=[4], keys=[key])[0])
""")


def test_the_change_token_spares_the_polls_and_never_hides_an_acknowledged_edit(make_config, tmp_path, monkeypatch):
    from pipeline.memory import VisualMemory, snapshot
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters

    cfg = make_config()
    data = make_clusters(400, dim=16, seed=3, num_classes=4)
    build_synthetic_memory(cfg.memory_dir, data, num_shards=2, index_key="IVF4,Flat", nprobe=4)
    mem = VisualMemory.open(cfg.memory_dir, cfg=cfg)
    polls = []
    versions = mem._follower._versions
    monkeypatch.setattr(mem._follower, "_versions", lambda: polls.append(1) or versions())
    monkeypatch.setattr(snapshot, "FULL_POLL_S", 600.0)

    def add_elsewhere(key, bump, seed):
        x = np.random.default_rng(seed).normal(size=(1, 16)).astype(np.float32)
        np.save(tmp_path / f"{key}.npy", x)
        out = subprocess.run([sys.executable, "-c", ADDER, cfg.memory_dir, key, "bump" if bump else "no",
                              str(tmp_path / f"{key}.npy")], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return int(out.stdout.split()[-1]), x

    mem.snapshot()
    before = len(polls)
    for _ in range(20):  # nothing committed anywhere: the token is unchanged, no query polls
        mem.snapshot()
    assert len(polls) == before
    # Acknowledged by another process: the very next query sees it (the token moved, so it polls).
    i, x = add_elsewhere("acked", True, 1)
    assert mem.search(embeddings=x, k=1).I[0, 0] == i and len(polls) > before
    # Committed without a token (killed before its bump): unseen while the token says nothing changed, seen
    # by the periodic full poll.
    j, y = add_elsewhere("unacked", False, 2)
    assert mem.search(embeddings=y, k=1).I[0, 0] != j
    monkeypatch.setattr(snapshot, "FULL_POLL_S", 0.0)
    assert mem.search(embeddings=y, k=1).I[0, 0] == j

"""The state tables under races and under many edits, with real processes and real Lance tables:

- the same key added by 4 processes at once, many rounds: exactly one add wins each round (none for a deleted
  key), ids stay unique, the item count equals the oracle's;
- upkeep (`MemoryState.maintain`) in a loop of its own while 2 other processes add and delete: every
  acknowledged edit is present, every deleted id is known as deleted, every edit is listed once in the history;
- upkeep keeps fragments, versions and files bounded and loses no history line; readers follow merged
  fragments without reading them again;
- `is_forgotten` is exact (indexed look-ups and the streamed scan agree with an oracle), before and after
  erasure-style updates and upkeep, and no digest is held per process;
- one commit per edit (the history line travels with it); builds import new rows by an anti-join.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from pipeline.errors import UserError
from pipeline.memory.state import EDITS, FORGET, ITEMS, MemoryState, Upkeep, item_rows

DIM = 8


def _row(i: int, key: str) -> pa.Table:
    return item_rows([i], [{"label": 1, "label_name": "a", "key": key, "source": "test", "shard": ""}],
                     np.full((1, DIM), 1.0, np.float32))


def _add(state: MemoryState, i: int, key: str = None) -> int:
    return state.add_items(_row(i, key or f"k{i}"), detail="1 item(s)")


def _forget(state: MemoryState, ids) -> int:
    return state.forget(state.items(list(ids), ["id", "key", "shard"]), "delete", detail=f"{len(ids)} item(s)")


# ----------------------------------------------------------------------------------- same key, 4 processes

def _racer(memory_dir, rounds, barrier, out):
    state = MemoryState(memory_dir)
    for r in range(rounds):
        barrier.wait()
        try:
            _add(state, 10_000 + r, f"race-{r}")
            out.put((r, os.getpid(), "ok"))
        except UserError as e:
            out.put((r, os.getpid(), str(e)))


def test_same_key_from_four_processes_exactly_one_wins(tmp_path):
    rounds, procs = 24, 4
    state = MemoryState(str(tmp_path))
    _add(state, 1)
    deleted_rounds = {r for r in range(rounds) if r % 6 == 5}  # keys added and deleted before: all must lose
    for r in deleted_rounds:
        _add(state, 10_000 + r, f"race-{r}")
        _forget(state, [10_000 + r])
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_racer, args=(str(tmp_path), rounds, barrier, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    results = [out.get(timeout=300) for _ in range(rounds * procs)]
    for p in ps:
        p.join(60)
    wins = {r: sum(1 for rr, _, res in results if rr == r and res == "ok") for r in range(rounds)}
    for r in range(rounds):
        assert wins[r] == (0 if r in deleted_rounds else 1), (r, [x for x in results if x[0] == r])
    errors = {res for _, _, res in results if res != "ok"}
    assert all("already in the memory" in e or "deletion is final" in e for e in errors), errors
    ids = state[ITEMS].read(["id"]).column("id").to_numpy()
    assert len(ids) == len(np.unique(ids))  # no id twice, so no acknowledged vector hidden behind another
    live = set(ids.tolist()) - set(state.forgotten_ids().tolist())
    assert live == {1} | {10_000 + r for r in range(rounds) if r not in deleted_rounds}
    adds = [e for e in state.edits() if e["op"] == "add"]
    undone = [r for r in state[EDITS].read().to_pylist() if r["op"] == "undo"] if state[EDITS].exists() else []
    assert len(adds) == 1 + len(deleted_rounds) + rounds - len(deleted_rounds), \
        (len(undone), [(v, e["pid"], e["at"]) for v, e in state[ITEMS].history()], results)  # losers' lines gone


# ------------------------------------------------------------- upkeep beside writers in other processes

def _writer(memory_dir, w, n, out):
    state = MemoryState(memory_dir)
    rng = random.Random(w)
    mine = []
    for j in range(n):
        i = 1_000_000 * (w + 1) + j
        _add(state, i)
        out.put(("add", i))
        mine.append(i)
        if rng.random() < 0.4:
            victim = mine.pop(rng.randrange(len(mine)))
            _forget(state, [victim])
            out.put(("delete", victim))
        state.forgotten_ids()  # a reader following the forget list through upkeep's merges
    out.put(("done", w))


def _upkeeper(memory_dir, stop, out):
    state = MemoryState(memory_dir)
    up = Upkeep(small_max=4, mid_rows=64, mid_max=2, max_unindexed_rows=8, max_versions=8, retention_s=0.2)
    runs = 0
    while not stop.is_set():
        state.maintain(force=True, upkeep=up)
        runs += 1
    out.put(("upkeep", runs))


def test_upkeep_beside_concurrent_writers(tmp_path):
    state = MemoryState(str(tmp_path))
    _add(state, 1)
    ctx = mp.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), w, 60, out)) for w in range(2)]
    keeper = ctx.Process(target=_upkeeper, args=(str(tmp_path), stop, out))
    for p in [keeper, *writers]:
        p.start()
    added, deleted, done = {1}, set(), 0
    while done < 2:
        kind, v = out.get(timeout=600)
        if kind == "add":
            added.add(v)
        elif kind == "delete":
            deleted.add(v)
        elif kind == "done":
            done += 1
    stop.set()
    kind, runs = out.get(timeout=120)
    for p in [keeper, *writers]:
        p.join(60)
        assert p.exitcode == 0
    assert kind == "upkeep" and runs >= 1
    fresh = MemoryState(str(tmp_path))
    ids = fresh[ITEMS].read(["id"]).column("id").to_numpy()
    assert set(ids.tolist()) == added and len(ids) == len(added)  # every acknowledged add, once
    assert set(fresh.forgotten_ids().tolist()) == deleted
    order = sorted(added)
    assert (fresh.is_forgotten(order) == np.isin(order, sorted(deleted))).all()
    ops = [e["op"] for e in fresh.edits()]
    assert ops.count("add") == len(added) and ops.count("delete") == len(deleted)


# ---------------------------------------------------------------------------------- upkeep, single process

def _files(root) -> int:
    return sum(len(f) for _, _, f in os.walk(root))


def test_upkeep_bounds_fragments_versions_and_files_and_keeps_history(tmp_path):
    state = MemoryState(str(tmp_path))
    up = Upkeep(small_rows=16, small_max=4, mid_rows=256, mid_max=4, max_unindexed_rows=8, max_versions=12,
                retention_s=1.0, check_every=4)
    reader, seen, got = MemoryState(str(tmp_path)), set(), []
    files = []
    for round_ in range(120):
        _add(state, 100 + round_)
        if round_ % 3 == 2:
            _forget(state, [100 + round_ - 1])
        state.maintain(upkeep=up)
        t, reset = reader[ITEMS].new_rows(seen, ["id"])
        got += t.column("id").to_pylist()
        assert not reset  # merged fragments are followed, not re-read from scratch
        files.append(_files(tmp_path / "state"))
    time.sleep(1.1)  # past the retention: every version but the latest may go
    state.maintain(force=True, upkeep=up)
    assert sorted(set(got)) == list(range(100, 220))
    assert len(state[ITEMS].fragment_rows()) <= 12 and state[ITEMS].version_count() <= up.max_versions + 4
    assert max(files[60:]) < 2 * max(files[:30]) + 40  # bounded, not one file set per edit
    edits = state.edits()
    assert [e["op"] for e in edits].count("add") == 120 and [e["op"] for e in edits].count("delete") == 40
    assert [e["version"] for e in edits] == list(range(1, 161))
    # the lines of removed versions now live in edits.lance; still in commit order by time
    assert state[EDITS].read().num_rows >= 150
    assert [e["at"] for e in edits] == sorted(e["at"] for e in edits)
    ids = state[ITEMS].read(["id"]).column("id").to_numpy()
    assert len(ids) == len(set(ids)) == 120


def test_is_forgotten_is_exact_and_holds_no_digests(tmp_path):
    rng = np.random.default_rng(3)
    state = MemoryState(str(tmp_path))
    n = 6000
    ids = np.unique(rng.integers(1, 1 << 40, n + 100))[:n].astype(np.int64)
    state.add_items(item_rows(ids.tolist(), [{"label": 0, "key": f"b{i}"} for i in ids.tolist()]))
    dead = set()
    for step in range(8):
        alive = ids[~np.isin(ids, sorted(dead))]  # as the facade does: only live items are deleted
        batch = rng.choice(alive, size=int(rng.integers(1, 400)), replace=False)
        _forget(state, batch.tolist())
        dead |= set(batch.tolist())
        if step == 4:  # erasure keeps only the digest of some of them
            erased = list(dead)[: len(dead) // 2]
            state[FORGET].dataset().update({"id": "NULL", "key": "NULL", "shard": "NULL", "erased": "true"},
                                           where=f"id IN ({','.join(map(str, erased))})")
        if step % 3 == 2:
            state.maintain(force=True, upkeep=Upkeep(retention_s=0.0, max_unindexed_rows=16))
        probe = np.concatenate([ids, rng.integers(1, 1 << 40, 50)])
        oracle = np.isin(probe, sorted(dead))
        assert (state.is_forgotten(probe) == oracle).all()  # > 4096 ids: one streamed scan
        few = rng.choice(probe, 300)
        assert (state.is_forgotten(few) == np.isin(few, sorted(dead))).all()  # indexed look-ups
    not_erased = dead - set(erased)
    assert set(state.forgotten_ids().tolist()) == not_erased
    assert state.forgotten_ids().dtype == np.int64
    assert not any(isinstance(v, (set, dict)) and len(v) > 100 for v in vars(state).values())


def test_one_commit_per_edit_and_history_lines(tmp_path):
    state = MemoryState(str(tmp_path))
    _add(state, 1)
    v_items, edits_before = state[ITEMS].version(), state[EDITS].exists()
    _add(state, 2)
    assert state[ITEMS].version() == v_items + 1 and state[EDITS].exists() == edits_before is False
    _add(state, 3)
    _forget(state, [3])  # the first write creates the table (empty, once), then appends
    v_forget = state[FORGET].version()
    _forget(state, [1])
    assert state[FORGET].version() == v_forget + 1 and not state[EDITS].exists()
    state.set_overlays([{"kind": "item_label", "target": 2, "label": 5, "label_name": "x"}], op="relabel",
                       detail="1 overlay row(s)")
    assert not state[EDITS].exists()
    state.record("compact", "v2")
    assert [e["op"] for e in state.edits()] == ["add", "add", "add", "delete", "delete", "relabel", "compact"]
    with pytest.raises(UserError, match="already in the memory"):
        _add(state, 2)
    with pytest.raises(UserError, match="deletion is final"):
        _add(state, 1)
    assert state[ITEMS].read(["id"]).num_rows == 3  # refused adds changed nothing
    assert len(state.edits()) == 7


def test_import_items_adds_only_new_rows(tmp_path):
    state = MemoryState(str(tmp_path))
    metas = [{"label": 0, "key": f"i{i}"} for i in range(100)]
    assert state.import_items(item_rows(list(range(100)), metas, indexed=1)) == 100
    _add(state, 500)
    metas = [{"label": 0, "key": f"i{i}"} for i in range(50, 150)]
    assert state.import_items(item_rows(list(range(50, 150)), metas, indexed=2)) == 50
    t = state[ITEMS].read(["id", "indexed"])
    assert t.num_rows == 151 and len(set(t.column("id").to_pylist())) == 151
    assert set(t.filter(pa.compute.equal(t.column("indexed"), 2)).column("id").to_pylist()) == set(range(100, 150))


# ------------------------------------------------------------------ the same through the public Python API

def _api_racer(memory_dir, rounds, barrier, out):
    from pipeline.memory.memory import VisualMemory

    mem = VisualMemory.open(memory_dir)
    x = np.eye(16, dtype=np.float32)[:1]
    for r in range(rounds):
        barrier.wait()
        try:
            out.put((r, mem.add(embeddings=x, labels=[1], keys=[f"api-{r}"])[0]))
        except UserError as e:
            out.put((r, str(e)))
    mem.close()


def test_visual_memory_add_same_key_from_four_processes(tmp_path):
    from pipeline.memory.memory import VisualMemory
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters

    mem_dir = str(tmp_path / "memory")
    build_synthetic_memory(mem_dir, make_clusters(300, 16, seed=2), num_shards=2, index_key="IVF4,Flat")
    rounds, procs = 8, 4
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_api_racer, args=(mem_dir, rounds, barrier, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    results = [out.get(timeout=300) for _ in range(rounds * procs)]
    for p in ps:
        p.join(60)
    for r in range(rounds):
        assert sum(1 for rr, res in results if rr == r and not isinstance(res, str)) == 1, r
    assert all("already in the memory" in res for _, res in results if isinstance(res, str))
    mem = VisualMemory.open(mem_dir)
    ids = mem.state[ITEMS].read(["id"]).column("id").to_numpy()
    assert len(ids) == len(np.unique(ids)) == 300 + rounds
    mem.close()


def test_erasure_removes_old_versions_but_no_history_line(tmp_path):
    from pipeline.memory.erasure import _erase_tables

    state = MemoryState(str(tmp_path))
    for i in range(1, 6):
        _add(state, i)
    _forget(state, [2, 3])
    state.set_overlays([{"kind": "item_weight", "target": 4, "weight": 2.0}], op="intervene", detail="1 row")
    before = [(e["op"], e["at"]) for e in state.edits()]
    _erase_tables(state, np.array([2, 3], np.int64))
    assert [(e["op"], e["at"]) for e in state.edits()] == before
    assert state[ITEMS].version_count() == 1 and state[FORGET].version_count() == 1
    assert set(state[ITEMS].read(["id"]).column("id").to_pylist()) == {1, 4, 5}
    assert state.is_forgotten([1, 2, 3]).tolist() == [False, True, True] and not len(state.forgotten_ids())


def _first_writer(memory_dir, barrier, out):
    state = MemoryState(memory_dir)
    barrier.wait()
    state.record("note", str(os.getpid()))
    out.put(os.getpid())


def test_first_writes_from_four_processes_lose_no_row(tmp_path):
    """Lance commits a create as an overwrite: without the exclusive creation, racing first writers each
    committed a table holding only their own row."""
    for trial in range(3):
        d = str(tmp_path / str(trial))
        ctx = mp.get_context("spawn")
        barrier, out = ctx.Barrier(4), ctx.Queue()
        ps = [ctx.Process(target=_first_writer, args=(d, barrier, out)) for _ in range(4)]
        for p in ps:
            p.start()
        pids = {out.get(timeout=120) for _ in ps}
        for p in ps:
            p.join(60)
        assert {int(r["detail"]) for r in MemoryState(d)[EDITS].read().to_pylist()} == pids


def test_unique_adds_history_and_upkeep_on_s3(s3_server):
    """The same on the S3 test server: creation, unique adds, history in the commits, upkeep, look-ups."""
    import uuid

    state = MemoryState(f"s3://vmem-test/{uuid.uuid4().hex}/memory")
    for i in range(1, 25):
        _add(state, i)
    _forget(state, [3, 4])
    before = [(e["op"], e["at"]) for e in state.edits()]
    done = state.maintain(force=True, upkeep=Upkeep(small_max=2, retention_s=0.0, max_unindexed_rows=1))
    assert done[ITEMS]["fragments_merged"] > 0 and done[ITEMS]["versions_removed"] > 0
    assert [(e["op"], e["at"]) for e in state.edits()] == before and len(before) == 25
    with pytest.raises(UserError, match="already in the memory"):
        _add(state, 5)
    with pytest.raises(UserError, match="deletion is final"):
        _add(state, 3)
    assert state.is_forgotten([2, 3, 4, 5]).tolist() == [False, True, True, False]
    assert sorted(state[ITEMS].read(["id"]).column("id").to_pylist()) == list(range(1, 25))


def test_the_memory_keeps_its_tables_small_after_its_own_writes(tmp_path):
    """Through the Python API alone (nobody calls `maintain`): single adds and deletes leave the item table a
    bounded number of fragments (its one-fragment-per-edit appends are merged by the memory's own upkeep
    thread), while a memory opened with `upkeep=False` keeps one fragment per add."""
    from pipeline.memory import VisualMemory
    from pipeline.memory.state import UPKEEP
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters
    from pipeline.memory.upkeep import EVERY

    data = make_clusters(300, dim=8, seed=1, num_classes=3)
    fragments = {}
    for upkeep in (True, False):
        mem_dir = str(tmp_path / f"m-{upkeep}")
        build_synthetic_memory(mem_dir, data, num_shards=1, index_key="IVF2,Flat")
        mem = VisualMemory.open(mem_dir, upkeep=upkeep)
        built = len(mem.state[ITEMS].fragment_rows())
        x = np.random.default_rng(2).normal(size=(160, 8)).astype(np.float32)
        for i in range(160):
            mem.add(embeddings=x[i:i + 1], labels=[1], keys=[f"api-{i}"])
            if i % 4 == 3:
                mem.delete(ids=[int(data.ids[i])])
        mem.close()  # waits for an upkeep in progress
        fragments[upkeep] = len(mem.state[ITEMS].fragment_rows()) - built
        assert (mem._upkeep.runs >= 200 // EVERY - 1) if upkeep else mem._upkeep is None
        assert len(VisualMemory.open(mem_dir).search(embeddings=x[:5], k=1).I) == 5
    assert fragments[False] == 160
    assert fragments[True] <= UPKEEP.small_max + EVERY, fragments


_EXIT_MID_UPKEEP = """
import sys, threading, numpy as np
from pipeline.memory import VisualMemory
from pipeline.memory.upkeep import EVERY
mem = VisualMemory.open(sys.argv[1])
inside = threading.Event()
real = mem.state.maintain
def maintain(*a, **kw):  # the real upkeep, telling the main thread it began
    inside.set()
    return real(*a, **kw)
mem.state.maintain = maintain
x = np.random.default_rng(int(sys.argv[2])).normal(size=(EVERY, 8)).astype(np.float32)
for i in range(EVERY):
    mem.add(embeddings=x[i:i + 1], labels=[1], keys=[f"exit{sys.argv[2]}-{i}"])
assert inside.wait(30)
"""


def test_a_script_that_exits_during_upkeep_exits_cleanly(tmp_path):
    """A script that never calls `close()` and exits while the upkeep thread is inside Lance exits 0 with every
    add kept (without the at-exit join, 4 of 6 such runs aborted with SIGABRT), and the upkeep it began is
    finished: the next process finds the adds merged into fewer fragments than one per add."""
    from pipeline.memory import VisualMemory
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters
    from pipeline.memory.upkeep import EVERY

    mem_dir = str(tmp_path / "m")
    build_synthetic_memory(mem_dir, make_clusters(300, dim=8, seed=1, num_classes=3), num_shards=1,
                           index_key="IVF2,Flat")
    script = tmp_path / "exit_mid_upkeep.py"
    script.write_text(_EXIT_MID_UPKEEP)
    for run in range(3):
        r = subprocess.run([sys.executable, str(script), mem_dir, str(run)], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    mem = VisualMemory.open(mem_dir, upkeep=False)
    assert sum(k.startswith("exit") for k in mem.state[ITEMS].read(columns=["key"])["key"].to_pylist()) \
        == 3 * EVERY
    assert len(mem.state[ITEMS].fragment_rows()) < 1 + 3 * EVERY

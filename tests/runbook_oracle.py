"""The oracle of a runbook: which items must be live, which must be gone, which may go either way, and an exact
(numpy) search over the live ones, checked against the memory after all writers stopped.

Journals give each process's ops in order. An acked op is applied for sure; an op without an ack (the SIGKILLed
writer's last op, or one that raised an expected race error) is applied as "maybe": its items may be live or
not, and the memory's own answer (get_item) decides, after which search must agree with that answer. Effects of
different processes commute by construction (runbook.py), so applying the journals one after another is exact.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Set

import numpy as np

from runbook import EXPECTED_ERRORS, NLIST, RunResult, World, _close, add_batch

LIVE, DEAD, MAYBE = "live", "dead", "maybe"


@dataclass
class Item:
    x: np.ndarray
    source: str
    labels: Set[int]  # possible current labels (one unless an unacked relabel touched it)
    state: str = LIVE


@dataclass
class Report:
    """Violations by property (all must be 0) and what the run did."""
    counts: Counter = field(default_factory=Counter)
    examples: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))
    stats: dict = field(default_factory=dict)
    items: dict = field(default_factory=dict, repr=False)  # the oracle's items after the check (id -> Item)

    def fail(self, prop: str, what: str) -> None:
        self.counts[prop] += 1
        if len(self.examples[prop]) < 8:
            self.examples[prop].append(what)

    @property
    def ok(self) -> bool:
        return not self.counts

    def format(self) -> str:
        lines = [f"runbook: {self.stats}"]
        for prop, n in sorted(self.counts.items()):
            lines.append(f"  {prop}: {n}")
            lines += [f"      e.g. {e}" for e in self.examples[prop]]
        return "\n".join(lines if self.counts else lines + ["  all properties hold"])


def build_oracle(world: World, plan: dict, run: RunResult, report: Report) -> Dict[int, Item]:
    """Items after every journal is applied (acked: for sure; unacked: maybe)."""
    b = world.base()
    items = {int(i): Item(x, "base", {int(c)}) for i, x, c in zip(b.ids, b.xb, b.labels)}
    acked = Counter()
    for p, recs in enumerate(run.journals):
        by_op = defaultdict(dict)
        for r in recs:
            if "op" in r:
                by_op[r["i"]].setdefault(r["phase"], r)
        for i in sorted(by_op):
            rec = by_op[i]
            op = next(iter(rec.values()))["op"]
            if "violation" in rec:
                for r in recs:
                    if r["i"] == i and r["phase"] == "violation":
                        report.fail("checked_by_writer_right_after_its_op", f"p{p} op {i}: {r['what']}")
            sure = "ack" in rec
            if "err" in rec:
                e = rec["err"]
                if e["kind"] not in EXPECTED_ERRORS or "ids" not in op:
                    report.fail("op_failed", f"p{p} op {i} {op['op']}: {e['kind']}: {_last_line(e['error'])}")
                else:
                    report.stats.setdefault("race_errors", []).append((p, i, op["ids"]))
            if sure:
                acked[op["op"]] += 1
            apply(items, world, plan["seed"], p, op, rec.get("ack", {}).get("result"), sure)
        ended = recs and recs[-1]["phase"] == "done"
        if p != run.killed and (run.exitcodes[p] != 0 or not ended):
            last = recs[-1] if recs else {"phase": "nothing"}
            report.fail("writer_crashed_or_hung", f"p{p} exit code {run.exitcodes[p]}, journal ends with "
                                                 f"{last['phase']} {_last_line(last.get('error', ''))}")
    report.stats.update(acked=dict(acked), killed=run.killed, killed_mid_op=run.killed_mid_op,
                        seconds=round(run.seconds, 1))
    return items


def _last_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def apply(items: Dict[int, Item], world: World, seed: int, p: int, op: dict, result, sure: bool) -> None:
    """One op's effect on the oracle; `sure=False` makes it "may or may not have happened"."""
    def kill(ids):
        for i in ids:
            it = items.get(int(i))
            if it is not None and it.state != DEAD:
                it.state = DEAD if sure else MAYBE

    kind = op["op"]
    if kind == "add":
        keys, ids, xb, src = add_batch(world, seed, p, op["batch"], op["n"], op["label"])
        for i, x in zip(ids, xb):
            items[int(i)] = Item(x, src, {op["label"]}, LIVE if sure else MAYBE)
    elif kind == "delete_ids":
        kill(op["ids"])
    elif kind == "delete_label":
        kill([i for i, it in items.items() if op["label"] in it.labels and (it.labels == {op["label"]} or not sure)])
        if sure:  # an item that only MAY carry the label may or may not have been deleted
            for it in items.values():
                if op["label"] in it.labels and it.state == LIVE:
                    it.state = MAYBE
    elif kind == "delete_source":
        kill([i for i, it in items.items() if it.source == op["source"]])
    elif kind == "relabel":
        for i in op["ids"]:
            it = items.get(int(i))
            if it is not None:
                it.labels = {op["label"]} if sure else it.labels | {op["label"]}
    elif kind == "prune" and sure:
        kill(result.get("pruned", []))


def check_memory(world: World, items: Dict[int, Item], report: Report, n_queries: int = 80) -> None:
    """Open the memory fresh and check every property against the oracle's items."""
    from pipeline.errors import NotFound
    from pipeline.memory import VisualMemory

    cfg = world.config()
    mem = VisualMemory.open(cfg.memory_dir, cfg=cfg)
    k = world.k
    ids = np.array(sorted(items), dtype=np.int64)
    label_now: Dict[int, int] = {}
    for i in ids.tolist():
        it = items[i]
        try:
            got = mem.get_item(i)
        except NotFound:
            if it.state == LIVE:
                report.fail("acked_write_lost", f"id {i} ({it.source}) must be live: get_item raised NotFound")
            elif it.state == MAYBE:
                it.state = DEAD
            continue
        if it.state == DEAD:
            report.fail("deleted_id_returned", f"deleted id {i} ({it.source}) found by get_item")
            continue
        it.state = LIVE
        label_now[i] = int(got["label"])
        if label_now[i] not in it.labels:
            report.fail("wrong_label", f"id {i}: get_item label {got['label']}, expected one of {sorted(it.labels)}")
    live = np.array([i for i in ids if items[int(i)].state == LIVE], dtype=np.int64)
    dead = {int(i) for i in ids if items[int(i)].state == DEAD}
    xb = np.stack([items[int(i)].x for i in live]).astype(np.float32)
    report.stats.update(live=len(live), dead=len(dead), items=len(ids))

    def run_search(xq):
        nb = mem.search(embeddings=xq, k=k, nprobe=NLIST)
        want = min(k, len(live))
        for row in range(len(xq)):
            got = [int(i) for i in nb.I[row] if i >= 0]
            if len(got) < want:
                report.fail("fewer_than_min_k_live", f"{len(got)} results, {want} live items reachable")
            for j, i in enumerate(got):
                if i in dead:
                    report.fail("deleted_id_returned", f"deleted id {i} returned by search")
                elif i not in items:
                    report.fail("unknown_id_returned", f"id {i} was never added")
                elif i in label_now and int(nb.labels[row, j]) != label_now[i]:
                    report.fail("wrong_label", f"search label {nb.labels[row, j]} for id {i}, item says "
                                               f"{label_now[i]}")
        return nb

    # every live item finds itself; every dead item's own vector brings none of the dead back
    for s in range(0, len(live), 256):
        nb = run_search(xb[s:s + 256])
        for row, i in enumerate(live[s:s + 256].tolist()):
            if i not in nb.I[row]:
                report.fail("acked_write_lost", f"live id {i} ({items[i].source}) not in its own self-query top-{k}")
    dead_ids = sorted(dead)
    for s in range(0, len(dead_ids), 256):
        run_search(np.stack([items[i].x for i in dead_ids[s:s + 256]]).astype(np.float32))
    # exact search over the live items: the memory's top-k must have the same similarities
    rng = np.random.default_rng(world.seed + 99)
    xq = np.vstack([xb[rng.choice(len(xb), n_queries // 2)], rng.standard_normal((n_queries // 2, world.dim))])
    xq = (xq / np.linalg.norm(xq, axis=1, keepdims=True)).astype(np.float32)
    nb = run_search(xq)
    sims = xq @ xb.T
    ref = -np.sort(-sims, axis=1)[:, :k]
    pos = {int(i): j for j, i in enumerate(live)}
    for row in range(len(xq)):
        got = [pos[int(i)] for i in nb.I[row] if int(i) in pos]
        mine = np.sort(sims[row, got])[::-1]
        n = min(len(mine), ref.shape[1])
        bad = np.flatnonzero(np.abs(mine[:n] - ref[row, :n]) > 1e-4)
        if len(mine) < ref.shape[1] or len(bad):
            j = int(bad[0]) if len(bad) else n
            report.fail("differs_from_exact_search", f"query {row}: {len(mine)} live results; rank {j}: sim "
                                                     f"{mine[j] if j < n else None} vs exact {ref[row, j]:.4f}")
    _close(mem)


def check_race_errors(items: Dict[int, Item], report: Report) -> None:
    """An op refused with NotFound is plausible only if one of its ids really is gone."""
    for p, i, ids in report.stats.pop("race_errors", []):
        if not any(items.get(int(x)) is not None and items[int(x)].state == DEAD for x in ids):
            report.fail("op_failed", f"p{p} op {i}: NotFound for ids {ids} that are all live")


def verify(world: World, plan: dict, run: RunResult, extra: Dict[int, Item] = None) -> Report:
    """Every property of the runbook, as a report (report.ok when all hold). `extra`: items the journals do
    not describe (e.g. the chaos runbook's same-key races), checked like the rest."""
    report = Report()
    items = build_oracle(world, plan, run, report)
    items.update(extra or {})
    report.items = items
    try:
        check_memory(world, items, report)
    except Exception as e:  # e.g. the memory no longer opens: reported with everything the journals showed
        report.fail("memory_unreadable", f"{type(e).__name__}: {_last_line(str(e))}")
        return report
    check_race_errors(items, report)
    return report

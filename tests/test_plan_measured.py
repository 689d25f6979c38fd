"""`vmem plan` with the scale benchmark's measured figures (pipeline.index.plan.measured_costs)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.index.plan import fit, load_measured, measured_costs, plan_memory, power_fit


def _results(tmp_path, sizes):
    """A benchmarks/scale.py results file: build and query records at `sizes` (items -> (build s, RSS))."""
    data = {"dim": 384, "updated": "2026-12-06", "machine": {"host_cpus": 2, "commit": "abc"}, "sizes": {}}
    for n, (build_s, rss) in sizes.items():
        data["sizes"][str(n)] = {"items": n, "steps": {
            "build": {"status": "ok", "wall_s": build_s, "rss": {"driver": rss}, "disk_bytes_per_item": 3000.0},
            "query": {"status": "ok", "wall_s": 3.0, "query_p50_ms": 2.0, "rss": {"driver": rss}},
            "compact": {"status": "timeout", "wall_s": 9999.0, "rss": {}}}}
    path = tmp_path / "scale.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_fit_is_exact_on_lines_and_never_negative():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = rng.uniform(0, 100), rng.uniform(0, 1e-3)
        ns = sorted(rng.choice(np.arange(1, 10 ** 7), size=3, replace=False))
        fa, fb = fit([(int(n), a + b * n) for n in ns])
        assert fa == pytest.approx(a, rel=1e-6, abs=1e-6) and fb == pytest.approx(b, rel=1e-6, abs=1e-12)
        pts = [(int(n), float(v)) for n, v in zip(ns, rng.uniform(0, 10, 3))]
        fa, fb = fit(pts)
        assert fa >= 0 and fb >= 0 and fa + fb * pts[-1][0] == pytest.approx(pts[-1][1])  # through the largest


def test_power_fit_recovers_exponents():
    for a in (0.0, 0.25, 0.5, 1.0):
        c, got = power_fit([(10 ** 5, 3.0 * 1e5 ** a), (10 ** 6, 3.0 * 1e6 ** a)])
        assert got == pytest.approx(a) and c == pytest.approx(3.0)
    assert power_fit([(10, 5.0), (100, 1.0)])[1] == 0.0  # a shrinking latency is not extrapolated downwards


def test_measured_rows_say_measured_or_extrapolated(tmp_path):
    path = _results(tmp_path, {100_000: (100.0, 1 << 30), 1_000_000: (1000.0, 2 << 30)})
    data = load_measured(path)
    at = {r["figure"]: r for r in measured_costs(data, 1_000_000, nodes=1, cores_per_node=2)["rows"]}
    assert at["build (vmem build)"]["value"] == 1000.0 and at["build (vmem build)"]["basis"] == "measured"
    assert "compact + erase 1,000 deletes + 1,000 adds" not in at  # a timed-out step is no figure
    big = {r["figure"]: r for r in measured_costs(data, 10 ** 9, nodes=10, cores_per_node=20)["rows"]}
    build = big["build (vmem build)"]
    assert build["basis"].startswith("extrapolated x1,000 beyond the largest size measured (1M)")
    assert build["value"] == pytest.approx(1e-3 * 1e9 * 2 / 200)  # per-item work over 10 x 20 cores
    rss = big["build driver RSS"]  # one process: not spread over the cluster
    assert rss["value"] == pytest.approx((1 << 30) + (1 << 30) / 900_000 * (1e9 - 100_000))
    assert big["query p50, in-process search"]["value"] == pytest.approx(2.0)  # flat latency stays flat (power 0)
    assert big["disk per item (parts + memory)"]["value"] == 3000.0


def test_one_size_is_shown_as_measured_never_extrapolated(tmp_path):
    data = load_measured(_results(tmp_path, {100_000: (100.0, 1 << 30)}))
    for r in measured_costs(data, 10 ** 9, nodes=4)["rows"]:
        assert r["value"] == r["measured"][-1][1]
        assert r["basis"].startswith("measured"), r


def test_plan_prints_measured_section_and_refuses_bad_files(tmp_path):
    path = _results(tmp_path, {100_000: (100.0, 1 << 30), 1_000_000: (1000.0, 2 << 30)})
    p = plan_memory("1e9", 384, "256GiB", measured=path, n_nodes=4, cores_per_node=16)
    text = p.table()
    assert "measured by benchmarks/scale.py" in text and "extrapolated x1,000 beyond" in text
    assert p.measured["nodes"] == max(4, p.nodes)
    assert plan_memory("1e6", 384, "16GiB", measured=str(tmp_path / "absent.json")).measured is None
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a benchmarks/scale.py results file"):
        plan_memory("1e6", 384, "16GiB", measured=str(bad))


def test_shard_processes_are_sized_by_items_per_shard(tmp_path):
    path = _results(tmp_path, {100_000: (100.0, 1 << 30), 1_000_000: (1000.0, 2 << 30)})
    data = load_measured(path)
    for n in ("100000", "1000000"):  # a populate task of 1 GiB at 50k items per shard, 4 GiB at 500k
        data["sizes"][n]["steps"]["build"]["rss"]["ray::populate_shard"] = (1 << 30) * (1 if n == "100000" else 4)
    rows = {r["figure"]: r for r in measured_costs(data, 10 ** 9, nodes=8, shards=2000)["rows"]}
    task = rows["populate task RSS (largest)"]
    assert [n for n, _ in task["measured"]] == [50_000, 500_000]
    assert task["value"] == pytest.approx(4 * (1 << 30))  # 1e9 / 2000 shards = 500k per shard: measured
    assert task["basis"] == "measured"

"""Acceptance runbooks for the memory's state (issue 9): randomized edits from several spawned writer processes
(one SIGKILLed mid-op) checked against an exact oracle: 0 acknowledged writes lost, 0 deleted ids returned (by
each writer right after its delete, and at the end across everything), never fewer than min(k, live) results.

The single-writer runbook checks the harness itself (it passes on the pre-Lance memory); the concurrent runbooks
are the acceptance test of the Lance state layer. The long runs live in benchmarks/memory_runbook.py.
"""
import uuid

import pytest

import runbook as rb
from runbook_oracle import verify

# Ops the pre-Lance memory has (no relabel) and keeps with one writer (no rebuild: it drops the logs).
SINGLE_WRITER_KINDS = {k: v for k, v in rb.KINDS.items() if k not in ("relabel", "rebuild")}


@pytest.fixture(scope="module")
def ray_address(ray_session):
    """Children join the test session's Ray (prune and rebuild run Ray work) instead of starting their own."""
    return ray_session.get_runtime_context().gcs_address


def _run(tmp_path, workdir, ray_address, seed, processes, ops, kinds=None, kill=True, extra=(), n_base=640):
    world = rb.World(workdir=workdir, n_base=n_base, seed=seed, overrides=[f"ray.address={ray_address}", *extra])
    plan = rb.plan_runbook(world, seed, processes, ops, kinds=kinds, kill=kill)
    planned = {op["op"] for steps in plan["ops"] for op in steps}
    assert planned == set(kinds or rb.KINDS), f"seed {seed} does not exercise {set(kinds or rb.KINDS) - planned}"
    rb.build_world(world)
    run = rb.run_runbook(world, plan, str(tmp_path / "journals"))
    return verify(world, plan, run)


def test_single_writer_runbook_against_the_oracle(tmp_path, ray_address):
    report = _run(tmp_path, str(tmp_path / "work"), ray_address, seed=5, processes=1, ops=24,
                  kinds=SINGLE_WRITER_KINDS)
    assert report.ok, report.format()
    assert set(report.stats["acked"]) == set(SINGLE_WRITER_KINDS), report.stats  # every kind ran before the kill
    assert report.stats["killed"] == 0 and report.stats["dead"] > 0


def test_concurrent_writers_runbook_against_the_oracle(tmp_path, ray_address):
    report = _run(tmp_path, str(tmp_path / "work"), ray_address, seed=13, processes=3, ops=12)
    assert report.ok, report.format()


@pytest.mark.slow
def test_concurrent_writers_runbook_on_s3(tmp_path, ray_address, s3_server):
    report = _run(tmp_path, f"s3://vmem-test/runbook-{uuid.uuid4().hex[:8]}", ray_address, seed=14, processes=3,
                  ops=12, extra=[f"storage.s3_endpoint_url={s3_server}"], n_base=320)
    assert report.ok, report.format()

"""The chaos runbook (issue 17 item 8, harness in tests/chaos.py), short and with a fixed seed: writers from
several processes (one SIGKILLed mid-op), same-key races from 4 processes, a truncated tar and a truncated
embedding part mid-run, a `vmem compact` SIGKILLed inside its erasure (mid-run, and again after the writers),
then `vmem compact` and `vmem build`;
locally and on the S3 test server. And `vmem serve` with one of its 2 ingress replicas SIGKILLed while HTTP
writes go on. Each ends with: 0 acked writes lost, 0 deleted ids returned, 0 duplicate ids, the live count
equal to the oracle's, every erasure report verified or naming only the files broken on purpose (and then
`vmem compact` exited non-zero naming them). The long runs: benchmarks/chaos_runbook.py."""
import uuid

import pytest

import chaos
import runbook as rb


@pytest.fixture(scope="module")
def ray_address(ray_session):
    """Children join the test session's Ray (prune and `vmem build` run Ray work) instead of starting their own."""
    return ray_session.get_runtime_context().gcs_address


def _assert_ok(res):
    assert res.ok, f"{res.report.format()}\nsteps: {res.steps}"
    s = res.report.stats
    assert s["race_acks"] == s["race_rounds"] and s["duplicates"] == 0
    assert res.steps["bad_files"]["rc"] != 0 and res.steps["kill_eraser"]["build_rc"] == 0
    assert s["erasure_reports"] >= 2 and s["reports_verified"] >= 1, s
    assert res.steps["mid_run"]["eraser_killed_at_try"], res.steps  # an eraser SIGKILLed while writers went on


def test_chaos_runbook(tmp_path, ray_address):
    world = chaos.chaos_world(str(tmp_path / "work"), seed=17, overrides=[f"ray.address={ray_address}"])
    plan = chaos.ChaosPlan(seed=17, processes=3, ops=8, race_rounds=6)
    _assert_ok(chaos.run_chaos(world, plan, str(tmp_path / "journals")))


@pytest.mark.slow
def test_chaos_runbook_on_s3(tmp_path, ray_address, s3_server):
    world = chaos.chaos_world(f"s3://vmem-test/chaos-{uuid.uuid4().hex[:8]}", seed=18, n_base=320,
                              overrides=[f"ray.address={ray_address}", f"storage.s3_endpoint_url={s3_server}"])
    plan = chaos.ChaosPlan(seed=18, processes=3, ops=6, race_rounds=4)
    _assert_ok(chaos.run_chaos(world, plan, str(tmp_path / "journals")))


@pytest.mark.slow  # starts its own Ray and Serve: 1-3 minutes on 2 busy cores
def test_serve_replica_killed_during_http_writes(tmp_path):
    world = rb.World(workdir=str(tmp_path / "work"), n_base=320, seed=19)
    res = chaos.serve_chaos(world, seconds=40, kill_after_s=12)
    assert res.ok, f"{res.report.format()}\nsteps: {res.steps}"
    assert res.steps["serve"].get("killed") and res.report.stats["acks"] > 0


def test_the_race_judge_catches_two_acks_and_a_wrong_refusal(tmp_path):
    """The harness can fail: a key acked twice, a loser refused for another reason, a racer that died."""
    from runbook_oracle import Report

    world = rb.World(workdir=str(tmp_path / "w"), n_base=40)
    plan = chaos.ChaosPlan(seed=1, race_processes=3, race_rounds=1)
    ack = {"i": 0, "phase": "ack", "key": "race1-r0", "ids": [7]}
    journals = [[ack, {"i": 1, "phase": "done"}], [ack, {"i": 1, "phase": "done"}],
                [{"i": 0, "phase": "err", "kind": "OSError", "error": "disk full"}]]
    report = Report()
    items = chaos.judge_races(world, plan, journals, [0, 0, -9], report)
    assert set(report.counts) == {"same_key_acks_not_one", "same_key_wrong_error", "racer_crashed_or_hung"}
    assert items[7].state == chaos.MAYBE  # two vectors acked for one id: neither is sure


def test_a_retried_delete_after_erasure_counts_as_nothing(tmp_path):
    """An HTTP client retrying a delete whose answer was lost (a replica SIGKILLed) must not be told the id
    never existed: after erasure the forget list's salted digest still recognises it. Found by the chaos run."""
    from pipeline.memory.memory import VisualMemory
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters

    data = make_clusters(200, 8, 4, seed=1)
    build_synthetic_memory(str(tmp_path / "memory"), data, num_shards=2, index_key="IVF4,Flat", nprobe=4)
    mem = VisualMemory.open(str(tmp_path / "memory"))
    i = int(data.ids[0])
    assert mem.delete(ids=[i]) == 1 and mem.delete(ids=[i]) == 0  # before erasure: a retry counts as nothing
    assert mem.compact(force=True, grace_s=0)["erasure"]["verified"]
    try:
        assert mem.delete(ids=[i]) == 0  # after erasure: the same retry
    finally:
        mem.close()

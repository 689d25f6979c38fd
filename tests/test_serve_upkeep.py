"""No maintenance inside a request: an HTTP delete that makes compaction due answers before the compaction
runs, and the replica's background thread (`pipeline.serve.upkeep`) compacts and erases right after.

Real app (`create_api`) over a real synthetic memory, real Lance state and faiss shards, through httpx's ASGI
transport. The compaction is made to hang at its first step (`VMEM_COMPACT_HANG_AT=start`, the crash tests'
hook), so the test can tell "the delete answered while the compaction had not finished" without timing.
"""
from __future__ import annotations

import asyncio
import os
import time

import httpx
import numpy as np
import pytest

TOKEN = "upkeep-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def app_over_memory(make_config):
    from pipeline.memory import VisualMemory
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters
    from pipeline.serve.api import create_api

    def make():
        cfg = make_config("memory.compact_threshold=0.02", "memory.grace_period_s=0")
        data = make_clusters(400, dim=16, seed=3, num_classes=4)
        build_synthetic_memory(cfg.memory_dir, data, num_shards=2, index_key="IVF4,Flat", nprobe=4)
        memory = VisualMemory.open(cfg.memory_dir, cfg=cfg)
        return cfg, create_api(cfg, memory, token=TOKEN), memory, data

    return make


def _delete(app, ids):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/delete", json={"ids": [int(i) for i in ids]}, headers=AUTH)
    return asyncio.run(go())


def _wait_for(pred, timeout_s=60.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_delete_over_the_threshold_answers_before_the_compaction_it_triggers(app_over_memory, monkeypatch):
    cfg, app, memory, data = app_over_memory()
    monkeypatch.setenv("VMEM_COMPACT_HANG_AT", "start")  # any compaction started now hangs at its first step
    victims = data.ids[:20]  # 5% of the shards' items: over memory.compact_threshold=0.02
    r = _delete(app, victims)
    assert r.status_code == 200, r.text
    assert r.json()["deleted"] == 20
    # The delete has answered; the compaction it made due starts in the background and is still running.
    hang = os.path.join(cfg.memory_dir, ".hang-start")
    assert _wait_for(lambda: os.path.exists(hang)), "the background compaction never started"
    assert memory.version == 1  # nothing committed inside (or before the answer of) the request
    nb = memory.search(embeddings=data.xb[:20], k=5)
    assert not np.isin(nb.I, victims).any()  # and the delete is in effect at once


def test_background_compaction_commits_and_erases_after_a_delete(app_over_memory):
    cfg, app, memory, data = app_over_memory()
    victims = data.ids[:20]
    assert _delete(app, victims).json()["deleted"] == 20
    assert _wait_for(lambda: memory.stats()["manifest_version"] == 2), "no background compaction committed"
    assert _wait_for(lambda: app.state.ctx.upkeep.runs == 1)
    stats = memory.stats()
    assert stats["tombstones"] == 0 and stats["live_items"] == 380
    nb = memory.search(embeddings=data.xb[:40], k=10)
    assert not np.isin(nb.I, victims).any()
    # A delete that does not cross the threshold leaves the memory as it is.
    assert _delete(app, data.ids[20:21]).json()["deleted"] == 1
    time.sleep(0.5)
    assert memory.stats()["manifest_version"] == 2 and app.state.ctx.upkeep.runs == 1


def test_the_serve_app_builder_is_typed():
    """`serve run pipeline.serve.app:app_builder config=...` / a RayService's `args` are validated into
    `AppArgs` (Serve reads the annotation): an unknown key is refused, not ignored."""
    import inspect

    import pydantic

    from pipeline.serve.app import AppArgs, app_builder

    assert inspect.signature(app_builder).parameters["args"].annotation is AppArgs  # what Serve checks
    assert AppArgs.model_validate({"config": "configs/demo.yaml", "overrides": ["serve.port=9000"]}).overrides == \
        ["serve.port=9000"]
    with pytest.raises(pydantic.ValidationError, match="extra"):
        AppArgs.model_validate({"config": "configs/demo.yaml", "overide": ["serve.port=9000"]})

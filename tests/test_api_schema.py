"""Schemathesis against /openapi.json: no generated input, valid or not, makes the API answer 5xx.

The app is the real FastAPI app (`create_api`) over a real memory (a small synthetic one, searched in-process),
called through ASGI: no server, no Ray. Every request carries the token, so mutations reach the memory too.
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from pipeline.memory import VisualMemory

TOKEN = "schema-token"
MAX_EXAMPLES = 20
# Operations of the memory layer being rewritten (issue 9): until it lands they answer 501, which is fine for
# a client but not a pass here.
PENDING = {"/v1/versions": "versions", "/v1/rollback": "rollback"}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    from pipeline.config import load_config
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters
    from pipeline.serve.api import create_api

    work = tmp_path_factory.mktemp("schema")
    cfg = load_config(None, [f"workdir={work}/work", "serve.max_k=20", "serve.max_batch=8",
                             "serve.max_request_bytes=200000", "memory.compact_threshold=0.99"])
    data = make_clusters(300, dim=8, seed=3)
    build_synthetic_memory(cfg.memory_dir, data, num_shards=2, index_key="IVF4,Flat", nprobe=4)
    app = create_api(cfg, VisualMemory.open(cfg.memory_dir, cfg=cfg), token=TOKEN)
    # /v1/prune starts Ray jobs (seconds each): it is exercised over HTTP in test_serve.py instead.
    return schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path="/v1/prune")


def fuzz(api_schema, paths) -> int:
    """`MAX_EXAMPLES` generated cases for each operation on `paths` (hypothesis drives schemathesis's
    strategies; the pytest plugin's fixture loader does not run on this pytest). Returns the operations run."""
    from hypothesis import given

    ran = 0
    for result in api_schema.get_all_operations():
        op = result.ok()
        if not paths(op.path):
            continue

        @given(case=op.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case):
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
            assert response.status_code < 500, (f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                                f"{response.text[:500]}\nbody: {str(case.body)[:300]}")
            if response.status_code >= 400:
                assert "error" in response.json(), response.text

        check()
        ran += 1
    return ran


def test_no_server_errors(api_schema):
    assert fuzz(api_schema, lambda path: path not in PENDING) >= 20


def test_versions_and_rollback_no_server_errors(api_schema):
    assert fuzz(api_schema, lambda path: path in PENDING) == len(PENDING)

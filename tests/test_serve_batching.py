"""Query batching in the ingress (`pipeline.serve.batching`): concurrent queries share memory calls, and
every client still gets exactly the answer it would get alone, never an item deleted before it asked.

The first tests drive `QueryBatcher` directly with a recording function; the last ones send concurrent HTTP
requests with randomly mixed options to the real app (`create_api`) over a real synthetic memory, and check
each answer against the memory asked one query at a time.
"""
from __future__ import annotations

import asyncio
import json
import random

import httpx
import numpy as np
import pytest

from pipeline.serve.batching import QueryBatcher


class Recorder:
    """fn(xq) -> one result per row (the row's sum), recording the size of each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, xq):
        self.calls.append(len(xq))
        return [float(r.sum()) for r in xq]


def rows(*values):
    return np.asarray([[v] for v in values], dtype=np.float32)


def test_lone_query_starts_at_once_and_gets_its_own_rows():
    async def main():
        b, fn = QueryBatcher(max_batch=8, concurrency=1, max_wait_s=60), Recorder()
        task = asyncio.create_task(b.run("k", fn, rows(1, 2)))
        await asyncio.sleep(0)
        assert b.running == 1  # dispatched with no wait: nothing else was on its way
        assert await task == [1.0, 2.0]
        assert fn.calls == [2]

    asyncio.run(main())


def test_waits_for_arriving_queries_then_answers_each_with_its_rows():
    async def main():
        b, fn = QueryBatcher(max_batch=64, concurrency=1, max_wait_s=60), Recorder()
        arrivals = [b.arrive() for _ in range(3)]
        first = asyncio.create_task(b.run("k", fn, rows(0), arrivals[0]))
        await asyncio.sleep(0)
        assert b.running == 0  # two more requests are being read: the call waits for them
        rest = [asyncio.create_task(b.run("k", fn, rows(*range(10 * i, 10 * i + i + 1)), arrivals[i]))
                for i in (1, 2)]
        results = await asyncio.gather(first, *rest)
        for a in arrivals:
            b.leave(a)
        assert fn.calls == [6]
        assert results == [[0.0], [10.0, 11.0], [20.0, 21.0, 22.0]]
        assert b.stats() == {"calls": 1, "queries": 3, "queries_per_call": 3.0}

    asyncio.run(main())


def test_a_request_that_never_queries_delays_the_call_by_at_most_max_wait():
    async def main():
        b, fn = QueryBatcher(max_batch=8, concurrency=1, max_wait_s=0.05), Recorder()
        b.arrive()  # e.g. a request that will fail validation and has not left yet
        mine = b.arrive()
        assert await asyncio.wait_for(b.run("k", fn, rows(5), mine), timeout=30) == [5.0]
        assert fn.calls == [1]

        b = QueryBatcher(max_batch=8, concurrency=1, max_wait_s=60)
        other, mine = b.arrive(), b.arrive()
        task = asyncio.create_task(b.run("k", fn, rows(6), mine))
        await asyncio.sleep(0)
        assert b.running == 0  # waiting for `other`
        b.leave(other)  # it answered without querying (say a 422): nothing left to wait for
        assert b.running == 1 and await task == [6.0]

    asyncio.run(main())


def test_keys_batch_separately_max_batch_and_concurrency_hold():
    async def main():
        b, fn = QueryBatcher(max_batch=4, concurrency=2, max_wait_s=60), Recorder()
        active, peak = [0], [0]

        def slow(xq):
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            try:
                import time
                time.sleep(0.01)
                return fn(xq)
            finally:
                active[0] -= 1

        rng = random.Random(0)
        jobs = [(rng.choice("ab"), rows(*[rng.random() for _ in range(rng.randint(1, 3))])) for _ in range(40)]
        async def request(k, x, arrival):  # what CountArrivals does around a request
            try:
                return await b.run(k, lambda xq: [(k, v) for v in slow(xq)], x, arrival)
            finally:
                b.leave(arrival)

        results = await asyncio.gather(*[request(k, x, b.arrive()) for k, x in jobs])
        for (k, x), got in zip(jobs, results):
            assert got == [(k, float(v)) for v in x.sum(axis=1)]
        assert max(fn.calls) <= 4 and sum(fn.calls) == sum(len(x) for _, x in jobs)
        assert len(fn.calls) < len(jobs)  # queries did share calls
        assert peak[0] <= 2

    asyncio.run(main())


def test_an_error_reaches_every_query_of_its_call_and_the_batcher_goes_on():
    async def main():
        b = QueryBatcher(max_batch=8, concurrency=1, max_wait_s=60)

        def boom(xq):
            raise RuntimeError("disk on fire")

        a1, a2 = b.arrive(), b.arrive()
        outs = await asyncio.gather(b.run("k", boom, rows(1), a1), b.run("k", boom, rows(2), a2),
                                    return_exceptions=True)
        assert all(isinstance(o, RuntimeError) for o in outs)
        b.leave(a1)
        b.leave(a2)
        assert await b.run("k", Recorder(), rows(3)) == [3.0]

    asyncio.run(main())


# ---- through the real app --------------------------------------------------------------------------------

TOKEN = "batch-token"


@pytest.fixture
def served_app(make_config):
    from pipeline.memory import VisualMemory
    from pipeline.memory.synthetic import build_synthetic_memory, make_clusters
    from pipeline.serve.api import create_api

    cfg = make_config("memory.compact_threshold=0.99", "memory.grace_period_s=0")
    data = make_clusters(600, dim=16, seed=5, num_classes=6)
    build_synthetic_memory(cfg.memory_dir, data, num_shards=2, index_key="IVF4,Flat", nprobe=4)
    memory = VisualMemory.open(cfg.memory_dir, cfg=cfg)
    return create_api(cfg, memory, token=TOKEN), memory, data


async def _post_all(app, requests):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await asyncio.gather(*[client.post(path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
                                      for path, body in requests])


def test_concurrent_queries_with_mixed_options_get_the_answers_they_would_get_alone(served_app):
    app, memory, data = served_app
    rng = np.random.default_rng(11)
    queries = data.xb[rng.choice(len(data.xb), 48, replace=False)] + rng.normal(0, 0.05, (48, 16)).astype(np.float32)
    options = [{"k": int(rng.choice([3, 7])), "method": str(rng.choice(["plurality", "distance"]))} for _ in queries]
    requests = []
    for q, o in zip(queries, options):
        if rng.random() < 0.7:
            requests.append(("/v1/classify", {"embedding": q.tolist(), **o}))
        else:
            requests.append(("/v1/search", {"embedding": q.tolist(), "k": o["k"]}))
    responses = asyncio.run(_post_all(app, requests))
    ctx = app.state.ctx
    assert ctx.batcher.stats()["queries_per_call"] > 1  # they were batched
    for (path, body), q, r in zip(requests, queries, responses):
        assert r.status_code == 200, r.text
        if path == "/v1/classify":
            alone = memory.classify(embeddings=q[None], k=body["k"], method=body["method"])[0]
            got = r.json()
            assert got["label"] == alone.label and got["method"] == alone.method
            assert [n["id"] for n in got["neighbors"]] == [n.id for n in alone.neighbors]
            assert got["scores"] == pytest.approx(alone.scores)
        else:
            alone = memory.search(embeddings=q[None], k=body["k"])
            assert [n["id"] for n in r.json()["neighbors"]] == [int(i) for i in alone.I[0] if i >= 0]


def test_a_deleted_item_is_in_no_answer_to_queries_sent_after_the_delete(served_app):
    app, memory, data = served_app
    rng = np.random.default_rng(12)
    for _ in range(3):
        targets = rng.choice(len(data.xb), 8, replace=False)
        dead = [int(data.ids[i]) for i in targets]
        deleted = asyncio.run(_post_all(app, [("/v1/delete", {"ids": dead})]))[0]
        assert deleted.status_code == 200 and deleted.json()["deleted"] == len(dead), deleted.text
        # each deleted item's own vector is the query: its nearest neighbour until the delete
        responses = asyncio.run(_post_all(app, [("/v1/classify", {"embedding": data.xb[i].tolist(), "k": 5})
                                                for i in targets]))
        for r in responses:
            assert r.status_code == 200, r.text
            assert not {n["id"] for n in r.json()["neighbors"]} & set(dead)


def test_prediction_json_matches_the_generic_conversion(served_app):
    from pipeline.serve.routes.common import image_url, prediction_json, to_jsonable

    _, memory, data = served_app
    for p in memory.classify(embeddings=data.xb[:20], k=9, method="distance"):
        generic = to_jsonable(p)
        generic.update(k=9, neighbors=[{**n, "image_url": image_url(n["id"])} for n in generic["neighbors"]])
        fast = prediction_json(p, 9)
        assert fast == generic and list(fast) == list(generic)
        assert json.loads(json.dumps(fast)) == fast


def test_bodies_parsed_by_the_fast_json_request_keep_fastapis_errors(served_app):
    app, _, _ = served_app

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            bad = await client.post("/v1/classify", content=b'{"embedding": [1, 2', headers={"content-type":
                                                                                                "application/json"})
            nan = await client.post("/v1/classify", content=b'{"embedding": [' + b"NaN, " * 15 + b'1]}',
                                    headers={"content-type": "application/json"})
            return bad, nan

    bad, nan = asyncio.run(main())
    assert bad.status_code == 422 and "JSON" in bad.json()["error"], bad.text
    assert nan.status_code == 422 and "finite" in nan.json()["error"], nan.text


def test_each_query_request_hands_its_arrival_to_the_batcher(served_app, monkeypatch):
    """CountArrivals -> QueryBatcher.run in the same request context: otherwise every call would wait for
    requests that have already queried."""
    from pipeline.serve import batching

    app, _, data = served_app
    seen, run = [], batching.QueryBatcher.run

    async def spy(self, key, fn, xq, arrival=None):
        seen.append(batching.ARRIVAL.get())
        return await run(self, key, fn, xq, arrival)

    monkeypatch.setattr(batching.QueryBatcher, "run", spy)
    responses = asyncio.run(_post_all(app, [("/v1/classify", {"embedding": x.tolist(), "k": 3}) for x in data.xb[:6]]
                                      + [("/v1/search/batch", {"embeddings": data.xb[:2].tolist(), "k": 3})]))
    assert all(r.status_code == 200 for r in responses)
    assert len(seen) == 7 and all(a is not None and a.done for a in seen)
    assert app.state.ctx.batcher.reading == 0

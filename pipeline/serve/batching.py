"""Coalescing of concurrent queries into one memory call (`QueryBatcher`).

Every memory call pays fixed costs that do not grow with the number of queries in it: following the
committed state (CURRENT, the table versions), one faiss call per shard, one metadata gather per shard, the
vote. Under concurrent load a replica therefore answers more queries per second when the queries that
arrive while a search runs are searched together in the next call. That is what this does, with no timer:
a lone query starts at once (no added latency); queries arriving while `concurrency` calls are running wait
for the next free call and go in together, up to `max_batch` rows.

Why not `@serve.batch`: it needs a Serve replica context (the API also runs under plain ASGI servers and in
tests) and batches on a timer; here the batch is simply what queued while the previous one ran.

Correctness: a batch's memory call starts after every query in it arrived, and the memory follows the
committed state at the start of each call, so a query never sees state older than the moment it arrived
(an acknowledged delete stays invisible to every later query). Only queries with equal options share a call.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Callable, Dict, Hashable, List, Tuple

import numpy as np
from starlette.concurrency import run_in_threadpool

Rows = Callable[[np.ndarray], List]  # (n, dim) queries -> n results, one per row


class QueryBatcher:
    """Runs `fn(xq)` calls for concurrent queries, at most `concurrency` at a time, merging the queries that
    share a key into one call of at most `max_batch` rows (see module docstring)."""

    def __init__(self, max_batch: int = 64, concurrency: int = 2):
        if max_batch < 1 or concurrency < 1:
            raise ValueError(f"max_batch and concurrency must be >= 1, got {max_batch}, {concurrency}")
        self.max_batch = max_batch
        self.concurrency = concurrency
        self.running = 0
        # key -> (fn, [(queries, future)]) in arrival order of each key's oldest query
        self.pending: "OrderedDict[Hashable, Tuple[Rows, List[Tuple[np.ndarray, asyncio.Future]]]]" = OrderedDict()
        self.calls = 0
        self.queries = 0

    async def run(self, key: Hashable, fn: Rows, xq: np.ndarray) -> List:
        """The results of `fn` for the rows of `xq`, computed in a call that may hold other queries with `key`."""
        fut = asyncio.get_running_loop().create_future()
        self.pending.setdefault(key, (fn, []))[1].append((xq, fut))
        self._start()
        return await fut

    def _start(self) -> None:
        while self.running < self.concurrency and self.pending:
            key, (fn, waiting) = next(iter(self.pending.items()))
            batch, rows = [], 0
            while waiting and (not batch or rows + len(waiting[0][0]) <= self.max_batch):
                item = waiting.pop(0)
                batch.append(item)
                rows += len(item[0])
            if not waiting:
                del self.pending[key]
            else:
                self.pending.move_to_end(key)  # other keys get their turn before this key's next batch
            self.running += 1
            asyncio.get_running_loop().create_task(self._call(fn, batch))

    async def _call(self, fn: Rows, batch: List[Tuple[np.ndarray, asyncio.Future]]) -> None:
        try:
            xq = batch[0][0] if len(batch) == 1 else np.concatenate([q for q, _ in batch])
            self.calls += 1
            self.queries += len(batch)
            try:
                out = await run_in_threadpool(fn, xq)
            except Exception as e:  # every query of the call gets the error (inputs were checked before)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                return
            row = 0
            for q, fut in batch:
                if not fut.done():  # a client that went away cancelled its future
                    fut.set_result(out[row:row + len(q)])
                row += len(q)
        finally:
            self.running -= 1
            self._start()

    def stats(self) -> Dict[str, float]:
        """Calls made, queries answered, and queries per call so far."""
        return {"calls": self.calls, "queries": self.queries,
                "queries_per_call": round(self.queries / self.calls, 2) if self.calls else 0.0}

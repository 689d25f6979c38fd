"""Coalescing of concurrent queries into one memory call (`QueryBatcher`).

Every memory call pays fixed costs that do not grow with the number of queries in it: following the
committed state (CURRENT, the table versions), one faiss call per shard, one metadata gather per shard, the
vote. Measured on the demo's shape (20k x 1280, 2 shards), a call costs 2.4 ms for one query and 0.77 ms
per query for eight. Under concurrent load a replica therefore answers more queries per second when the
queries that arrive together are searched together. That is what this does:

- a lone query starts at once: no added latency when nothing else is in flight;
- while other query requests are still being read and parsed by this replica (`reading` counts them, from
  the ASGI middleware `CountArrivals` until each queries or answers), a call waits for them, at most
  `max_wait_s`, then takes every query with the same options that queued, up to `max_batch` rows;
- at most `concurrency` calls run at a time; queries that arrive meanwhile go into the next one.

Why not `@serve.batch`: it needs a Serve replica context (the API also runs under plain ASGI servers and in
tests) and always waits its timer out when a batch is not full; here a call waits only for requests that
are known to be on their way.

Correctness: a batch's memory call starts after every query in it arrived, and the memory follows the
committed state at the start of each call, so a query never sees state older than the moment it arrived
(an acknowledged delete stays invisible to every later query). Only queries with equal options share a call.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from concurrent.futures import Executor
from contextvars import ContextVar
from typing import Callable, Dict, Hashable, Iterable, List, Optional, Tuple

import numpy as np

Rows = Callable[[np.ndarray], List]  # (n, dim) queries -> n results, one per row


class QueryBatcher:
    """Runs `fn(xq)` calls for concurrent queries, at most `concurrency` at a time, merging the queries that
    share a key into one call of at most `max_batch` rows (see module docstring)."""

    def __init__(self, max_batch: int = 64, concurrency: int = 2, max_wait_s: float = 0.005,
                 executor: Optional[Executor] = None):
        if max_batch < 1 or concurrency < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch >= 1, concurrency >= 1, max_wait_s >= 0; got {max_batch}, "
                             f"{concurrency}, {max_wait_s}")
        self.max_batch = max_batch
        self.concurrency = concurrency
        self.max_wait_s = max_wait_s
        self.executor = executor  # None: the event loop's default executor
        self.running = 0
        self.reading = 0  # query requests inside the app (CountArrivals) that have not queried yet
        # key -> (fn, [(queries, future)]) in arrival order of each key's oldest query
        self.pending: "OrderedDict[Hashable, Tuple[Rows, List[Tuple[np.ndarray, asyncio.Future]]]]" = OrderedDict()
        self._since: float = 0.0  # when the oldest pending query was submitted
        self._timer = None
        self.calls = 0
        self.queries = 0

    async def run(self, key: Hashable, fn: Rows, xq: np.ndarray, arrival: Optional["Arrival"] = None) -> List:
        """The results of `fn` for the rows of `xq`, computed in a call that may hold other queries with `key`.

        `arrival` (default: the one `CountArrivals` set for this request) stops counting as being read."""
        self._read(arrival if arrival is not None else ARRIVAL.get())
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.pending:
            self._since = loop.time()
        self.pending.setdefault(key, (fn, []))[1].append((xq, fut))
        self._start()
        return await fut

    def arrive(self) -> "Arrival":
        """A query request entered the app: calls may wait for it until it submits or leaves."""
        self.reading += 1
        return Arrival()

    def _read(self, arrival: Optional["Arrival"]) -> None:
        if arrival is not None and not arrival.done:
            arrival.done = True
            self.reading -= 1

    def leave(self, arrival: "Arrival") -> None:
        """The request answered (or failed before it queried): nothing more to wait for from it."""
        self._read(arrival)
        if self.pending:
            self._start()

    def _queued_rows(self) -> int:
        return sum(len(q) for _, waiting in self.pending.values() for q, _ in waiting)

    def _should_wait(self) -> bool:
        """Whether to hold the next call for query requests this replica is still reading (module docstring)."""
        if self.reading <= 0 or self.max_wait_s == 0:
            return False
        loop = asyncio.get_running_loop()
        left = self._since + self.max_wait_s - loop.time()
        if left <= 0 or self._queued_rows() >= self.max_batch:
            return False
        if self._timer is None:
            self._timer = loop.call_later(left, self._on_timer)
        return True

    def _on_timer(self) -> None:
        self._timer = None
        self._start()

    def _start(self) -> None:
        while self.running < self.concurrency and self.pending and not self._should_wait():
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
            self._since = asyncio.get_running_loop().time()  # the rest wait afresh for the next call
            self.running += 1
            asyncio.get_running_loop().create_task(self._call(fn, batch))

    async def _call(self, fn: Rows, batch: List[Tuple[np.ndarray, asyncio.Future]]) -> None:
        try:
            xq = batch[0][0] if len(batch) == 1 else np.concatenate([q for q, _ in batch])
            self.calls += 1
            self.queries += len(batch)
            try:
                out = await asyncio.get_running_loop().run_in_executor(self.executor, fn, xq)
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


class Arrival:
    """One query request on its way to the batcher (see `QueryBatcher.arrive`)."""
    __slots__ = ("done",)

    def __init__(self):
        self.done = False


# The arrival of the request being handled: set by CountArrivals, read by QueryBatcher.run in the same task.
ARRIVAL: ContextVar[Optional[Arrival]] = ContextVar("vmem_query_arrival", default=None)


class CountArrivals:
    """Pure ASGI: tells `batcher` when a query request (POST to one of `paths`) enters the app, so that a
    call can wait for queries still being read instead of leaving them for the next call."""

    def __init__(self, app, batcher: QueryBatcher, paths: Iterable[str]):
        self.app = app
        self.batcher = batcher
        self.paths = frozenset(paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        arrival = self.batcher.arrive()
        token = ARRIVAL.set(arrival)
        try:
            await self.app(scope, receive, send)
        finally:
            ARRIVAL.reset(token)
            self.batcher.leave(arrival)

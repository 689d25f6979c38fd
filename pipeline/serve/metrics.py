"""Prometheus metrics of the HTTP API (`/metrics`), kept in a registry per app so several apps can live in
one process (tests) without clashing over global collector names."""
from __future__ import annotations

import time
from typing import Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ApiMetrics:
    """Request counts/latencies per route and status, plus memory gauges refreshed at each scrape."""

    def __init__(self, stats_fn: Optional[Callable[[], dict]] = None):
        self.registry = CollectorRegistry()
        self.requests = Counter("vmem_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("vmem_http_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.items = Gauge("vmem_memory_items", "live items in the memory", registry=self.registry)
        self.tombstones = Gauge("vmem_memory_tombstones", "deleted items not yet compacted away",
                                registry=self.registry)
        self.version = Gauge("vmem_manifest_version", "current manifest version", registry=self.registry)
        self.stats_fn = stats_fn

    def observe(self, route: str, method: str, status: int, started: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)

    def render(self) -> tuple[bytes, str]:
        if self.stats_fn is not None:
            try:
                s = self.stats_fn()
                self.items.set(s.get("items", 0))
                self.tombstones.set(s.get("tombstones", 0))
                self.version.set(s.get("version", 0))
            except Exception:  # a scrape must never fail because the memory is busy
                pass
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

"""Prometheus metrics of the server: requests by endpoint and status, latencies, rows and tasks per batch,
registered tasks, the mixed graph's table capacity and reloads (prometheus_client only, no web framework)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .batcher import BatchRecord

OTHER = "other"  # the label of every path no route serves


class Metrics:
    """Prometheus metrics of one app, in their own registry (so many apps can live in one process)."""

    def __init__(self, tasks: Callable[[], float] | None = None, capacity: Callable[[], float] | None = None) -> None:
        """`tasks` and `capacity`: read at each scrape (the session's registered tasks, and the rows its mixed
        graph's bias tables hold before they next grow: TaskSession.capacity, 0 on other graphs)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("bitfit_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.request_seconds = Histogram("bitfit_request_seconds", "HTTP request latency by endpoint",
                                         ["endpoint"], registry=self.registry,
                                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_rows = Histogram("bitfit_batch_rows", "rows per session call", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_tasks = Histogram("bitfit_batch_tasks", "distinct tasks per session call",
                                     registry=self.registry, buckets=(1, 2, 3, 4, 6, 8, 16, 32))
        self.batch_seconds = Histogram("bitfit_batch_seconds", "latency of one session call",
                                       registry=self.registry,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.tasks = Gauge("bitfit_tasks", "registered tasks", registry=self.registry)
        self.capacity = Gauge("bitfit_table_capacity", "task rows the mixed graph's bias tables hold before they "
                              "next grow (0: not a mixed graph)", registry=self.registry)
        if tasks is not None:
            self.tasks.set_function(tasks)
        if capacity is not None:
            self.capacity.set_function(capacity)
        self.reloads = Counter("bitfit_reloads", "pack reloads by outcome (added, replaced, refused)",
                               ["outcome"], registry=self.registry)

    def batch(self, record: BatchRecord) -> None:
        self.batch_rows.observe(record.rows)
        self.batch_tasks.observe(len(record.tasks))
        self.batch_seconds.observe(record.seconds)


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and status, and times it (pure ASGI). The endpoint label is the
    template of the route that serves the path (`/v2/models/{model}/infer`), never the path: a label value
    per task name or version a client types would grow the registry without bound. `routes` are the app's
    (anything with `path`, the template, and `path_regex`, as starlette's Route); other paths are "other"."""

    def __init__(self, app: Any, metrics: Metrics, routes: Sequence[Any] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = [(r.path, r.path_regex) for r in routes]

    def endpoint(self, path: str) -> str:
        return next((template for template, regex in self.routes if regex.match(path)), OTHER)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = self.endpoint(scope.get("path", ""))
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)

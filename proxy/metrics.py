"""Prometheus metrics at /metrics.

With `--workers N` each worker is a process of its own, and a scrape reaches just one of them. The supervisor
then sets PROMETHEUS_MULTIPROC_DIR: every worker keeps its values in files there (prometheus_client's
multiprocess mode), and whichever worker answers /metrics adds them all up.

State that lives in the worker (write queue, written and retried batches, policy versions) is sampled once a
second, and by the answering worker just before it answers, rather than on every call.

/metrics takes the admin key when one is set (the same rule as the admin routes; `--metrics-public` serves it
without one, for scrapers that cannot send it). No label holds an upstream's address: upstreams are named by their
index in `--upstream` order (`upstream="0"`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from fastapi import FastAPI, Request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.responses import Response

from trainwire.proxy.auth import require_admin_key
from trainwire.proxy.errors import responses
from trainwire.proxy.hot_path import ROUTE_KEY

SAMPLE_S = 1.0


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    def __init__(self, state) -> None:
        self.state = state
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue = Gauge(
            "trainwire_write_queue_depth", "Calls waiting to be written", registry=r, multiprocess_mode="livesum"
        )
        self.written = Counter("trainwire_calls_written", "Calls written to the store", registry=r)
        self.retries = Counter("trainwire_write_retries", "Batch write retries", registry=r)
        self.requests = Counter("trainwire_requests", "Requests by path and status", ["path", "status"], registry=r)
        self.latency = Histogram(
            "trainwire_request_seconds",
            "Request time in the proxy (to the response head)",
            ["path"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.version = Gauge(
            "trainwire_policy_version",
            "Policy version served, per upstream (its index in --upstream order)",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.otlp_exported = Counter(
            "trainwire_otlp_spans_exported", "Spans the OTLP export delivered to the collector", registry=r
        )
        self.otlp_dropped = Counter(
            "trainwire_otlp_spans_dropped",
            "Spans the OTLP export dropped (queue_full: the collector is slow or down; export_failed: it refused "
            "or did not answer)",
            ["reason"],
            registry=r,
        )
        self._seen_otlp: dict[str, int] = {}
        self.backlog = Gauge(
            "trainwire_backlog_sessions",
            "Sessions rewarded but not yet taken by a trainer, as admission control last read it (--max-backlog)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.refused = Counter(
            "trainwire_admission_refused", "First calls of new sessions refused with 429 (--max-backlog)", registry=r
        )
        self._seen = {"written": 0, "retries": 0, "refused": 0}
        self._task: asyncio.Task | None = None

    def sample(self) -> None:
        writer = self.state.writer
        self.queue.set(writer.depth)
        for name, counter, now in (
            ("written", self.written, writer.written_total),
            ("retries", self.retries, writer.failed_batches),
            ("refused", self.refused, self.state.admission.refused),
        ):
            if now > self._seen[name]:
                counter.inc(now - self._seen[name])
                self._seen[name] = now
        otel = getattr(self.state, "otel", None)
        if otel is not None:
            self._otlp(otel.stats())
        if self.state.admission.backlog is not None:
            self.backlog.set(self.state.admission.backlog)
        if self.state.pool is not None:
            for i, upstream in enumerate(self.state.pool.upstreams):
                self.version.labels(str(i)).set(self.state.policy.resolve(upstream.url)[1])

    def _otlp(self, stats: dict) -> None:
        for key, counter, now in (
            ("exported", self.otlp_exported, stats["exported"]),
            *((f"dropped:{r}", self.otlp_dropped.labels(r), n) for r, n in stats["dropped"].items()),
        ):
            seen = self._seen_otlp.get(key, 0)
            if now > seen:
                counter.inc(now - seen)
                self._seen_otlp[key] = now

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_S)
            self.sample()

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample_forever(), name="trainwire-metrics")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()  # the last writes of the drain count too

    def count(self, app):
        """A plain ASGI middleware (BaseHTTPMiddleware would add a task hop per request and wrap streaming
        bodies) counting requests by route template and status, and their time to the response head."""
        requests, latency = self.requests, self.latency

        async def counted(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            t0 = time.perf_counter()

            async def send_wrapper(message):
                if message["type"] == "http.response.start":
                    path = scope.get(ROUTE_KEY) or getattr(scope.get("route"), "path", "other")
                    requests.labels(path, str(message["status"])).inc()
                    latency.labels(path).observe(time.perf_counter() - t0)
                await send(message)

            await app(scope, receive, send_wrapper)

        return counted

    def exposition(self) -> bytes:
        self.sample()
        if not multiprocess():
            return generate_latest(self.registry)
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)
        return generate_latest(registry)


def install(app: FastAPI, state) -> Metrics:
    """The /metrics route; `Metrics.count` is the middleware that counts requests (proxy/app.py places it)."""
    metrics = Metrics(state)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"description": "Prometheus text exposition", "content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}},
            **responses(401, s401="Missing or wrong key (the admin key when one is set; see --metrics-public)"),
        },
    )
    async def metrics_endpoint(request: Request) -> Response:
        """Prometheus metrics, summed over the workers."""
        settings = state.settings
        if not settings.metrics_public:
            require_admin_key(request.headers, settings)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return metrics

"""Prometheus metrics at /metrics."""

from __future__ import annotations

import time

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.responses import Response

from proxy.hot_path import ROUTE_KEY


def install(app: FastAPI, state) -> None:
    registry = CollectorRegistry()
    queue = Gauge("trainwire_write_queue_depth", "Calls waiting to be written", registry=registry)
    queue.set_function(lambda: state.writer.depth)
    written = Gauge("trainwire_calls_written_total", "Calls written to the store", registry=registry)
    written.set_function(lambda: state.writer.written_total)
    retries = Gauge("trainwire_write_retries_total", "Batch write retries", registry=registry)
    retries.set_function(lambda: state.writer.failed_batches)
    requests = Counter("trainwire_requests_total", "Requests by path and status", ["path", "status"],
                       registry=registry)
    latency = Histogram("trainwire_request_seconds", "Request time in the proxy (to the response head)", ["path"],
                        registry=registry, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
    version = Gauge("trainwire_policy_version", "Policy version served, per upstream", ["upstream"],
                    registry=registry)

    # A plain ASGI middleware: BaseHTTPMiddleware would add a task hop per request and wrap streaming bodies.
    inner = app.build_middleware_stack

    def build():
        downstream = inner()

        async def count(scope, receive, send):
            if scope["type"] != "http":
                return await downstream(scope, receive, send)
            t0 = time.perf_counter()
            status = [500]

            async def send_wrapper(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                    path = scope.get(ROUTE_KEY) or getattr(scope.get("route"), "path", "other")
                    requests.labels(path, str(status[0])).inc()
                    latency.labels(path).observe(time.perf_counter() - t0)
                await send(message)

            await downstream(scope, receive, send_wrapper)

        return count

    app.build_middleware_stack = build

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        for upstream in state.pool.upstreams:
            version.labels(upstream.url).set(state.policy.resolve(upstream.url)[1])
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

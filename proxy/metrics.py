"""Prometheus metrics at /metrics."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.responses import Response


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

    @app.middleware("http")
    async def count(request, call_next):
        import time

        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "other")
        requests.labels(path, str(response.status_code)).inc()
        latency.labels(path).observe(time.perf_counter() - t0)
        return response

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        for upstream in state.pool.upstreams:
            version.labels(upstream.url).set(state.policy.resolve(upstream.url)[1])
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

"""A minimal OTLP/HTTP trace receiver for tests and benchmarks: it decodes what the real exporter sends
(protobuf, gzip or not) with opentelemetry-proto and keeps the spans, or answers slowly or with an error."""

from __future__ import annotations

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def _value(v) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


class OtlpReceiver:
    def __init__(self, *, delay_s: float = 0.0, status: int = 200, decode: bool = True) -> None:
        """`decode=False`: count requests only (a benchmark's collector, whose work is not the proxy's)."""
        self.delay_s = delay_s
        self.decode = decode
        self.status = status
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if receiver.decode:
                    receiver._take(body, dict(self.headers))
                else:
                    receiver.requests += 1
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                out = ExportTraceServiceResponse().SerializeToString()
                try:
                    self.send_response(receiver.status)
                    self.send_header("content-type", "application/x-protobuf")
                    self.send_header("content-length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the exporter gave up waiting (a slow collector): its loss, counted on its side

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.headers_seen: list[dict[str, str]] = []

    def _take(self, body: bytes, headers: dict[str, str]) -> None:
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        out = []
        for rs in req.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(
                        {
                            "name": s.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "kind": s.kind,
                            "status": s.status.code,
                            "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano,
                            "attributes": {kv.key: _value(kv.value) for kv in s.attributes},
                            "events": [
                                {"name": e.name, "attributes": {kv.key: _value(kv.value) for kv in e.attributes}}
                                for e in s.events
                            ],
                            "links": [(lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links],
                            "resource": resource,
                        }
                    )
        with self._lock:
            self.requests += 1
            self.spans.extend(out)
            self.headers_seen.append({k.lower(): v for k, v in headers.items()})

    def start(self) -> OtlpReceiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, pred, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [s for s in self.spans if pred(s)]
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no matching span in {len(self.spans)} received")

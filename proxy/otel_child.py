"""The OpenTelemetry export process: span plans from the proxy (proxy/otel_export.py) into real spans, sent by the
SDK's BatchSpanProcessor with the OTLP/HTTP exporter. Its own process, so the SDK's encoding and HTTP client never
hold the proxy's GIL. A reader thread drains the pipe at once, so the proxy's writes never wait; what the
processor's bounded queue cannot take is dropped and counted in shared memory."""

from __future__ import annotations

import logging
import pickle
import signal
import threading
from collections.abc import Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from trainwire.proxy.otel_export import CALL, CHILD_QUEUE_FULL, EXPORT_FAILED, EXPORTED, FULL, RECEIVED

log = logging.getLogger("trainwire.otel")

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SCOPE = InstrumentationScope("trainwire", "0.1.0", "https://opentelemetry.io/schemas/1.37.0")


class _CountingExporter(SpanExporter):
    """The real exporter, counting what it delivered and what it could not (collector down, refused)."""

    def __init__(self, inner: SpanExporter, counts) -> None:
        self.inner = inner
        self.counts = counts

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            log.exception("OTLP export raised; %d spans dropped", len(spans))
            result = SpanExportResult.FAILURE
        self.counts[EXPORTED if result is SpanExportResult.SUCCESS else EXPORT_FAILED] += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _Processor(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans its full queue turns away (it only logs them)."""

    def __init__(self, exporter: SpanExporter, counts, max_queue_size: int) -> None:
        super().__init__(exporter, max_queue_size=max_queue_size, schedule_delay_millis=1000)
        self._counts = counts
        self._max = max_queue_size

    def full(self) -> bool:
        queue = getattr(getattr(self, "_batch_processor", None), "_queue", None)
        return queue is not None and len(queue) >= self._max

    def on_end(self, span: ReadableSpan) -> None:
        if self.full():
            self._counts[CHILD_QUEUE_FULL] += 1
            return
        super().on_end(span)


def make_span(plan, resource: Resource) -> ReadableSpan:
    kind, trace_id, span_id, parent, name, start, end, error, attrs, events, links = plan
    return ReadableSpan(
        name=name,
        context=SpanContext(trace_id, span_id, is_remote=False, trace_flags=_SAMPLED),
        parent=SpanContext(trace_id, parent, is_remote=True, trace_flags=_SAMPLED) if parent else None,
        resource=resource,
        attributes=attrs,
        events=[Event(n, a, t) for n, a, t in events],
        links=[Link(SpanContext(t, s, is_remote=False, trace_flags=_SAMPLED), a) for t, s, a in links],
        kind=SpanKind.CLIENT if kind == CALL else SpanKind.INTERNAL,
        instrumentation_scope=_SCOPE,
        status=Status(StatusCode.ERROR, error) if error is not None else Status(StatusCode.UNSET),
        start_time=start,
        end_time=end,
    )


def run(conn, counts, config: dict) -> None:
    # The proxy stops this process itself, after its last spans (a signal to the whole group must not come first).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Left None, the exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT and _HEADERS itself; the flag wins. A short
    # timeout: it retries with backoff inside it while spans queue (and, past the queue, are dropped).
    exporter = OTLPSpanExporter(endpoint=config["endpoint"], timeout=5)
    processor = _Processor(_CountingExporter(exporter, counts), counts, config["queue_size"])
    resource = Resource.create({"service.name": config["service_name"]})
    batches: list[bytes] = []
    ready = threading.Condition()
    done = threading.Event()

    def read() -> None:
        """Drain the pipe as fast as it fills, so the proxy's writes never wait."""
        try:
            while True:
                data = conn.recv_bytes()
                if not data:
                    break
                with ready:
                    batches.append(data)
                    ready.notify()
        except (EOFError, OSError):
            pass  # the proxy is gone
        done.set()
        with ready:
            ready.notify()

    threading.Thread(target=read, name="trainwire-otel-read", daemon=True).start()
    while True:
        with ready:
            while not batches and not done.is_set():
                counts[FULL] = int(processor.full())  # the proxy drops at once while the queue is full
                ready.wait(0.2)
            taken, batches[:] = list(batches), []
        counts[FULL] = int(processor.full())
        for data in taken:
            plans = pickle.loads(data)
            counts[RECEIVED] += len(plans)
            for plan in plans:
                if processor.full():  # the collector is down or slow: drop before making the span
                    counts[CHILD_QUEUE_FULL] += 1
                    continue
                try:
                    processor.on_end(make_span(plan, resource))
                except Exception:
                    log.exception("could not make a span; dropped")
        if done.is_set() and not batches:
            break
    processor.shutdown()

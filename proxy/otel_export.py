"""Every recorded call as an OpenTelemetry span, in the team's own tracing stack (`--otlp-endpoint`).

Spans follow OpenTelemetry's GenAI semantic conventions (`gen_ai.*`, proxy/otel_genai.py builds the attributes)
plus trainwire's own (`trainwire.*`). A call that carried a W3C `traceparent` is a child of the agent's span; a
call without one goes into a trace of its own session (trace id derived from the session id), so a session is
one trace either way. Span ids are derived from call ids, so a reward can point at its call's span.

Rewards (user and automatic) are spans of their own, `trainwire.reward`, children of the rewarded call's span (or,
for a session reward, in the trace of the session's latest call), each with a `gen_ai.evaluation.result` event
and a link to the call's span. A session has no span that ends, so events on it could never be sent.

Export never slows or fails a call. The hot path appends the record to a bounded deque (a few hundred ns); a
daemon thread turns what is pending into spans every `_TICK_S` and hands them to the SDK's BatchSpanProcessor
(its own bounded queue, its own thread, the real OTLP/HTTP exporter). When either queue is full or the collector
refuses or is down, spans are dropped and counted (`dropped` by reason: /stats, /metrics).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from trainwire.proxy.otel_genai import call_attributes, operation_name
from trainwire.records import CallRecord

log = logging.getLogger("trainwire.otel")

_TICK_S = 0.2
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_REMEMBERED = 50_000  # calls and sessions whose span context a later reward may need
_SCOPE = InstrumentationScope("trainwire", "0.1.0", "https://opentelemetry.io/schemas/1.37.0")


class RewardLike(Protocol):
    session_id: str
    call_id: str | None
    value: float | None
    final: bool
    source: str


def traces_endpoint(endpoint: str | None) -> str | None:
    """`--otlp-endpoint` is a base URL, like OTEL_EXPORTER_OTLP_ENDPOINT: the traces path is appended."""
    if not endpoint:
        return None
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


def export_wanted(endpoint: str | None) -> bool:
    return bool(
        endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def span_id_of(call_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(call_id.encode(), digest_size=8).digest()) or 1


def session_trace_id(session_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(session_id.encode(), digest_size=16).digest()) or 1


def _ns(t: datetime) -> int:
    return int(t.timestamp() * 1e9)


class _CountingExporter(SpanExporter):
    """The real exporter, counting what it delivered and what it could not (collector down, refused)."""

    def __init__(self, inner: SpanExporter, counts: ExportCounts) -> None:
        self.inner = inner
        self.counts = counts

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            log.exception("OTLP export raised; %d spans dropped", len(spans))
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.counts.exported += len(spans)
        else:
            self.counts.drop("export_failed", len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


@dataclass
class ExportCounts:
    """Spans this process made, delivered, and dropped by reason (queue_full, export_failed)."""

    spans: int = 0
    exported: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class _Bsp(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans its full queue turns away (it only logs them)."""

    def __init__(self, exporter: SpanExporter, counts: ExportCounts, max_queue_size: int) -> None:
        super().__init__(exporter, max_queue_size=max_queue_size, schedule_delay_millis=1000)
        self._counts = counts
        self._max = max_queue_size

    def on_end(self, span: ReadableSpan) -> None:
        queue = getattr(getattr(self, "_batch_processor", None), "_queue", None)
        if queue is not None and len(queue) >= self._max:
            self._counts.drop("queue_full")
            return
        super().on_end(span)


class OtelExport:
    def __init__(self, exporter: SpanExporter, *, content: bool, queue_size: int, resource: Resource) -> None:
        self.counts = ExportCounts()
        self.content = content
        self.resource = resource
        self._queue_size = queue_size
        self._pending: collections.deque[tuple[str, Any]] = collections.deque()
        self._processor = _Bsp(_CountingExporter(exporter, self.counts), self.counts, queue_size)
        # span contexts later rewards attach to, keyed by call id and by session id
        self._calls: collections.OrderedDict[str, SpanContext] = collections.OrderedDict()
        self._sessions: collections.OrderedDict[str, tuple[SpanContext, SpanContext | None]] = collections.OrderedDict()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="trainwire-otel-spans", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings) -> OtelExport | None:
        if not export_wanted(settings.otlp_endpoint):
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Left None, the exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT and _HEADERS itself; a flag wins.
        # A short timeout: the exporter retries with backoff inside it, on its own thread, while spans queue.
        exporter = OTLPSpanExporter(endpoint=traces_endpoint(settings.otlp_endpoint), timeout=5)
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "trainwire")})
        log.info("exporting calls as OpenTelemetry spans to %s", getattr(exporter, "_endpoint", "?"))
        return cls(exporter, content=settings.otlp_content, queue_size=settings.otlp_queue_size, resource=resource)

    # --- the hooks (event loop, hot path) ----------------------------------------------------------
    def call(self, rec: CallRecord) -> None:
        self._offer(("call", rec))

    def reward(self, reward: RewardLike) -> None:
        self._offer(("reward", reward))

    def _offer(self, item: tuple[str, Any]) -> None:
        if len(self._pending) >= self._queue_size:
            self.counts.drop("queue_full")
            return
        self._pending.append(item)

    # --- the span thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(_TICK_S)
            self._wake.clear()
            self._drain()
        self._drain()

    def _drain(self) -> None:
        while self._pending:
            kind, item = self._pending.popleft()
            try:
                span = self._call_span(item) if kind == "call" else self._reward_span(item)
            except Exception:
                log.exception("could not make a span of a %s; dropped", kind)
                self.counts.drop("invalid")
                continue
            self.counts.spans += 1
            self._processor.on_end(span)

    def _remember(self, d: collections.OrderedDict, key: str, value: Any) -> None:
        d.pop(key, None)
        d[key] = value
        if len(d) > _REMEMBERED:
            d.popitem(last=False)

    def _call_span(self, rec: CallRecord) -> ReadableSpan:
        if rec.trace_id and rec.parent_span_id:
            trace_id = int(rec.trace_id, 16)
            parent: SpanContext | None = SpanContext(
                trace_id, int(rec.parent_span_id, 16), is_remote=True, trace_flags=_SAMPLED
            )
        else:
            trace_id, parent = session_trace_id(rec.session_id), None
        ctx = SpanContext(trace_id, span_id_of(rec.id), is_remote=False, trace_flags=_SAMPLED)
        self._remember(self._calls, rec.id, ctx)
        self._remember(self._sessions, rec.session_id, (ctx, parent))
        attrs = call_attributes(rec, content=self.content)
        failed = rec.status_code != 200 or rec.error is not None
        model = rec.model_requested or rec.model_served or ""
        return ReadableSpan(
            name=f"{operation_name(rec)} {model}".strip(),
            context=ctx,
            parent=parent,
            resource=self.resource,
            attributes=attrs,
            kind=SpanKind.CLIENT,
            instrumentation_scope=_SCOPE,
            status=Status(StatusCode.ERROR, (rec.error or "")[:256]) if failed else Status(StatusCode.UNSET),
            start_time=_ns(rec.started_at),
            end_time=_ns(rec.finished_at),
        )

    def _reward_span(self, r: RewardLike) -> ReadableSpan:
        call_ctx = self._calls.get(r.call_id) if r.call_id else None
        links: list[Link] = []
        parent: SpanContext | None
        if call_ctx is not None:
            trace_id, parent = call_ctx.trace_id, call_ctx
            links.append(Link(call_ctx, {"trainwire.link": "rewarded_call"}))
        elif r.session_id in self._sessions:
            latest, agent_parent = self._sessions[r.session_id]
            trace_id, parent = latest.trace_id, agent_parent
            links.append(Link(latest, {"trainwire.link": "latest_call"}))
        else:  # another worker served the session: its trace, as far as this process can tell
            trace_id, parent = session_trace_id(r.session_id), None
        now = _ns(getattr(r, "created_at", None) or datetime.now().astimezone())
        attrs: dict[str, Any] = {
            "trainwire.session_id": r.session_id,
            "session.id": r.session_id,
            "trainwire.reward.source": r.source,
            "trainwire.reward.final": bool(r.final),
        }
        if r.value is not None:
            attrs["trainwire.reward.value"] = float(r.value)
        if r.call_id:
            attrs["trainwire.call_id"] = r.call_id
        event_attrs: dict[str, Any] = {"gen_ai.evaluation.name": r.source}
        if r.value is not None:
            event_attrs["gen_ai.evaluation.score.value"] = float(r.value)
        if r.call_id:
            event_attrs["gen_ai.response.id"] = r.call_id
        seed = f"reward:{r.session_id}:{r.call_id}:{r.source}:{getattr(r, 'idempotency_key', None) or now}"
        return ReadableSpan(
            name=f"trainwire.reward {r.source}",
            context=SpanContext(trace_id, span_id_of(seed), is_remote=False, trace_flags=_SAMPLED),
            parent=parent,
            resource=self.resource,
            attributes=attrs,
            events=[Event("gen_ai.evaluation.result", event_attrs, now)],
            links=links,
            kind=SpanKind.INTERNAL,
            instrumentation_scope=_SCOPE,
            start_time=now,
            end_time=now,
        )

    # --- lifecycle ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "spans": self.counts.spans,
            "exported": self.counts.exported,
            "dropped": dict(self.counts.dropped),
            "pending": len(self._pending),
        }

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Send what is queued if the collector answers within `timeout_s`; never hold a shutdown longer."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout_s)
        done = threading.Thread(target=self._processor.shutdown, daemon=True)
        done.start()
        done.join(timeout_s)

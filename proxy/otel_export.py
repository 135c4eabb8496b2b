"""Every recorded call as an OpenTelemetry span, in the team's own tracing stack (`--otlp-endpoint`).

Spans follow OpenTelemetry's GenAI semantic conventions (`gen_ai.*`, proxy/otel_genai.py builds the attributes)
plus trainwire's own (`trainwire.*`). A call that carried a W3C `traceparent` is a child of the agent's span; a
call without one goes into a trace of its own session (trace id derived from the session id), so a session is
one trace either way. Span ids are derived from call ids, so a reward can point at its call's span.

Rewards (user and automatic) are spans of their own, `trainwire.reward`, children of the rewarded call's span (or,
for a session reward, in the trace of the session's latest call), each with a `gen_ai.evaluation.result` event
and a link to the call's span. A session has no span that ends, so events on it could never be sent.

Export never slows or fails a call. The hot path appends the record to a bounded deque (well under a
microsecond). Every `_TICK_S` the event loop turns what is pending into plain tuples (ids, times, attributes) and
writes them, pickled, to a pipe; a child process (`python -m trainwire.proxy.otel_child`) makes the spans and
sends them with the SDK's BatchSpanProcessor and the real OTLP/HTTP exporter. Measured first with a thread in this
process: the SDK's pure-Python protobuf encoding (about 55 us a span) and its HTTP client held the GIL in long
stretches, and the event loop waited on it (throughput halved at saturation with the collector up). In a child
they use another core and the proxy never waits on them. When the pipe, the deque or the child's queue is full, or
the collector refuses or is down, spans are dropped and counted (`dropped` by reason: /stats, /metrics).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import hashlib
import logging
import multiprocessing
import os
import pickle
import struct
import termios
from datetime import UTC, datetime
from typing import Any, Protocol

from trainwire.proxy.otel_genai import call_attributes, operation_name
from trainwire.records import CallRecord

log = logging.getLogger("trainwire.otel")

_TICK_S = 0.1
_REMEMBERED = 50_000  # calls and sessions whose span context a later reward may need
_PIPE_BYTES = 1 << 20  # what Linux lets any process ask for (/proc/sys/fs/pipe-max-size)
_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032
# The child's counters, in shared memory: spans it received, exported, dropped (its queue full), dropped (export
# failed: the collector down, slow past the timeout, or refusing); and FULL, 1 while its queue is full (the
# collector is down or slow), when the proxy drops at once instead of planning spans the child would drop.
RECEIVED, EXPORTED, CHILD_QUEUE_FULL, EXPORT_FAILED, FULL, N_COUNTS = range(6)
CALL, REWARD = 0, 1

# A span to make, as the child takes it: (kind, trace id, span id, parent span id or 0, name, start ns, end ns,
# error message or None, attributes, events [(name, attributes, ns)], links [(trace id, span id, attributes)])
SpanPlan = tuple[int, int, int, int, str, int, int, str | None, dict, list, list]


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


class SpanPlanner:
    """CallRecords and rewards into SpanPlans; remembers span contexts (bounded) for the rewards that follow."""

    def __init__(self, content: bool) -> None:
        self.content = content
        self.calls: collections.OrderedDict[str, tuple[int, int]] = collections.OrderedDict()
        # session -> (trace id, its latest call's span id, that call's parent span id)
        self.sessions: collections.OrderedDict[str, tuple[int, int, int]] = collections.OrderedDict()

    @staticmethod
    def _remember(d: collections.OrderedDict, key: str, value: Any) -> None:
        d.pop(key, None)
        d[key] = value
        if len(d) > _REMEMBERED:
            d.popitem(last=False)

    def call(self, rec: CallRecord) -> SpanPlan:
        if rec.trace_id and rec.parent_span_id:
            trace_id, parent = int(rec.trace_id, 16), int(rec.parent_span_id, 16)
        else:
            trace_id, parent = session_trace_id(rec.session_id), 0
        span_id = span_id_of(rec.id)
        self._remember(self.calls, rec.id, (trace_id, span_id))
        self._remember(self.sessions, rec.session_id, (trace_id, span_id, parent))
        failed = rec.status_code != 200 or rec.error is not None
        model = rec.model_requested or rec.model_served or ""
        return (
            CALL,
            trace_id,
            span_id,
            parent,
            f"{operation_name(rec)} {model}".strip(),
            _ns(rec.started_at),
            _ns(rec.finished_at),
            (rec.error or "")[:256] if failed else None,
            call_attributes(rec, content=self.content),
            [],
            [],
        )

    def reward(self, r: RewardLike) -> SpanPlan:
        known = self.calls.get(r.call_id) if r.call_id else None
        links: list[tuple[int, int, dict]] = []
        if known is not None:
            trace_id, parent = known
            links.append((*known, {"trainwire.link": "rewarded_call"}))
        elif r.session_id in self.sessions:
            trace_id, latest, parent = self.sessions[r.session_id]
            links.append((trace_id, latest, {"trainwire.link": "latest_call"}))
        else:  # another worker served the session: its trace, as far as this process can tell
            trace_id, parent = session_trace_id(r.session_id), 0
        created = getattr(r, "created_at", None)
        now = _ns(created if isinstance(created, datetime) else datetime.now(UTC))
        attrs: dict[str, Any] = {
            "trainwire.session_id": r.session_id,
            "session.id": r.session_id,
            "trainwire.reward.source": r.source,
            "trainwire.reward.final": bool(r.final),
        }
        event: dict[str, Any] = {"gen_ai.evaluation.name": r.source}
        if r.value is not None:
            attrs["trainwire.reward.value"] = event["gen_ai.evaluation.score.value"] = float(r.value)
        if r.call_id:
            attrs["trainwire.call_id"] = r.call_id
        seed = f"reward:{r.session_id}:{r.call_id}:{r.source}:{getattr(r, 'idempotency_key', None) or now}"
        return (
            REWARD,
            trace_id,
            span_id_of(seed),
            parent,
            f"trainwire.reward {r.source}",
            now,
            now,
            None,
            attrs,
            [("gen_ai.evaluation.result", event, now)],
            links,
        )


class OtelExport:
    """The proxy's side: the pending deque, the planner, the pipe to the child and the counters."""

    def __init__(self, settings) -> None:
        self.queue_size = settings.otlp_queue_size
        self.planner = SpanPlanner(settings.otlp_content)
        self._pending: collections.deque[tuple[int, Any]] = collections.deque()
        self.spans = 0
        self.dropped: dict[str, int] = {}
        ctx = multiprocessing.get_context("spawn")
        self.counts = ctx.Array("q", N_COUNTS, lock=False)
        reader, self._writer = ctx.Pipe(duplex=False)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._writer.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
        self._capacity = fcntl.fcntl(self._writer.fileno(), _F_GETPIPE_SZ)
        from trainwire.proxy.otel_child import run

        config = {
            "endpoint": traces_endpoint(settings.otlp_endpoint),
            "queue_size": settings.otlp_queue_size,
            "service_name": os.environ.get("OTEL_SERVICE_NAME", "trainwire"),
        }
        self._child = ctx.Process(target=run, args=(reader, self.counts, config), name="trainwire-otel", daemon=True)
        self._child.start()
        reader.close()
        self._task: asyncio.Task | None = None
        self._gone = False
        log.info(
            "exporting calls as OpenTelemetry spans to %s", config["endpoint"] or "the OTEL_EXPORTER_OTLP_* endpoint"
        )

    @classmethod
    def from_settings(cls, settings) -> OtelExport | None:
        return cls(settings) if export_wanted(settings.otlp_endpoint) else None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._flush_forever(), name="trainwire-otel")

    # --- the hooks (hot path) ----------------------------------------------------------------------
    def call(self, rec: CallRecord) -> None:
        self._offer((CALL, rec))

    def reward(self, reward: RewardLike) -> None:
        self._offer((REWARD, reward))

    def _offer(self, item: tuple[int, Any]) -> None:
        if len(self._pending) >= self.queue_size or self.counts[FULL]:
            self._drop("queue_full")
            return
        self._pending.append(item)

    def _drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    # --- every tick, on the event loop -------------------------------------------------------------
    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(_TICK_S)
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        plans: list[SpanPlan] = []
        while self._pending:
            kind, item = self._pending.popleft()
            try:
                plans.append(self.planner.call(item) if kind == CALL else self.planner.reward(item))
            except Exception:
                log.exception("could not make a span of a %s; dropped", "call" if kind == CALL else "reward")
                self._drop("invalid")
        self.spans += len(plans)
        if self._gone:
            self._drop("exporter_gone", len(plans))
            return
        data = pickle.dumps(plans, protocol=pickle.HIGHEST_PROTOCOL)
        # A write into a pipe with room never blocks: send only then (the child reads at once; it is full only
        # when the child is starved or stuck), else drop the batch, counted.
        if len(data) + 16 > self._capacity - self._unread():
            self._drop("queue_full", len(plans))
            return
        try:
            self._writer.send_bytes(data)
        except OSError:
            log.error(
                "the OpenTelemetry export process is gone (exit code %s); spans are dropped", self._child.exitcode
            )
            self._gone = True
            self._drop("exporter_gone", len(plans))

    def _unread(self) -> int:
        buf = fcntl.ioctl(self._writer.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return struct.unpack("i", buf)[0]

    # --- stats and lifecycle -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        dropped = dict(self.dropped)
        for reason, i in (("queue_full", CHILD_QUEUE_FULL), ("export_failed", EXPORT_FAILED)):
            if self.counts[i]:
                dropped[reason] = dropped.get(reason, 0) + self.counts[i]
        return {
            "spans": self.spans,
            "exported": self.counts[EXPORTED],
            "dropped": dropped,
            "pending": len(self._pending),
        }

    @property
    def exported(self) -> int:
        return self.counts[EXPORTED]

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is pending; the child exports what it holds if the collector answers within `timeout_s`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.flush()
        with contextlib.suppress(OSError):
            self._writer.send_bytes(b"")  # the end
        self._writer.close()
        await asyncio.to_thread(self._child.join, timeout_s + 2)
        if self._child.is_alive():
            self._child.terminate()

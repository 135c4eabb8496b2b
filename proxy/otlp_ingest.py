"""OTLP/HTTP trace requests decoded down to what automatic rewards need: the agent's tool spans.

Protobuf (`application/x-protobuf`, opentelemetry-proto) and OTLP's JSON mapping (`application/json`: hex ids,
camelCase, 64-bit integers as strings or numbers, status codes as numbers or enum names), gzip or not. A tool span
is one whose `gen_ai.operation.name` is `execute_tool` (OpenTelemetry's GenAI conventions) or whose
`openinference.span.kind` is `TOOL` (OpenInference: Phoenix, Arize, the Agents SDK and LangChain instrumentations).
Of each, only the tool's name, status, times, tool call id, ids and session attribute are kept; every other span
is accepted and dropped at once. This is not a trace database.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

MAX_TOOL_SPANS = 2_000  # per request (an SDK exports 512 a batch); more are rejected (partial success)
SESSION_KEYS = ("trainwire.session_id", "session.id")
TOOL_NAME_KEYS = ("gen_ai.tool.name", "tool.name")
TOOL_CALL_ID_KEYS = ("gen_ai.tool.call.id", "tool_call.id", "tool.call.id")
_KEYS = frozenset(
    {*SESSION_KEYS, *TOOL_NAME_KEYS, *TOOL_CALL_ID_KEYS, "gen_ai.operation.name", "openinference.span.kind"}
)
STATUS_ERROR = 2
_STATUS_NAMES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}


class BadOtlp(ValueError):
    """The request is not OTLP trace data: a 400."""


@dataclass(slots=True)
class ToolSpan:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str | None
    tool: str
    error: bool
    message: str
    start_ns: int
    end_ns: int
    tool_call_id: str | None
    session_id: str | None  # from the span, else its resource

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6


@dataclass(slots=True)
class Decoded:
    tool_spans: list[ToolSpan]
    spans: int  # all spans in the request
    rejected: int
    problems: list[str]


def gunzip(body: bytes, limit: int) -> bytes:
    """A gzip body, inflated to at most `limit` bytes (a small bomb must not become gigabytes)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadOtlp(f"body is not valid gzip: {exc}") from None
    if len(out) > limit:
        raise OverflowError(limit)
    if not d.eof:
        raise BadOtlp("gzip body is truncated")
    return out


def _is_tool(attrs: Mapping[str, Any]) -> bool:
    return attrs.get("gen_ai.operation.name") == "execute_tool" or attrs.get("openinference.span.kind") == "TOOL"


def _first(attrs: Mapping[str, Any], keys: Iterable[str]) -> str | None:
    for k in keys:
        v = attrs.get(k)
        if isinstance(v, str) and v:
            return v
    return None


class _Collector:
    def __init__(self) -> None:
        self.out = Decoded([], 0, 0, [])

    def reject(self, why: str) -> None:
        self.out.rejected += 1
        if len(self.out.problems) < 5 and why not in self.out.problems:
            self.out.problems.append(why)

    def span(
        self,
        *,
        attrs: Mapping[str, Any],
        resource_session: str | None,
        trace_id: str,
        span_id: str,
        parent: str,
        name: str,
        status: int,
        message: str,
        start_ns: int,
        end_ns: int,
    ) -> None:
        self.out.spans += 1
        if not _is_tool(attrs):
            return
        if len(trace_id) != 32 or len(span_id) != 16 or trace_id == "0" * 32 or span_id == "0" * 16:
            self.reject("a tool span's traceId must be 16 bytes and its spanId 8 bytes, not zero")
            return
        if len(self.out.tool_spans) >= MAX_TOOL_SPANS:
            self.reject(f"more than {MAX_TOOL_SPANS} tool spans in one request")
            return
        self.out.tool_spans.append(
            ToolSpan(
                trace_id=trace_id,
                span_id=span_id,
                parent_span_id=parent if len(parent) == 16 else None,
                tool=(_first(attrs, TOOL_NAME_KEYS) or name)[:256],
                error=status == STATUS_ERROR,
                message=message[:500],
                start_ns=start_ns,
                end_ns=end_ns,
                tool_call_id=(_first(attrs, TOOL_CALL_ID_KEYS) or "")[:256] or None,
                session_id=(_first(attrs, SESSION_KEYS) or resource_session or "")[:128] or None,
            )
        )


# --- protobuf ------------------------------------------------------------------------------------------


def _pb_value(v) -> Any:
    which = v.WhichOneof("value")
    return getattr(v, which) if which in ("string_value", "int_value", "bool_value", "double_value") else None


def _pb_attrs(kvs) -> dict[str, Any]:
    return {kv.key: _pb_value(kv.value) for kv in kvs if kv.key in _KEYS}


def decode_protobuf(body: bytes) -> Decoded:
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(body)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise BadOtlp(f"body is not an OTLP ExportTraceServiceRequest (protobuf): {exc}") from None
    c = _Collector()
    for rs in req.resource_spans:
        resource_session = _first(_pb_attrs(rs.resource.attributes), SESSION_KEYS)
        for ss in rs.scope_spans:
            for s in ss.spans:
                c.span(
                    attrs=_pb_attrs(s.attributes),
                    resource_session=resource_session,
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent=s.parent_span_id.hex(),
                    name=s.name,
                    status=s.status.code,
                    message=s.status.message,
                    start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano,
                )
    return c.out


# --- JSON ----------------------------------------------------------------------------------------------


def _json_value(v: Any) -> Any:
    if not isinstance(v, dict):
        return None
    for k in ("stringValue", "boolValue", "doubleValue"):
        if k in v:
            return v[k]
    if "intValue" in v:
        try:
            return int(v["intValue"])
        except (TypeError, ValueError):
            return None
    return None


def _json_attrs(kvs: Any) -> dict[str, Any]:
    if not isinstance(kvs, list):
        return {}
    return {
        kv["key"]: _json_value(kv.get("value"))
        for kv in kvs
        if isinstance(kv, dict) and isinstance(kv.get("key"), str) and kv["key"] in _KEYS
    }


def _list(obj: Any, *keys: str) -> Iterator[dict]:
    for key in keys:
        items = obj.get(key) if isinstance(obj, dict) else None
        if isinstance(items, list):
            yield from (i for i in items if isinstance(i, dict))


def _nanos(v: Any) -> int:
    try:
        return max(0, int(v))
    except (TypeError, ValueError):
        return 0


def _status(v: Any) -> tuple[int, str]:
    if not isinstance(v, dict):
        return 0, ""
    code = v.get("code", 0)
    code = _STATUS_NAMES.get(code, 0) if isinstance(code, str) else code if isinstance(code, int) else 0
    message = v.get("message")
    return code, message if isinstance(message, str) else ""


def _hex(value: Any) -> str:
    """An id as OTLP's JSON mapping writes it (hex, not base64), lower-cased; anything else is ''."""
    if not isinstance(value, str):
        return ""
    try:
        bytes.fromhex(value)
    except ValueError:
        return ""
    return value.lower()


def decode_json(body: bytes) -> Decoded:
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadOtlp(f"body is not JSON: {exc}") from None
    if not isinstance(req, dict) or not isinstance(req.get("resourceSpans", []), list):
        raise BadOtlp("body is not an OTLP ExportTraceServiceRequest: expected an object with resourceSpans")
    # As the OpenAPI document declares: each ResourceSpans is an object (deeper, malformed parts are skipped).
    bad = next((i for i, rs in enumerate(req.get("resourceSpans", [])) if not isinstance(rs, dict)), None)
    if bad is not None:
        raise BadOtlp(f"resourceSpans[{bad}] is not an object (an OTLP ResourceSpans)")
    c = _Collector()
    for rs in _list(req, "resourceSpans"):
        resource = rs.get("resource")
        resource_session = _first(
            _json_attrs(resource.get("attributes") if isinstance(resource, dict) else None), SESSION_KEYS
        )
        for ss in _list(rs, "scopeSpans", "instrumentationLibrarySpans"):
            for s in _list(ss, "spans"):
                status, message = _status(s.get("status"))
                ids = [_hex(s.get(k)) for k in ("traceId", "spanId", "parentSpanId")]
                c.span(
                    attrs=_json_attrs(s.get("attributes")),
                    resource_session=resource_session,
                    trace_id=ids[0],
                    span_id=ids[1],
                    parent=ids[2],
                    name=str(s.get("name") or ""),
                    status=status,
                    message=message,
                    start_ns=_nanos(s.get("startTimeUnixNano")),
                    end_ns=_nanos(s.get("endTimeUnixNano")),
                )
    return c.out


DECODERS = {"application/x-protobuf": decode_protobuf, "application/json": decode_json}

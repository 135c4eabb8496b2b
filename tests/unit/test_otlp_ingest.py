"""OTLP trace requests decoded down to tool spans (proxy/otlp_ingest.py): protobuf as the SDK's own encoder writes
it, OTLP's JSON mapping in its variants, gzip with a bound."""

from __future__ import annotations

import gzip
import json

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags

from trainwire.proxy.otlp_ingest import MAX_TOOL_SPANS, BadOtlp, decode_json, decode_protobuf, gunzip


def _span(span_id: int, attrs: dict, status=StatusCode.UNSET, resource: dict | None = None) -> ReadableSpan:
    ctx = SpanContext(0xAB, span_id, is_remote=False, trace_flags=TraceFlags(1))
    return ReadableSpan(
        name=f"span {span_id}",
        context=ctx,
        parent=SpanContext(0xAB, 0x77, is_remote=True),
        attributes=attrs,
        resource=Resource.create(resource or {}),
        status=Status(status, "bad" if status is StatusCode.ERROR else None),
        start_time=1_000_000_000,
        end_time=1_004_000_000,
    )


def test_protobuf_keeps_tool_spans_only_with_what_rewards_need():
    body = encode_spans(
        [
            _span(1, {"gen_ai.operation.name": "chat", "gen_ai.tool.name": "x"}),  # an LLM span: not a tool
            _span(
                2,
                {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "calc", "gen_ai.tool.call.id": "tc1"},
                StatusCode.ERROR,
                {"session.id": "s-res"},
            ),
            _span(3, {"openinference.span.kind": "TOOL", "tool.name": "search", "trainwire.session_id": "s-span"}),
        ]
    ).SerializeToString()
    d = decode_protobuf(body)
    assert (d.spans, d.rejected) == (3, 0)
    calc, search = sorted(d.tool_spans, key=lambda s: s.span_id)  # the encoder groups spans by resource
    assert (calc.tool, calc.error, calc.message, calc.tool_call_id, calc.session_id) == (
        "calc",
        True,
        "bad",
        "tc1",
        "s-res",
    )
    assert (calc.trace_id, calc.span_id, calc.parent_span_id) == (f"{0xAB:032x}", f"{2:016x}", f"{0x77:016x}")
    assert calc.duration_ms == 4.0
    assert (search.tool, search.error, search.tool_call_id, search.session_id) == ("search", False, None, "s-span")
    with pytest.raises(BadOtlp):
        decode_protobuf(b"\x0a\xff\xff\xff\xff\x0f")


def _kv(k: str, v) -> dict:
    key = {str: "stringValue", bool: "boolValue", int: "intValue", float: "doubleValue"}[type(v)]
    return {"key": k, "value": {key: str(v) if key == "intValue" else v}}


def test_json_mapping_variants():
    span = {
        "traceId": "AB" * 16,  # hex, any case
        "spanId": "cd" * 8,
        "parentSpanId": "",
        "name": "tool",
        "startTimeUnixNano": "1000000000",  # 64-bit integers as strings
        "endTimeUnixNano": 1002000000,  # or numbers
        "status": {"code": 2, "message": "boom"},  # numeric status
        "attributes": [_kv("openinference.span.kind", "TOOL"), _kv("tool_call.id", "t9"), _kv("n", 3)],
    }
    legacy = {**span, "spanId": "ef" * 8, "status": {"code": "STATUS_CODE_OK"}}
    req = {
        "resourceSpans": [
            {"resource": {"attributes": [_kv("trainwire.session_id", "s1")]}, "scopeSpans": [{"spans": [span]}]},
            {"instrumentationLibrarySpans": [{"spans": [legacy]}]},
        ]
    }
    d = decode_json(json.dumps(req).encode())
    a, b = d.tool_spans
    assert (a.trace_id, a.error, a.message, a.tool_call_id, a.session_id, a.parent_span_id) == (
        "ab" * 16,
        True,
        "boom",
        "t9",
        "s1",
        None,
    )
    assert a.duration_ms == 2.0 and (b.error, b.session_id) == (False, None)
    assert decode_json(b"{}").spans == 0
    for bad in (b"[]", b"nope", b'{"resourceSpans": 3}', b'{"resourceSpans": [[null, null]]}'):
        with pytest.raises(BadOtlp):
            decode_json(bad)


def test_limits():
    many = [
        {"traceId": "12" * 16, "spanId": f"{i + 1:016x}", "attributes": [_kv("gen_ai.operation.name", "execute_tool")]}
        for i in range(MAX_TOOL_SPANS + 3)
    ]
    d = decode_json(json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": many}]}]}).encode())
    assert (len(d.tool_spans), d.rejected) == (MAX_TOOL_SPANS, 3)
    assert gunzip(gzip.compress(b"x" * 100), 100) == b"x" * 100
    with pytest.raises(OverflowError):
        gunzip(gzip.compress(b"x" * 101), 100)
    with pytest.raises(BadOtlp):
        gunzip(gzip.compress(b"x" * 100)[:20], 100)


def test_tool_call_ids_each_api_requested():
    from datetime import UTC, datetime

    from trainwire.proxy.tool_spans import requested_tool_calls
    from trainwire.store.trace_links import TracedCall

    def call(kind: str, response) -> TracedCall:
        now = datetime.now(UTC)
        return TracedCall("c", "s", kind, response, now, now, 200, None, None)

    chat = {"choices": [{"message": {"tool_calls": [{"id": "a"}, {"id": "b"}, {"nope": 1}]}}, {"message": None}]}
    responses = {"output": [{"type": "message"}, {"type": "function_call", "call_id": "c1", "id": "fc_1"}]}
    messages = {"content": [{"type": "text"}, {"type": "tool_use", "id": "toolu_1"}]}
    assert requested_tool_calls(call("chat", chat)) == ["a", "b"]
    # A Responses tool call is named by its call_id (what function_call_output and the tool span carry), read
    # through the call shape like every other reader of the answer; the item's own fc_ id names no tool run.
    assert requested_tool_calls(call("responses", responses)) == ["c1"]
    assert requested_tool_calls(call("messages", messages)) == ["toolu_1"]
    assert requested_tool_calls(call("completion", chat)) == [] and requested_tool_calls(call("chat", None)) == []

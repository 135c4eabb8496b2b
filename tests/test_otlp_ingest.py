"""POST /v1/traces: an agent's tool spans, sent by the real OpenTelemetry SDK and OTLP exporter (protobuf) or as
OTLP JSON, become automatic rewards on the call that requested the tool; hostile OTLP gets a 4xx or is accepted
and ignored, never a 5xx, and loses nothing recorded. Real proxy on SQLite, scripted upstream (the real-vLLM
end-to-end is tests/test_otel_vllm_e2e.py)."""

from __future__ import annotations

import gzip
import json

import httpx
import pytest
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode

from tests.support import dbread
from tests.support.apihelpers import TOOLS, chat, get, start, wait_rewards

KEY = "agent-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture
def proxy(start_proxy, upstream, sqlite_url, tmp_path):
    return start(start_proxy, upstream, sqlite_url, tmp_path, "--api-key", KEY)


def _tracer(proxy) -> tuple[trace.Tracer, TracerProvider]:
    provider = TracerProvider(resource=Resource.create({"service.name": "test-agent"}))
    exporter = OTLPSpanExporter(endpoint=f"{proxy.url}/v1/traces", headers=AUTH)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("agent"), provider


def _post(proxy, body: bytes, media: str, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{proxy.url}/v1/traces", content=body, headers={"content-type": media, **AUTH, **headers}, timeout=30
    )


def _json_span(trace_id: str, span_id: str, **attrs) -> dict:
    return {
        "traceId": trace_id,
        "spanId": span_id,
        "name": "tool",
        "startTimeUnixNano": str(2**62),
        "endTimeUnixNano": str(2**62 + 5_000_000),
        "status": {"code": "STATUS_CODE_ERROR", "message": "boom"},
        "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attrs.items()],
    }


def _request(*spans: dict, resource: dict | None = None) -> bytes:
    res = {"attributes": [{"key": k, "value": {"stringValue": v}} for k, v in (resource or {}).items()]}
    return json.dumps({"resourceSpans": [{"resource": res, "scopeSpans": [{"spans": list(spans)}]}]}).encode()


def test_failed_tool_spans_reward_the_calls_that_requested_them(proxy, upstream, sqlite_url):
    tracer, provider = _tracer(proxy)
    # 1. Protobuf from the real SDK: the agent's trace id travels in traceparent; the tool span names its call.
    with tracer.start_as_current_span("invoke_agent solver"):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        upstream.script(tool_calls=[{"name": "calculator", "arguments": '{"expression": "1/0"}'}])
        asked = chat(proxy, "s-pb", headers={**AUTH, **carrier}, tools=TOOLS).headers["x-call-id"]
        with tracer.start_as_current_span("execute_tool calculator") as span:
            span.set_attribute("gen_ai.operation.name", "execute_tool")
            span.set_attribute("gen_ai.tool.name", "calculator")
            span.set_attribute("gen_ai.tool.call.id", "chatcmpl-tool-0")
            span.set_status(Status(StatusCode.ERROR, "ZeroDivisionError"))
        with tracer.start_as_current_span("execute_tool search") as ok:  # a tool that worked: no reward
            ok.set_attribute("gen_ai.operation.name", "execute_tool")
        later = chat(proxy, "s-pb", headers={**AUTH, **carrier}).headers["x-call-id"]
    provider.shutdown()
    (reward,) = wait_rewards(sqlite_url, 1, source="tool_span_error", session_id="s-pb")
    assert reward["call_id"] == asked != later and reward["value"] == -0.2 and reward["final"] is False
    meta = reward["metadata"]
    assert meta["tool"] == "calculator" and meta["message"] == "ZeroDivisionError"
    assert meta["matched_by"] == "tool_call_id" and meta["duration_ms"] >= 0
    assert {c["trace_id"] for c in dbread.calls(sqlite_url, "s-pb")} == {meta["trace_id"]}

    # 2. OTLP JSON, gzip, OpenInference's TOOL kind, the session named on the resource, no tool call id:
    #    the newest call of the session that finished before the tool ran.
    #    Neither call asked for a tool in its answer (a ReAct agent parses text): time alone decides.
    first = chat(proxy, "s-json", headers=AUTH).headers["x-call-id"]
    chat(proxy, "s-json", headers=AUTH)  # after the tool, within a clock skew of it: not the one
    calls = dbread.wait_calls(sqlite_url, 2, "s-json")  # the writer stores calls in batches, a moment later
    tool_start = int(calls[0]["finished_at"].timestamp() * 1e9) + 1_000_000
    span = {**_json_span("ab" * 16, "cd" * 8, **{"openinference.span.kind": "TOOL", "tool.name": "search"})}
    span["startTimeUnixNano"] = str(tool_start)
    span["endTimeUnixNano"] = tool_start + 3_000_000
    r = _post(
        proxy,
        gzip.compress(_request(span, resource={"session.id": "s-json"})),
        "application/json",
        **{"content-encoding": "gzip"},
    )
    assert r.status_code == 200 and r.json() == {}, r.text
    (reward,) = wait_rewards(sqlite_url, 1, source="tool_span_error", session_id="s-json")
    assert reward["call_id"] == first and reward["metadata"]["matched_by"] == "time_order"
    assert reward["metadata"]["duration_ms"] == 3.0

    # The same span again (an exporter retry): stored once.
    _post(
        proxy,
        gzip.compress(_request(span, resource={"session.id": "s-json"})),
        "application/json",
        **{"content-encoding": "gzip"},
    )
    stats = get(proxy, "/stats", headers=AUTH).json()["otlp_ingest"]
    assert stats["tool_spans"] == 4 and stats["tool_errors"] == 3 and stats["linked"] == 3
    assert len([r for r in dbread.rewards(sqlite_url) if r["source"] == "tool_span_error"]) == 2


def test_hostile_otlp_gets_4xx_or_is_ignored_and_loses_nothing(proxy, upstream, sqlite_url):
    kept = chat(proxy, "s-keep", headers=AUTH).headers["x-call-id"]
    pb, js = "application/x-protobuf", "application/json"
    assert _post(proxy, b"\xff\xff\xff\x0fnot protobuf", pb).status_code == 400
    assert _post(proxy, b"{not json", js).status_code == 400
    assert _post(proxy, b"[1, 2]", js).status_code == 400
    assert _post(proxy, b"{}", "text/plain").status_code == 415
    assert _post(proxy, b"{}", js, **{"content-encoding": "br"}).status_code == 415
    assert _post(proxy, b"\x1f\x8b garbage", js, **{"content-encoding": "gzip"}).status_code == 400
    bomb = gzip.compress(b"{" + b" " * (17 * 1024 * 1024) + b"}")  # inflates past --max-request-bytes
    assert _post(proxy, bomb, js, **{"content-encoding": "gzip"}).status_code == 413
    assert httpx.post(f"{proxy.url}/v1/traces", content=b"{}", headers={"content-type": js}).status_code == 401
    # Unknown trace ids, sessions that do not exist, malformed ids, odd values: accepted, ignored or refused.
    odd = _json_span("ab" * 16, "01" * 8, **{"gen_ai.operation.name": "execute_tool"})
    odd["status"] = {"code": "NOT_A_CODE"}
    odd["startTimeUnixNano"] = "soon"
    r = _post(
        proxy,
        _request(
            _json_span("12" * 16, "34" * 8, **{"gen_ai.operation.name": "execute_tool"}),
            _json_span("56" * 16, "78" * 8, **{"gen_ai.operation.name": "execute_tool", "session.id": "nobody"}),
            _json_span("zz" * 16, "34" * 8, **{"gen_ai.operation.name": "execute_tool"}),
            _json_span("12" * 16, "00" * 8, **{"openinference.span.kind": "TOOL"}),
            odd,
            {"spanId": 7, "attributes": "no", "status": []},
        ),
        js,
    )
    assert r.status_code == 200 and r.json()["partialSuccess"]["rejectedSpans"] == "2", r.text
    # A huge batch: every span is read, at most 2,000 tool spans a request are kept, the rest refused.
    many = [_json_span("9a" * 16, f"{i + 1:016x}", **{"gen_ai.operation.name": "execute_tool"}) for i in range(2500)]
    r = _post(proxy, _request(*many), js)
    assert r.status_code == 200 and r.json()["partialSuccess"]["rejectedSpans"] == "500"
    stats = get(proxy, "/stats", headers=AUTH).json()
    assert stats["otlp_ingest"]["unlinked"] == {"unknown_session": 2002}
    assert stats["calls"]["total"] == 1 and [c["id"] for c in dbread.calls(sqlite_url)] == [kept]
    assert not dbread.rewards(sqlite_url)
    assert chat(proxy, "s-keep", headers=AUTH).status_code == 200  # and the proxy still serves

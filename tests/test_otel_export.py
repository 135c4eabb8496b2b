"""Every recorded call as a GenAI span at the team's collector (real proxy, the real OTLP exporter, a receiver
decoding its protobuf). The collector down: calls unaffected, spans dropped and counted."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.apihelpers import chat, get, post, start
from tests.support.otlp_receiver import OtlpReceiver

AGENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
AGENT_SPAN = "00f067aa0ba902b7"


def _is_call(span: dict, call_id: str) -> bool:
    return span["name"].startswith("chat") and span["attributes"].get("trainwire.call_id") == call_id


@pytest.fixture
def receiver():
    r = OtlpReceiver().start()
    yield r
    r.stop()


def test_calls_and_rewards_become_genai_spans(start_proxy, upstream, sqlite_url, tmp_path, receiver):
    proxy = start(start_proxy, upstream, sqlite_url, tmp_path, "--otlp-endpoint", receiver.url)
    traced = chat(
        proxy,
        "s-otel",
        headers={"traceparent": f"00-{AGENT_TRACE}-{AGENT_SPAN}-01", "X-Task-Id": "t1", "X-Agent-Name": "solver"},
        temperature=0.7,
        max_tokens=16,
    )
    assert traced.status_code == 200
    call_id = traced.headers["x-call-id"]
    untraced = [chat(proxy, "s-plain").headers["x-call-id"] for _ in range(2)]
    assert post(proxy, "/reward", {"session_id": "s-otel", "call_id": call_id, "reward": 0.5}).status_code == 200

    (span,) = receiver.wait(lambda s: _is_call(s, call_id))
    a = span["attributes"]
    assert span["name"] == "chat policy"
    assert (span["trace_id"], span["parent_span_id"]) == (AGENT_TRACE, AGENT_SPAN)  # a child of the agent's span
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "policy"
    assert a["gen_ai.response.model"] == "base-model" and a["gen_ai.provider.name"] == "vllm"
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ["stop"] and a["gen_ai.response.id"].startswith("chatcmpl")
    assert a["gen_ai.request.temperature"] == 0.7 and a["gen_ai.request.max_tokens"] == 16
    assert a["trainwire.session_id"] == "s-otel" and a["trainwire.task_id"] == "t1"
    assert a["trainwire.agent_name"] == "solver" and a["trainwire.policy_version"] == 0
    assert a["trainwire.trainable"] is True and a["trainwire.sampling.enforced"] == ["temperature"]
    assert "gen_ai.input.messages" not in a  # content only with --otlp-content
    assert span["resource"]["service.name"] == "trainwire"

    plain = [receiver.wait(lambda s, c=c: _is_call(s, c))[0] for c in untraced]
    assert plain[0]["trace_id"] == plain[1]["trace_id"] != AGENT_TRACE  # one trace per session without a traceparent
    assert plain[0]["parent_span_id"] == ""

    (reward,) = receiver.wait(lambda s: s["name"].startswith("trainwire.reward"))
    assert reward["trace_id"] == AGENT_TRACE and reward["parent_span_id"] == span["span_id"]
    assert reward["links"] == [(AGENT_TRACE, span["span_id"])]
    (event,) = reward["events"]
    assert event["name"] == "gen_ai.evaluation.result"
    assert event["attributes"]["gen_ai.evaluation.score.value"] == 0.5

    stats = get(proxy, "/stats").json()["otlp_export"]
    assert stats["exported"] >= 4 and stats["dropped"] == {}
    # Export is per process and rides no call: the trace id is kept with the call for the ingest.
    assert get(proxy, f"/calls/{call_id}").status_code == 200


def test_standard_env_and_content(start_proxy, upstream, sqlite_url, tmp_path, receiver):
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url + "/v1/traces",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-team-key=abc123",
    }
    proxy = start(start_proxy, upstream, sqlite_url, tmp_path, "--otlp-content", env=env)
    call_id = chat(proxy, "s-content", content="what is 2+2").headers["x-call-id"]
    (span,) = receiver.wait(lambda s: _is_call(s, call_id))
    assert json.loads(span["attributes"]["gen_ai.input.messages"]) == [{"role": "user", "content": "what is 2+2"}]
    assert json.loads(span["attributes"]["gen_ai.output.messages"])[0]["role"] == "assistant"
    assert receiver.headers_seen[0]["x-team-key"] == "abc123"


def test_collector_down_costs_no_call(start_proxy, upstream, sqlite_url, tmp_path):
    down = OtlpReceiver()
    url = down.url
    down.server.server_close()  # nothing listens there now
    proxy = start(start_proxy, upstream, sqlite_url, tmp_path, "--otlp-endpoint", url)
    for i in range(20):
        assert chat(proxy, f"s-down-{i}").status_code == 200
    deadline = time.monotonic() + 30
    stats = {}
    while time.monotonic() < deadline:
        stats = get(proxy, "/stats").json()["otlp_export"]
        if stats["dropped"].get("export_failed", 0) >= 20:
            break
        time.sleep(0.5)
    assert stats["dropped"]["export_failed"] >= 20 and stats["exported"] == 0, stats
    assert get(proxy, "/stats").json()["calls"]["total"] == 20
    assert 'trainwire_otlp_spans_dropped_total{reason="export_failed"}' in get(proxy, "/metrics").text

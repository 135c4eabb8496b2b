"""OpenTelemetry both ways, end to end: real vLLM (CPU build, the tiny random model), the real proxy on Postgres
exporting to a real Arize Phoenix, and a real instrumented agent (examples/otel_traced_agent.py: the openai SDK
under openinference-instrumentation-openai, tools under OpenInference's @tracer.tool, the real OTLP exporter)
sending its spans to trainwire and to Phoenix at once; then one real `trainwire train` step.

What it proves: the agent's tool spans arrive at /v1/traces and are linked to their sessions by the trace id the
proxy saw in `traceparent`; each failed tool gives the automatic reward to the call that asked for the tool (the
first of its episode, not the second); the trainer's samples carry that reward and it trains a step on them; in
Phoenix, every recorded call is a span with the GenAI conventions' attribute names, the child of the agent's own
span in the agent's trace, and every reward a span under its call's."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import dbread, one_step
from tests.support.apihelpers import wait_rewards
from tests.support.phoenix import Phoenix, require_phoenix
from tests.support.vllm_support import require_vllm_venv, serve, tiny_model

pytestmark = pytest.mark.vllm

require_vllm_venv()

ROOT = Path(__file__).resolve().parents[1]
EPISODES = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory, "otel-e2e")


@pytest.fixture(scope="module")
def vllm(model_dir, tmp_path_factory):
    proc = serve(model_dir, tmp_path_factory, "otel-e2e", "tiny")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def phoenix(tmp_path):
    require_phoenix()
    p = Phoenix(tmp_path / "phoenix")
    try:
        yield p.wait_ready()
    finally:
        p.stop()


def _wait(fn, timeout: float = 60.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_tool_spans_become_rewards_and_calls_become_spans_in_phoenix(
    start_proxy, vllm, model_dir, pg_url, tmp_path, phoenix
):
    proxy = start_proxy(
        "--upstream",
        vllm.url,
        "--database-url",
        pg_url,
        "--journal-dir",
        str(tmp_path / "journal"),
        "--otlp-endpoint",
        phoenix.url,
        "--air-truncated",
        "off",  # the tiny model's 8-token turns are all cut off: keep this test's rewards the tool's alone
    )
    proxy.db_url = pg_url
    agent = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/otel_traced_agent.py"),
            "--proxy",
            proxy.url,
            "--collector",
            phoenix.url,
            "--episodes",
            str(EPISODES),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert agent.returncode == 0, agent.stderr[-4000:]
    episodes = [json.loads(line) for line in agent.stdout.splitlines()]
    # The calculator parses the random model's text as a JSON object: it fails; the clock cannot.
    assert [e["tool_ok"] for e in episodes] == [False, True] * (EPISODES // 2)

    # Ingest: every tool span arrived; each failed one rewards the first call of its episode.
    stats = httpx.get(f"{proxy.url}/stats", timeout=30).json()["otlp_ingest"]
    assert (stats["tool_spans"], stats["tool_errors"], stats["linked"]) == (EPISODES, EPISODES // 2, EPISODES // 2)
    failed = [e for e in episodes if not e["tool_ok"]]
    rewards = wait_rewards(pg_url, len(failed), source="tool_span_error")
    for e in failed:
        calls = dbread.calls(pg_url, e["session"])
        assert [c["seq"] for c in calls] == [0, 1]
        assert {c["trace_id"] for c in calls} == {e["trace_id"]}  # the agent's trace, from traceparent
        (r,) = [r for r in rewards if r["session_id"] == e["session"]]
        assert r["call_id"] == calls[0]["id"] and r["value"] == -0.2
        assert r["metadata"]["tool"] == "calculator" and r["metadata"]["matched_by"] == "time_order"
        assert "JSONDecodeError" in r["metadata"]["message"]
    assert {r["session_id"] for r in rewards} == {e["session"] for e in failed}

    # Export: in Phoenix, each recorded call is a GenAI span, a child of the agent's span in the agent's trace.
    ids = {c["id"]: c for e in episodes for c in dbread.calls(pg_url, e["session"])}

    def ours():
        spans = phoenix.spans()
        calls = [s for s in spans if s["attributes"].get("trainwire.call_id") in ids and s["name"] == "chat policy"]
        rewarded = [s for s in spans if s["name"] == "trainwire.reward tool_span_error"]
        return (spans, calls, rewarded) if len(calls) == len(ids) and len(rewarded) == len(failed) else None

    spans, call_spans, reward_spans = _wait(ours, what="trainwire's spans in Phoenix")
    by_id = {s["context"]["span_id"]: s for s in spans}
    for s in call_spans:
        a = s["attributes"]
        call = ids[a["trainwire.call_id"]]
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "policy"
        assert a["gen_ai.response.model"] == "tiny" and a["gen_ai.provider.name"] == "vllm"
        assert a["gen_ai.usage.input_tokens"] == len(call["prompt_token_ids"])
        assert a["gen_ai.usage.output_tokens"] == len(call["completion_token_ids"])
        assert a["gen_ai.response.finish_reasons"] == [call["finish_reason"]]
        assert a["trainwire.session_id"] == call["session_id"] and a["trainwire.policy_version"] == 0
        assert s["context"]["trace_id"] == call["trace_id"]
        parent = by_id[s["parent_id"]]  # the agent's own span (its LLM span) that sent the request
        assert parent["context"]["trace_id"] == call["trace_id"] and parent["span_kind"] == "LLM"
        root = parent
        while root.get("parent_id"):
            root = by_id[root["parent_id"]]
        assert root["name"] == "invoke_agent solver"
    for s in reward_spans:
        parent = by_id[s["parent_id"]]
        assert parent["name"] == "chat policy"
        assert parent["attributes"]["trainwire.call_id"] == s["attributes"]["trainwire.call_id"]
        assert s["events"][0]["name"] == "gen_ai.evaluation.result"

    # Training: the claimed sessions carry the tool's reward on the right call, and a step trains on them.
    batch, built = asyncio.run(one_step.claim_and_build(pg_url))
    assert len(batch) == EPISODES
    for sess in batch:
        want = -0.2 if sess.id in {e["session"] for e in failed} else 0.0
        assert [c.reward for c in sess.calls][0] == want, sess.id
        assert sess.calls[1].reward == 0.0
    out = one_step.run_trainer(proxy, vllm, model_dir, tmp_path, batch_size=EPISODES)
    assert f"step 1 -> v1 | sessions {EPISODES} samples {2 * EPISODES}" in out, out[-3000:]

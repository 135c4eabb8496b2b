"""Anthropic's Messages API (`POST /v1/messages`) end to end: real vLLM (CPU build, the tiny random model), the real
proxy (`trainwire serve` subprocess) on real Postgres, the real `anthropic` SDK, and one real `trainwire train` step.

What it proves: the SDK, given only trainwire's URL as its base URL (it appends /v1/messages; the /tw/ form says
session, task and agent), gets Messages answers and streams; a system prompt, a tool and tool_use/tool_result
history reach vLLM as the chat request whose rendering is exactly the recorded prompt token ids; every call is
recorded in order with kind "messages", the client's answer, token ids and logprobs of equal length; the key is
checked from `x-api-key` and refusals come in Anthropic's error shape; the trainer's samples are the recorded ids.

The model has random weights, so answers are bounded by `max_tokens` (stop_reason "max_tokens" is then correct) and
tool turns are fed as history, not generated.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import dbread, one_step
from tests.support.vllm_support import require_vllm_venv, serve, tiny_model
from trainwire.store.models import PolicyVersion, Session, TrainStep

pytestmark = pytest.mark.vllm

require_vllm_venv()

SYSTEM = "You are a calculator. Use the calculator tool."
TOOL = {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression",
    "input_schema": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}
HISTORY = [
    {"role": "user", "content": "Compute 2+3."},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "tool_use", "id": "toolu_1", "name": "calculator", "input": {"expression": "2+3"}},
        ],
    },
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "5"}]},
]
# The same conversation as chat messages: what vLLM must have rendered for the recorded prompt.
HISTORY_AS_CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Compute 2+3."},
    {
        "role": "assistant",
        "content": "Let me compute.",
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "toolu_1", "content": "5"},
]
CHAT_TOOLS = [
    {
        "type": "function",
        "function": {"name": TOOL["name"], "description": TOOL["description"], "parameters": TOOL["input_schema"]},
    }
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory, "messages-e2e")


@pytest.fixture(scope="module")
def vllm(model_dir, tmp_path_factory):
    proc = serve(model_dir, tmp_path_factory, "messages-e2e", "tiny")
    try:
        yield proc
    finally:
        proc.stop()


def _start(start_proxy, vllm, pg_url, tmp_path, *extra: str):
    p = start_proxy(
        "--upstream", vllm.url, "--database-url", pg_url, "--journal-dir", str(tmp_path / "journal"), *extra
    )
    p.db_url = pg_url
    return p


@pytest.fixture
def proxy(start_proxy, vllm, pg_url, tmp_path):
    return _start(start_proxy, vllm, pg_url, tmp_path)


def anthropic_client(base_url: str, api_key: str = "unused", **headers: str):
    import anthropic

    return anthropic.Anthropic(
        base_url=base_url, api_key=api_key, max_retries=0, timeout=120, default_headers=headers or None
    )


def tokenize_chat(vllm, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    body = {"model": "tiny", "messages": messages, "add_generation_prompt": True}
    if tools:
        body["tools"] = tools
    r = httpx.post(f"{vllm.url}/tokenize", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def detokenize(vllm, ids: list[int]) -> str:
    r = httpx.post(f"{vllm.url}/detokenize", json={"model": "tiny", "tokens": ids}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["prompt"]


def _rows(db_url: str, session: str, n: int) -> list[dict]:
    rows = dbread.wait_calls(db_url, n, session)
    assert len(rows) == n, rows
    return sorted(rows, key=lambda r: r["seq"])


def assert_trainable_record(row: dict, *, session: str, task: str | None, agent: str | None, seq: int) -> None:
    assert (row["session_id"], row["task_id"], row["agent_name"], row["seq"]) == (session, task, agent, seq)
    assert (row["kind"], row["path"], row["route"], row["status_code"]) == ("messages", "/v1/messages", "policy", 200)
    assert row["trainable"] is True and row["untrainable_reason"] is None and row["aborted"] is False
    assert row["model_requested"] == "policy" and row["model_served"] == "tiny" and row["policy_version"] == 0
    assert row["prompt_token_ids"] and row["completion_token_ids"]
    assert len(row["logprobs"]) == len(row["completion_token_ids"])
    assert all(-60 < lp <= 0 for lp in row["logprobs"])
    assert row["sampling"]["effective"]["temperature"] == 1.0 and row["sampling"]["requested"] == {}
    usage = row["response"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (
        len(row["prompt_token_ids"]),
        len(row["completion_token_ids"]),
    )
    stop = {"length": "max_tokens", "stop": "end_turn", "tool_calls": "tool_use"}[row["finish_reason"]]
    assert row["response"]["stop_reason"] == stop


# ------------------------------------------------------------------------------------------------------- tests


def test_create_with_system_tool_and_tool_history(proxy, vllm):
    """`messages.create` twice in one session (headers say session, task and agent): a plain question, then the
    text + tool_use / tool_result history, whose recorded prompt is vLLM's chat rendering of it."""
    sdk = anthropic_client(proxy.url, **{"X-Session-Id": "msg-create", "X-Task-Id": "calc-5", "X-Agent-Name": "solver"})
    first = sdk.messages.with_raw_response.create(
        model="policy",
        max_tokens=8,
        system=SYSTEM,
        tools=[TOOL],
        messages=[{"role": "user", "content": "Compute 2+3."}],
    )
    second = sdk.messages.with_raw_response.create(
        model="policy", max_tokens=8, system=SYSTEM, tools=[TOOL], messages=HISTORY
    )
    rows = _rows(proxy.db_url, "msg-create", 2)
    for seq, (raw, row) in enumerate(zip((first, second), rows)):
        message = raw.parse()
        assert raw.headers["x-session-id"] == "msg-create" and raw.headers["x-call-id"] == row["id"]
        assert message.type == "message" and message.role == "assistant" and message.model == "policy"
        assert message.usage.input_tokens == len(row["prompt_token_ids"])
        assert message.usage.output_tokens == len(row["completion_token_ids"])
        assert_trainable_record(row, session="msg-create", task="calc-5", agent="solver", seq=seq)
        assert row["response"] == raw.http_response.json()  # the record is the client's answer
        assert message.stop_reason == row["response"]["stop_reason"]
        assert row["request"]["system"] == SYSTEM and row["request"]["max_tokens"] == 8
    assert rows[1]["request"]["messages"] == HISTORY
    assert rows[0]["prompt_token_ids"] == tokenize_chat(
        vllm, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Compute 2+3."}], CHAT_TOOLS
    )
    assert rows[1]["prompt_token_ids"] == tokenize_chat(vllm, HISTORY_AS_CHAT, CHAT_TOOLS)
    prompt = detokenize(vllm, rows[1]["prompt_token_ids"])
    assert prompt.startswith(f"<|bos|><|im_start|>system\n{SYSTEM}\nYou can call these tools:")
    assert (
        '<|im_start|>assistant\nLet me compute.<tool_call>{"name": "calculator", "arguments": {"expression": '
        '"2+3"}}</tool_call><|eos|><|im_end|>'
    ) in prompt
    assert prompt.endswith("<|im_start|>tool toolu_1\n5<|im_end|>\n<|im_start|>assistant\n")


def test_stream_through_the_tw_base_url(proxy, vllm):
    """`messages.stream` with the SDK's base URL set to /tw/session=.../task=.../agent=... (no /v1: the SDK adds it)."""
    sdk = anthropic_client(f"{proxy.url}/tw/session=msg-stream/agent=streamer/task=group%2F7")
    with sdk.messages.stream(model="policy", max_tokens=12, system=SYSTEM, tools=[TOOL], messages=HISTORY) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_message()
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    (row,) = _rows(proxy.db_url, "msg-stream", 1)
    assert (row["session_id"], row["task_id"], row["agent_name"]) == ("msg-stream", "group/7", "streamer")
    assert row["stream"] is True and row["kind"] == "messages" and row["status_code"] == 200
    assert row["aborted"] is False and row["untrainable_reason"] is None
    assert len(row["logprobs"]) == len(row["completion_token_ids"]) > 0
    assert row["prompt_token_ids"] == tokenize_chat(vllm, HISTORY_AS_CHAT, CHAT_TOOLS)
    # What the client assembled from the events is what was recorded.
    assert [b.model_dump(exclude_none=True) for b in final.content] == [
        {k: v for k, v in b.items() if v is not None} for b in row["response"]["content"]
    ]
    assert final.stop_reason == row["response"]["stop_reason"]


def test_fields_claude_code_sends_are_accepted(proxy, vllm):
    """The beta client with `betas` (sent as the anthropic-beta header), metadata, thinking disabled and
    cache_control on system, tool and message blocks, streamed, as Claude Code sends them: 200, the ignored ones
    named, and the call recorded trainable with the same prompt as without them."""
    sdk = anthropic_client(proxy.url, **{"X-Session-Id": "msg-claude-code"})
    cached = {"type": "ephemeral"}
    history = [
        *HISTORY[:-1],
        {"role": "user", "content": [{**HISTORY[-1]["content"][0], "cache_control": cached}]},
    ]
    with sdk.beta.messages.with_streaming_response.create(
        model="policy",
        max_tokens=12,
        system=[{"type": "text", "text": SYSTEM, "cache_control": cached}],
        tools=[{**TOOL, "cache_control": cached}],
        messages=history,
        metadata={"user_id": "user_1_account_2_session_3"},
        thinking={"type": "disabled"},
        betas=["claude-code-20250219", "interleaved-thinking-2025-05-14"],
        stream=True,
    ) as raw:
        assert raw.status_code == 200
        ignored = raw.headers["x-trainwire-ignored"]
        events = [line for line in raw.iter_lines() if line.startswith("event:")]
    # Disabled thinking asks for nothing; cache_control inside blocks is part of the translated messages.
    assert ignored == "metadata,anthropic-beta"
    assert events[0] == "event: message_start" and events[-1] == "event: message_stop"
    (row,) = _rows(proxy.db_url, "msg-claude-code", 1)
    assert row["trainable"] is True and row["untrainable_reason"] is None and row["status_code"] == 200
    assert row["sampling"]["ignored"] == ["metadata", "anthropic-beta"]
    assert row["request"]["metadata"] == {"user_id": "user_1_account_2_session_3"}
    assert row["prompt_token_ids"] == tokenize_chat(vllm, HISTORY_AS_CHAT, CHAT_TOOLS)


def test_api_key_from_x_api_key_and_anthropic_error_shapes(start_proxy, vllm, pg_url, tmp_path):
    import anthropic

    proxy = _start(start_proxy, vllm, pg_url, tmp_path, "--api-key", "K-secret")
    ok = anthropic_client(proxy.url, api_key="K-secret", **{"X-Session-Id": "msg-auth"})
    assert ok.messages.create(model="policy", max_tokens=4, messages=[{"role": "user", "content": "hi"}]).content

    with pytest.raises(anthropic.AuthenticationError) as refused:
        anthropic_client(proxy.url, api_key="wrong", **{"X-Session-Id": "msg-auth"}).messages.create(
            model="policy", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.status_code == 401
    assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "authentication_error"

    body = {"model": "policy", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Bearer wrong"}):
        r = httpx.post(
            f"{proxy.url}/v1/messages", json=body, headers={"X-Session-Id": "msg-auth", **headers}, timeout=30
        )
        assert r.status_code == 401, r.text
        err = r.json()
        assert set(err) == {"type", "error"} and err["type"] == "error"
        assert set(err["error"]) == {"type", "message"} and err["error"]["type"] == "authentication_error"
        assert "K-secret" not in r.text
    # Behind a /tw/ base URL the key is checked the same way.
    r = httpx.post(f"{proxy.url}/tw/session=msg-auth/v1/messages", json=body, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"

    # A request the SDK would refuse to send (no max_tokens): a 400 in Anthropic's shape, naming the field.
    r = httpx.post(
        f"{proxy.url}/v1/messages",
        headers={"x-api-key": "K-secret", "X-Session-Id": "msg-auth"},
        json={"model": "policy", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    err = r.json()
    assert set(err) == {"type", "error"} and err["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in err["error"]["message"]
    r = httpx.post(
        f"{proxy.url}/v1/messages",
        headers={"x-api-key": "K-secret", "X-Session-Id": "msg-auth"},
        json={"model": "policy", "max_tokens": 4, "messages": []},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "messages" in r.json()["error"]["message"]

    # Only the call that was let in reached vLLM and the store.
    time.sleep(0.5)
    (row,) = _rows(proxy.db_url, "msg-auth", 1)
    assert row["status_code"] == 200 and row["kind"] == "messages"


# ------------------------------------------------------------------------------------------------ training


def test_one_training_step_on_a_messages_session(proxy, vllm, model_dir, tmp_path):
    session = f"msg-train-{uuid.uuid4().hex[:8]}"
    sdk = anthropic_client(proxy.url, **{"X-Session-Id": session, "X-Task-Id": "calc-5"})
    sdk.messages.create(
        model="policy",
        max_tokens=8,
        system=SYSTEM,
        tools=[TOOL],
        messages=[{"role": "user", "content": "Compute 2+3."}],
    )
    with sdk.messages.stream(model="policy", max_tokens=8, system=SYSTEM, tools=[TOOL], messages=HISTORY) as stream:
        stream.until_done()
    r = httpx.post(f"{proxy.url}/reward", json={"session_id": session, "reward": 1.0}, timeout=30)
    assert r.status_code == 200, r.text
    rows = _rows(proxy.db_url, session, 2)

    batch, built = asyncio.run(one_step.claim_and_build(proxy.db_url))
    assert [s.id for s in batch] == [session] and batch[0].final_reward == 1.0
    assert built.call_ids == [(rows[0]["id"],), (rows[1]["id"],)]
    for sample, row in zip(built.samples, rows):
        assert sample.prompt_ids == row["prompt_token_ids"]
        assert sample.response_ids == row["completion_token_ids"]
        assert sample.response_mask == [1] * len(row["completion_token_ids"])
        assert sample.old_logprobs == pytest.approx(row["logprobs"], abs=1e-6)

    out = one_step.run_trainer(proxy, vllm, model_dir, tmp_path, batch_size=1)
    assert "step 1 -> v1 | sessions 1 samples 2" in out, out[-3000:]
    (sess,) = [s for s in dbread.rows(proxy.db_url, Session.__table__) if s["id"] == session]
    assert (sess["status"], sess["train_step"]) == ("trained", 1)
    (step,) = dbread.rows(proxy.db_url, TrainStep.__table__)
    assert (step["step"], step["n_sessions"], step["n_samples"]) == (1, 1, 2)
    assert step["metrics"]["batch/tokens"] == sum(len(r["completion_token_ids"]) for r in rows)
    (pv,) = dbread.rows(proxy.db_url, PolicyVersion.__table__)
    assert (pv["version"], pv["status"], pv["train_step"]) == (1, "published", 1)

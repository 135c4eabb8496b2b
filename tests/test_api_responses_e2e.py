"""The OpenAI Responses API (`POST /v1/responses`) end to end: real vLLM (CPU build, the tiny random model), the real
proxy (`trainwire serve` subprocess) on real Postgres, the real openai SDK and the OpenAI Agents SDK in its default
mode (which speaks the Responses API), and one real `trainwire train` step on what was recorded.

What it proves: a Responses request with instructions, a function tool and function_call/function_call_output
history reaches vLLM as the chat request whose rendering is exactly the recorded prompt token ids; every call is
recorded in order with kind "responses", the client-shaped answer, token ids and logprobs of equal length; the
session, task and agent come from the headers or the /tw/ base URL; the trainer builds its samples from exactly
those recorded ids and trains one step on them.

The tiny model has random weights: it rarely stops on its own and never calls tools reliably (vLLM's forced tool
choice is not schema-strict on this build). So text turns are bounded with `max_output_tokens` (status
"incomplete" is then a correct answer), the Agents SDK (which refuses incomplete responses) gets `stop_token_ids`
that end its turn within a few tokens, and tool turns are fed as input history, not generated.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import dbread, one_step
from tests.support.vllm_support import require_vllm_venv, serve, tiny_model
from trainwire.store.models import PolicyVersion, Session, TrainStep

pytestmark = pytest.mark.vllm

require_vllm_venv()

EOS_ID = 2
CALCULATOR = {
    "type": "function",
    "name": "calculator",
    "description": "Evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}
INSTRUCTIONS = "You are a calculator. Use the calculator tool."
HISTORY = [
    {"role": "user", "content": "Compute 2+3."},
    {"type": "function_call", "call_id": "call_1", "name": "calculator", "arguments": '{"expression": "2+3"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "5"},
    {"role": "user", "content": "Now say the result."},
]
# The same conversation as chat messages: what vLLM must have rendered for the recorded prompt.
HISTORY_AS_CHAT = [
    {"role": "system", "content": INSTRUCTIONS},
    {"role": "user", "content": "Compute 2+3."},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    {"role": "user", "content": "Now say the result."},
]
CHAT_TOOLS = [{"type": "function", "function": {k: CALCULATOR[k] for k in ("name", "description", "parameters")}}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory, "responses-e2e")


@pytest.fixture(scope="module")
def vllm(model_dir, tmp_path_factory):
    proc = serve(model_dir, tmp_path_factory, "responses-e2e", "tiny")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def stop_ids(model_dir) -> list[int]:
    """Token ids that contain a space or newline (a quarter of the vocabulary), and EOS: as stop_token_ids they end
    a free-text turn of the random model within a few tokens (vLLM allows only 4 stop strings)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = [i for i in range(5, tok.get_vocab_size()) if any(c in tok.decode([i]) for c in " \n")]
    assert len(ids) > 100
    return [EOS_ID, *ids]


@pytest.fixture
def proxy(start_proxy, vllm, pg_url, tmp_path):
    p = start_proxy("--upstream", vllm.url, "--database-url", pg_url, "--journal-dir", str(tmp_path / "journal"))
    p.db_url = pg_url
    return p


def client(base_url: str, **headers: str):
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120, default_headers=headers or None)


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


def assert_trainable_record(row: dict, *, session: str, task: str | None, agent: str | None, seq: int) -> None:
    assert (row["session_id"], row["task_id"], row["agent_name"], row["seq"]) == (session, task, agent, seq)
    assert (row["kind"], row["path"], row["route"], row["status_code"]) == ("responses", "/v1/responses", "policy", 200)
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


def _rows(db_url: str, session: str, n: int) -> list[dict]:
    rows = dbread.wait_calls(db_url, n, session)
    assert len(rows) == n, rows
    return sorted(rows, key=lambda r: r["seq"])


# ------------------------------------------------------------------------------------------------------- tests


def test_create_with_instructions_tool_and_tool_history(proxy, vllm):
    """Non-stream `responses.create`; headers say session, task and agent. Two calls: a plain question, then the
    function_call / function_call_output history, whose recorded prompt is vLLM's chat rendering of it."""
    sdk = client(proxy.v1, **{"X-Session-Id": "resp-create", "X-Task-Id": "calc-5", "X-Agent-Name": "solver"})
    first = sdk.responses.with_raw_response.create(
        model="policy", instructions=INSTRUCTIONS, input="Compute 2+3.", tools=[CALCULATOR], max_output_tokens=8
    )
    second = sdk.responses.with_raw_response.create(
        model="policy", instructions=INSTRUCTIONS, input=HISTORY, tools=[CALCULATOR], max_output_tokens=8
    )
    rows = _rows(proxy.db_url, "resp-create", 2)
    for seq, (raw, row) in enumerate(zip((first, second), rows)):
        resp = raw.parse()
        assert raw.headers["x-session-id"] == "resp-create" and raw.headers["x-call-id"] == row["id"]
        assert "x-trainwire-sampling" not in raw.headers  # nothing enforced: the client set no sampling
        assert resp.object == "response" and resp.id == "resp_" + row["id"].removeprefix("call_")
        assert resp.model == "policy" and resp.status in ("completed", "incomplete")
        assert resp.status == ("incomplete" if row["finish_reason"] == "length" else "completed")
        assert [t.name for t in resp.tools] == ["calculator"] and resp.instructions == INSTRUCTIONS
        assert_trainable_record(row, session="resp-create", task="calc-5", agent="solver", seq=seq)
        # The record holds what the client sent and what it got, in its API's shapes.
        assert row["response"] == raw.http_response.json()
        assert row["response"]["output"] == [o.model_dump(mode="json", exclude_unset=True) for o in resp.output]
        assert row["request"]["max_output_tokens"] == 8 and row["request"]["instructions"] == INSTRUCTIONS

    assert rows[0]["request"]["input"] == "Compute 2+3." and rows[1]["request"]["input"] == HISTORY
    # The recorded prompt is exactly what vLLM's chat template renders for the translated conversation ...
    assert rows[1]["prompt_token_ids"] == tokenize_chat(vllm, HISTORY_AS_CHAT, CHAT_TOOLS)
    assert rows[0]["prompt_token_ids"] == tokenize_chat(
        vllm, [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": "Compute 2+3."}], CHAT_TOOLS
    )
    # ... with the tool turns in it, as the model would have produced them.
    prompt = detokenize(vllm, rows[1]["prompt_token_ids"])
    assert prompt.startswith(f"<|bos|><|im_start|>system\n{INSTRUCTIONS}\nYou can call these tools:")
    assert '<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call><|eos|>' in prompt
    assert prompt.endswith(
        "<|im_start|>tool call_1\n5<|im_end|>\n<|im_start|>user\nNow say the result.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_stream_through_the_tw_base_url(proxy, vllm):
    """`responses.stream` on a /tw/session=.../task=.../agent=.../v1 base URL (with a '/' in the task id)."""
    base = f"{proxy.url}/tw/agent=streamer/session=resp-stream/task=group%2F7/v1"
    sdk = client(base)
    with sdk.responses.stream(
        model="policy", instructions=INSTRUCTIONS, input=HISTORY, tools=[CALCULATOR], max_output_tokens=12
    ) as stream:
        events = list(stream)
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    text = "".join(c.text for item in final.output if item.type == "message" for c in item.content)
    assert deltas == text

    (row,) = _rows(proxy.db_url, "resp-stream", 1)
    assert row["stream"] is True and row["id"] == "call_" + final.id.removeprefix("resp_")
    assert (row["session_id"], row["task_id"], row["agent_name"]) == ("resp-stream", "group/7", "streamer")
    assert row["kind"] == "responses" and row["status_code"] == 200 and row["aborted"] is False
    assert row["untrainable_reason"] is None and row["trainable"] is True
    assert len(row["logprobs"]) == len(row["completion_token_ids"]) > 0
    assert row["prompt_token_ids"] == tokenize_chat(vllm, HISTORY_AS_CHAT, CHAT_TOOLS)
    assert row["response"]["output"] == [o.model_dump(mode="json", exclude_unset=True) for o in final.output]
    assert row["response"]["status"] == final.status
    assert final.status == ("incomplete" if row["finish_reason"] == "length" else "completed")


def test_agents_sdk_default_mode(proxy, vllm, stop_ids):
    """The Agents SDK's default model is the Responses API: only the client's base URL points at trainwire (the
    /tw/ form says session, task and agent). Two runs in one session, the second continuing the first's items."""
    from agents import Agent, ModelSettings, Runner, function_tool, set_default_openai_client, set_tracing_disabled
    from openai import AsyncOpenAI

    @function_tool
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression."""
        return "5"

    async def run() -> tuple:
        sdk = AsyncOpenAI(
            base_url=f"{proxy.url}/tw/session=agents-1/task=calc-5/agent=solver/v1",
            api_key="unused",
            max_retries=0,
            timeout=120,
        )
        set_default_openai_client(sdk)
        set_tracing_disabled(True)
        agent = Agent(
            name="solver",
            instructions=INSTRUCTIONS,
            tools=[calculator],
            model="policy",
            model_settings=ModelSettings(max_tokens=48, extra_body={"stop_token_ids": stop_ids}),
        )
        try:
            first = await Runner.run(agent, HISTORY, max_turns=2)
            follow_up = first.to_input_list() + [{"role": "user", "content": "Thanks."}]
            second = await Runner.run(agent, follow_up, max_turns=2)
        finally:
            await sdk.close()
        return first, second, follow_up

    first, second, follow_up = asyncio.run(run())
    tool = calculator
    rows = _rows(proxy.db_url, "agents-1", 2)
    for seq, row in enumerate(rows):
        assert_trainable_record(row, session="agents-1", task="calc-5", agent="solver", seq=seq)
        assert row["finish_reason"] == "stop" and row["response"]["status"] == "completed"
        assert row["request"]["instructions"] == INSTRUCTIONS
        assert [t["name"] for t in row["request"]["tools"]] == ["calculator"]
    # What the SDK sent is the conversation; the second run sent back the first run's output items verbatim.
    assert rows[0]["request"]["input"] == HISTORY
    assert rows[1]["request"]["input"][: len(HISTORY)] == HISTORY
    assert rows[1]["request"]["input"][len(HISTORY) : -1] == rows[0]["response"]["output"]
    assert rows[1]["request"]["input"][-1] == {"role": "user", "content": "Thanks."}
    assert first.final_output == "".join(
        c["text"] for item in rows[0]["response"]["output"] if item["type"] == "message" for c in item["content"]
    )
    # The SDK describes the tool its own way (its docstring, a strict schema); rendered with that (taken from the
    # SDK: Postgres' jsonb does not keep the recorded request's key order), the prompt is the chat template's. The
    # SDK marks its tools strict, which vLLM would decode under a grammar: the proxy served it without strict.
    assert tool.strict_json_schema is True
    assert all(r["sampling"]["enforced"] == ["tools.strict"] for r in rows)
    sdk_tool = {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": tool.params_json_schema},
    }
    assert rows[0]["prompt_token_ids"] == tokenize_chat(vllm, HISTORY_AS_CHAT, [sdk_tool])
    assert len(rows[1]["prompt_token_ids"]) > len(rows[0]["prompt_token_ids"])


def test_forced_tool_choice_is_answered_and_marked_untrainable(proxy):
    """tool_choice "required" is decoded by vLLM under a grammar: the distribution is not the policy's, so the
    call is served but marked untrainable, with the reason."""
    sdk = client(proxy.v1, **{"X-Session-Id": "resp-forced"})
    raw = sdk.responses.with_raw_response.create(
        model="policy", input="Compute 2+3.", tools=[CALCULATOR], tool_choice="required", max_output_tokens=16
    )
    assert raw.status_code == 200
    (row,) = _rows(proxy.db_url, "resp-forced", 1)
    assert row["trainable"] is True and row["status_code"] == 200
    assert row["untrainable_reason"] and "tool_choice" in row["untrainable_reason"]
    assert row["request"]["tool_choice"] == "required"


def codex_request(stop_ids: list[int]) -> dict:
    """What Codex CLI sends on every turn (issue 19), with the tool-call history of a finished shell call."""
    return {
        "model": "policy",
        "instructions": INSTRUCTIONS,
        "input": HISTORY,
        "tools": [CALCULATOR],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": str(uuid.uuid4()),
        "client_metadata": '{"originator": "codex_exec", "terminal": "' + "x" * 960 + '"}',
        "max_output_tokens": 24,
        "stop_token_ids": stop_ids,
    }


def test_a_codex_shaped_request_is_served_and_recorded_trainable(proxy, vllm, stop_ids):
    """Codex CLI's request (client_metadata, prompt_cache_key, store: false, reasoning summary, include encrypted
    reasoning, streamed, with tools) through the openai SDK: 200, the fields that change nothing named in
    X-Trainwire-Ignored, no reasoning items, and a trainable record that keeps the request as sent."""
    body = codex_request(stop_ids)
    known = {k: v for k, v in body.items() if k not in ("client_metadata", "stop_token_ids", "stream")}
    sdk = client(proxy.v1, **{"X-Session-Id": "codex-1"})
    with sdk.responses.with_streaming_response.create(
        **known, stream=True, extra_body={"client_metadata": body["client_metadata"], "stop_token_ids": stop_ids}
    ) as raw:
        assert raw.status_code == 200
        ignored = raw.headers["x-trainwire-ignored"]
        events = list(raw.parse())
    named = {"reasoning", "include", "prompt_cache_key", "client_metadata"}  # store: false is what happens anyway
    assert set(ignored.split(",")) == named
    final = events[-1].response
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert all(item.type != "reasoning" for item in final.output)

    (row,) = _rows(proxy.db_url, "codex-1", 1)
    assert_trainable_record(row, session="codex-1", task=None, agent=None, seq=0)
    assert row["sampling"]["ignored"] == ignored.split(",")
    assert row["request"]["client_metadata"] == body["client_metadata"] and row["request"]["store"] is False
    assert row["prompt_token_ids"] == tokenize_chat(vllm, HISTORY_AS_CHAT, CHAT_TOOLS)


def test_unknown_fields_refuse_keeps_the_strict_behaviour(start_proxy, vllm, pg_url, tmp_path):
    p = start_proxy(
        "--upstream",
        vllm.url,
        "--database-url",
        pg_url,
        "--journal-dir",
        str(tmp_path / "j"),
        "--unknown-fields",
        "refuse",
    )
    r = httpx.post(f"{p.v1}/responses", json={"model": "policy", "input": "hi", "client_metadata": "x"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "client_metadata" and "--unknown-fields refuse" in r.text
    # Known fields that change nothing stay accepted.
    r = httpx.post(
        f"{p.v1}/responses",
        json={"model": "policy", "input": "hi", "store": True, "max_output_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["x-trainwire-ignored"] == "store"


# ------------------------------------------------------------------------------------------------ training


def post_final_reward(proxy, session: str, value: float) -> None:
    r = httpx.post(f"{proxy.url}/reward", json={"session_id": session, "reward": value}, timeout=30)
    assert r.status_code == 200, r.text


def test_one_training_step_on_a_responses_session(proxy, vllm, model_dir, tmp_path):
    session = f"resp-train-{uuid.uuid4().hex[:8]}"
    sdk = client(proxy.v1, **{"X-Session-Id": session, "X-Task-Id": "calc-5"})
    sdk.responses.create(
        model="policy", instructions=INSTRUCTIONS, input="Compute 2+3.", tools=[CALCULATOR], max_output_tokens=8
    )
    with sdk.responses.stream(
        model="policy", instructions=INSTRUCTIONS, input=HISTORY, tools=[CALCULATOR], max_output_tokens=8
    ) as stream:
        list(stream)
    post_final_reward(proxy, session, 1.0)
    rows = _rows(proxy.db_url, session, 2)

    batch, built = asyncio.run(one_step.claim_and_build(proxy.db_url))
    assert [s.id for s in batch] == [session] and batch[0].final_reward == 1.0
    assert built.call_ids == [(rows[0]["id"],), (rows[1]["id"],)]  # transition mode: one sample per call, in order
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
    assert step["metrics"]["batch/skipped_no_tokens"] == 0 and step["metrics"]["batch/skipped_bad_logprobs"] == 0
    (pv,) = dbread.rows(proxy.db_url, PolicyVersion.__table__)
    assert (pv["version"], pv["status"], pv["train_step"]) == (1, "published", 1)


def test_untrainable_call_is_left_out_of_the_samples(proxy):
    session = f"resp-mixed-{uuid.uuid4().hex[:8]}"
    sdk = client(proxy.v1, **{"X-Session-Id": session})
    sdk.responses.create(model="policy", input="Compute 2+3.", tools=[CALCULATOR], max_output_tokens=8)
    sdk.responses.create(
        model="policy", input="Compute 2+3.", tools=[CALCULATOR], tool_choice="required", max_output_tokens=8
    )
    post_final_reward(proxy, session, 1.0)
    plain, forced = _rows(proxy.db_url, session, 2)
    assert plain["untrainable_reason"] is None and "tool_choice" in forced["untrainable_reason"]
    _, built = asyncio.run(one_step.claim_and_build(proxy.db_url))
    assert built.call_ids == [(plain["id"],)]
    assert built.counters["skipped_untrainable"] == 1

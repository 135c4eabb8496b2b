"""The proxy against a scripted upstream, driven by the real OpenAI SDK over real HTTP, on Postgres and SQLite."""

from __future__ import annotations

import json

import httpx
import openai
import orjson
import pytest

from tests.support import dbread


def client(proxy, **headers) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.v1, api_key="unused", default_headers=headers or None, max_retries=0)


def test_chat_is_recorded_with_tokens_and_hidden_from_client(proxy, upstream, db_url):
    c = client(proxy, **{"X-Session-Id": "s-1", "X-Task-Id": "task-7", "X-Agent-Name": "writer"})
    raw = c.chat.completions.with_raw_response.create(model="policy", messages=[{"role": "user", "content": "hi"}])
    resp = raw.parse()
    assert resp.choices[0].message.content == "Hello there, friend."
    assert resp.model == "policy"  # the client sees the name it asked for
    assert raw.headers["x-session-id"] == "s-1"
    assert raw.headers["x-policy-version"] == "0"
    call_id = raw.headers["x-call-id"]
    # The upstream was asked for everything training needs, under the base model's name ...
    sent = upstream.sent[-1].request
    assert sent["return_token_ids"] is True and sent["logprobs"] is True and sent["model"] == "base-model"
    # ... and the client did not get the injected fields.
    body = raw.http_response.json()
    assert "prompt_token_ids" not in body and "token_ids" not in body["choices"][0]
    assert body["choices"][0]["logprobs"] is None
    rows = dbread.wait_calls(db_url, 1)
    row = rows[0]
    assert row["id"] == call_id and row["session_id"] == "s-1" and row["task_id"] == "task-7"
    assert row["agent_name"] == "writer" and row["trainable"] is True and row["seq"] == 0
    assert row["prompt_token_ids"] == upstream.tokenize("hi")
    expected_ids = upstream.tokenize("Hello there, friend.")
    assert row["completion_token_ids"] == expected_ids
    assert row["logprobs"] == pytest.approx([upstream._logprob(i) for i in range(len(expected_ids))])
    assert row["finish_reason"] == "stop" and row["status_code"] == 200
    assert row["model_requested"] == "policy" and row["model_served"] == "base-model"
    assert row["policy_version"] == 0 and row["request"]["messages"][0]["content"] == "hi"
    assert row["usage"]["completion_tokens"] == len(expected_ids)
    assert row["upstream_ms"] > 0 and row["overhead_ms"] >= 0


def test_client_that_asks_for_logprobs_gets_them_untouched(proxy, upstream, db_url):
    c = client(proxy)
    raw = c.chat.completions.with_raw_response.create(
        model="policy", logprobs=True, messages=[{"role": "user", "content": "x"}]
    )
    body = raw.http_response.json()
    upstream_body = orjson.loads(upstream.sent[-1].body)
    assert body["choices"][0]["logprobs"] == upstream_body["choices"][0]["logprobs"]
    assert "token_ids" not in body["choices"][0]  # token ids were still injected, and removed
    # generated session id, one per call
    assert raw.headers["x-session-id"].startswith("sess_")


def _events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e.strip()]


def _minus_injected(upstream_bytes: bytes, model: str) -> list[bytes]:
    out = []
    for ev in _events(upstream_bytes):
        data = ev[len(b"data: ") :]
        if data == b"[DONE]":
            out.append(ev)
            continue
        chunk = orjson.loads(data)
        if not chunk["choices"] and "usage" in chunk:
            continue
        chunk.pop("prompt_token_ids", None)
        chunk.pop("usage", None)
        for ch in chunk["choices"]:
            ch.pop("token_ids", None)
            ch.pop("prompt_token_ids", None)
            ch["logprobs"] = None
        chunk["model"] = model
        out.append(b"data: " + orjson.dumps(chunk))
    return out


def test_stream_bytes_equal_upstream_minus_injected_fields(proxy, upstream, db_url):
    body = {"model": "policy", "stream": True, "messages": [{"role": "user", "content": "stream please"}]}
    with httpx.stream("POST", f"{proxy.v1}/chat/completions", json=body, headers={"X-Session-Id": "st-1"}) as r:
        received = b"".join(r.iter_raw())
        assert r.headers["content-type"].startswith("text/event-stream")
    assert _events(received) == _minus_injected(upstream.sent[-1].body, "policy")
    row = dbread.wait_calls(db_url, 1)[0]
    assert row["stream"] is True and row["aborted"] is False
    assert row["response"]["choices"][0]["message"]["content"] == "Hello there, friend."
    assert row["completion_token_ids"] == upstream.tokenize("Hello there, friend.")
    assert len(row["logprobs"]) == len(row["completion_token_ids"])
    assert row["usage"]["completion_tokens"] == len(row["completion_token_ids"])
    assert row["ttft_ms"] is not None


def test_stream_untouched_when_client_asked_for_everything(proxy, upstream, db_url):
    body = {"model": "base-model-alias", "stream": True}
    # A client that asks for token ids, logprobs and usage itself gets the upstream's bytes unchanged
    # (apart from the model name it asked for).
    body = {
        "model": "policy",
        "stream": True,
        "logprobs": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "all"}],
    }
    with httpx.stream("POST", f"{proxy.v1}/chat/completions", json=body) as r:
        received = b"".join(r.iter_raw())
    expected = upstream.sent[-1].body.replace(b'"model":"base-model"', b'"model":"policy"')
    assert received == expected


def test_streamed_tool_calls_arrive_intact(proxy, upstream, db_url):
    args = json.dumps({"expression": "2 + 3 * 4"})
    upstream.script(tool_calls=[{"name": "calculator", "arguments": args}])
    c = client(proxy, **{"X-Session-Id": "tools-1"})
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    stream = c.chat.completions.create(
        model="policy", stream=True, tools=tools, messages=[{"role": "user", "content": "compute"}]
    )
    name, arguments = "", ""
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            name += tc.function.name or ""
            arguments += tc.function.arguments or ""
    assert name == "calculator" and arguments == args
    row = dbread.wait_calls(db_url, 1)[0]
    tc = row["response"]["choices"][0]["message"]["tool_calls"][0]
    assert tc["function"] == {"name": "calculator", "arguments": args} and tc["id"] == "chatcmpl-tool-0"
    assert row["finish_reason"] == "tool_calls"


def test_completions_recorded(proxy, upstream, db_url):
    c = client(proxy, **{"X-Session-Id": "comp-1"})
    resp = c.completions.create(model="policy", prompt="Once upon")
    assert resp.choices[0].text == "Hello there, friend."
    assert resp.choices[0].logprobs is None
    assert upstream.sent[-1].request["logprobs"] == 0
    row = dbread.wait_calls(db_url, 1)[0]
    assert row["kind"] == "completion" and row["prompt_token_ids"] == upstream.tokenize("Once upon")
    assert len(row["logprobs"]) == len(row["completion_token_ids"]) > 0


def test_session_by_path_and_order(proxy, upstream, db_url):
    c = openai.OpenAI(base_url=f"{proxy.url}/sessions/path-sess/v1", api_key="x", max_retries=0)
    for i in range(3):
        c.chat.completions.create(model="policy", messages=[{"role": "user", "content": f"turn {i}"}])
    rows = dbread.wait_calls(db_url, 3, "path-sess")
    assert [r["seq"] for r in rows] == [0, 1, 2]
    assert [r["request"]["messages"][0]["content"] for r in rows] == ["turn 0", "turn 1", "turn 2"]
    sess = [s for s in dbread.sessions(db_url) if s["id"] == "path-sess"][0]
    assert sess["n_calls"] == 3


def test_session_id_with_slashes_by_path(proxy, upstream, db_url):
    """Ids may contain '/' (X-Session-Id allows it), so the path form must take them whole, on the generation
    routes and on the framework routes (models, pass-through) alike."""
    sid = "team/run-7/episode:3"
    c = openai.OpenAI(base_url=f"{proxy.url}/sessions/{sid}/v1", api_key="x", max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model="policy", messages=[{"role": "user", "content": "a"}])
    assert raw.headers["x-session-id"] == sid
    c.completions.create(model="policy", prompt="b")
    assert [m.id for m in c.models.list().data] == ["policy"]
    r = httpx.post(f"{proxy.url}/sessions/{sid}/v1/embeddings", json={"model": "policy", "input": "c"})
    assert r.headers["x-session-id"] == sid
    rows = dbread.wait_calls(db_url, 3, sid)
    assert [(r["kind"], r["path"]) for r in rows] == [
        ("chat", "/v1/chat/completions"),
        ("completion", "/v1/completions"),
        ("other", "/v1/embeddings"),
    ]


def test_eval_calls_are_not_trainable(proxy, upstream, db_url):
    c = client(proxy, **{"X-Trainwire-Train": "false", "X-Session-Id": "eval-1"})
    c.chat.completions.create(model="policy", messages=[{"role": "user", "content": "e"}])
    assert dbread.wait_calls(db_url, 1)[0]["trainable"] is False


@pytest.mark.parametrize(
    "header,value",
    [
        ("X-Session-Id", "bad id with spaces"),
        ("X-Task-Id", "x" * 200),
        ("X-Trainwire-Train", "maybe"),
        ("X-Agent-Name", "ag\tent"),
    ],
)
def test_bad_headers_get_openai_400(proxy, upstream, db_url, header, value):
    r = httpx.post(
        f"{proxy.v1}/chat/completions",
        headers={header: value},
        json={"model": "policy", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert header in err["message"] and err["type"] == "invalid_request_error"
    assert upstream.sent == []


def test_bad_json_and_unknown_model(proxy, upstream, db_url):
    r = httpx.post(f"{proxy.v1}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    c = client(proxy)
    with pytest.raises(openai.NotFoundError) as exc:
        c.chat.completions.create(model="gpt-unknown", messages=[{"role": "user", "content": "x"}])
    assert "policy" in str(exc.value) and exc.value.body["code"] == "model_not_found"
    assert upstream.sent == []


def test_upstream_errors_pass_through_and_are_recorded(proxy, upstream, db_url):
    upstream.script(
        status=400,
        error_body={
            "object": "error",
            "message": "max_tokens is too large",
            "type": "BadRequestError",
            "param": "max_tokens",
            "code": 400,
        },
    )
    c = client(proxy, **{"X-Session-Id": "err-1"})
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="policy", messages=[{"role": "user", "content": "x"}], max_tokens=10**9)
    assert "max_tokens is too large" in str(exc.value)
    row = dbread.wait_calls(db_url, 1)[0]
    assert row["status_code"] == 400 and "max_tokens is too large" in row["error"]


def test_models_lists_policy(proxy):
    models = client(proxy).models.list()
    assert [m.id for m in models.data] == ["policy"]


def test_client_abort_mid_stream_is_recorded(proxy, upstream, db_url):
    upstream.script(text="abcdefghijklmnopqrstuvwxyz" * 4, delay_per_chunk=0.05)
    c = client(proxy, **{"X-Session-Id": "abort-1"})
    stream = c.chat.completions.create(model="policy", stream=True, messages=[{"role": "user", "content": "go"}])
    got = ""
    for chunk in stream:
        got += chunk.choices[0].delta.content or ""
        if len(got) >= 9:
            break
    stream.close()
    rows = dbread.wait_calls(db_url, 1, timeout=15)
    assert rows, "aborted call must be recorded"
    row = rows[0]
    assert row["aborted"] is True
    content = row["response"]["choices"][0]["message"]["content"]
    assert content.startswith(got) and len(content) < 26 * 4
    assert len(row["completion_token_ids"]) == len(content)


def test_passthrough_is_recorded(proxy, upstream, db_url):
    r = httpx.post(f"{proxy.url}/tokenize", json={"model": "policy", "prompt": "abc"}, headers={"X-Session-Id": "tok"})
    assert r.status_code == 200 and r.json()["tokens"] == upstream.tokenize("abc")
    assert upstream.sent[-1].request["model"] == "base-model"
    row = dbread.wait_calls(db_url, 1)[0]
    assert row["route"] == "passthrough" and row["trainable"] is False and row["path"] == "/tokenize"


def test_policy_version_routing_and_lost_adapter_fallback(proxy, upstream, db_url):
    """The proxy sends `policy` to the adapter the store says an upstream serves, stamps its version, and if
    that upstream lost the adapter (vLLM restarted) serves the base model instead of failing the agent."""
    import asyncio
    import time

    from trainwire.store.db import make_engine
    from trainwire.store.policy import record_publish

    async def publish(version: int, name: str) -> None:
        engine = make_engine(db_url)
        await record_publish(
            engine,
            version=version,
            kind="lora",
            served_model=name,
            path=f"/ckpt/v{version}",
            train_step=version,
            reached=[upstream.url],
            failed=[],
        )
        await engine.dispose()

    upstream.adapters.append("policy-v1")
    asyncio.run(publish(1, "policy-v1"))
    c = client(proxy, **{"X-Session-Id": "ver-1"})
    made = 0
    deadline = time.time() + 10  # SQLite: the proxy polls once a second; Postgres: NOTIFY
    while True:
        made += 1
        raw = c.chat.completions.with_raw_response.create(model="policy", messages=[{"role": "user", "content": "v"}])
        if raw.headers["x-policy-version"] == "1" or time.time() > deadline:
            break
        time.sleep(0.1)
    assert raw.headers["x-policy-version"] == "1"
    assert upstream.sent[-1].request["model"] == "policy-v1"
    assert raw.parse().model == "policy"
    # v2 is recorded as published, but the upstream does not have it (e.g. it restarted before the load)
    asyncio.run(publish(2, "policy-v2"))
    deadline = time.time() + 10
    while True:
        made += 1
        raw = c.chat.completions.with_raw_response.create(model="policy", messages=[{"role": "user", "content": "w"}])
        if upstream.sent[-1].request["model"] != "policy-v1" or time.time() > deadline:
            break
        time.sleep(0.1)
    assert raw.http_response.status_code == 200
    assert [s.request["model"] for s in upstream.sent[-2:]] == ["policy-v2", "base-model"]
    assert raw.headers["x-policy-version"] == "0"
    rows = dbread.wait_calls(db_url, made, "ver-1")
    assert len(rows) == made
    assert rows[-1]["policy_version"] == 0 and rows[-1]["model_served"] == "base-model"
    assert any(r["policy_version"] == 1 and r["model_served"] == "policy-v1" for r in rows)

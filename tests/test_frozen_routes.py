"""Frozen agents: models other than the policy, routed through litellm to another provider (here a second scripted
upstream speaking OpenAI's protocol), recorded like policy calls and never trainable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import httpx
import openai
import pytest
import yaml

from tests.support import dbread
from tests.support.ports import free_port
from tests.support.proxyproc import ProxyProcess
from tests.support.scripted_upstream import ScriptedUpstream
from trainwire.proxy.frozen import RouteConfigError, parse_routes
from trainwire.store.migrate import upgrade_head

ROUTE_KEY = "sk-route-key"


@pytest.fixture(scope="module")
def policy_up():
    up = ScriptedUpstream().start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def other():
    up = ScriptedUpstream(model="other-model").start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def fz_db(pg) -> str:
    url = pg.create_database("fz_" + uuid.uuid4().hex[:12])
    upgrade_head(url)
    return url


@pytest.fixture(scope="module")
def fz_proxy(policy_up, other, fz_db, tmp_path_factory):
    """One proxy for the module (litellm takes seconds to import): a routes file with a params route and an
    unreachable one, plus a --model-route flag whose provider comes from litellm's usual environment."""
    tmp = tmp_path_factory.mktemp("frozen")
    routes = tmp / "routes.yaml"
    routes.write_text(
        yaml.safe_dump(
            {
                "checker": {"model": "openai/other-model", "api_base": f"{other.url}/v1", "api_key": ROUTE_KEY},
                "dead": {
                    "model": "openai/other-model",
                    "api_base": f"http://127.0.0.1:{free_port()}/v1",
                    "api_key": "x",
                },
                "slow": {"model": "openai/other-model", "api_base": f"{other.url}/v1", "api_key": "x", "timeout": 0.5},
            }
        )
    )
    p = ProxyProcess(
        [
            "--upstream",
            policy_up.url,
            "--database-url",
            fz_db,
            "--journal-dir",
            str(tmp / "journal"),
            "--routes-file",
            str(routes),
            "--model-route",
            "judge=openai/other-model",
        ],
        env={"OPENAI_BASE_URL": f"{other.url}/v1", "OPENAI_API_KEY": "sk-env-key"},
        log_path=tmp / "proxy.log",
    )
    p.start(timeout=90)
    yield p
    p.stop()


def client(proxy, **headers) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.v1, api_key="client-key", default_headers=headers or None, max_retries=0)


def test_frozen_chat_is_recorded_in_the_session_and_never_trainable(fz_proxy, policy_up, other, fz_db):
    sid = "fz-chat"
    writer = client(fz_proxy, **{"X-Session-Id": sid, "X-Agent-Name": "writer"})
    checker = client(fz_proxy, **{"X-Session-Id": sid, "X-Agent-Name": "checker", "X-Task-Id": "t-1"})
    writer.chat.completions.create(model="policy", messages=[{"role": "user", "content": "draft"}])
    n_policy = len(policy_up.sent)
    raw = checker.chat.completions.with_raw_response.create(
        model="checker", messages=[{"role": "user", "content": "check this"}], temperature=0.25, max_tokens=7
    )
    resp = raw.parse()
    assert resp.choices[0].message.content == "Hello there, friend."
    assert resp.model == "checker" and resp.choices[0].finish_reason == "stop"
    assert raw.headers["x-session-id"] == sid and raw.headers["x-policy-version"] == "0"
    assert len(policy_up.sent) == n_policy  # the policy's vLLM never saw it
    sent = other.sent[-1]
    # The provider got the client's parameters under its own model name, with the route's key, and nothing
    # injected: frozen calls are not trained, so no token ids or logprobs are asked for.
    assert sent.request == {
        "model": "other-model",
        "messages": [{"role": "user", "content": "check this"}],
        "temperature": 0.25,
        "max_tokens": 7,
    }
    assert sent.headers["Authorization"] == f"Bearer {ROUTE_KEY}"
    rows = dbread.wait_calls(fz_db, 2, sid)
    assert [(r["seq"], r["agent_name"], r["route"], r["trainable"]) for r in rows] == [
        (0, "writer", "policy", True),
        (1, "checker", "frozen", False),
    ]
    row = rows[1]
    assert row["id"] == raw.headers["x-call-id"] and row["task_id"] == "t-1"
    assert row["model_requested"] == "checker" and row["model_served"] == "other-model"
    assert row["upstream"] == f"{other.url}/v1" and row["status_code"] == 200 and row["error"] is None
    assert row["response"]["choices"][0]["message"]["content"] == "Hello there, friend."
    assert row["request"]["temperature"] == 0.25 and row["usage"]["completion_tokens"] == 20
    assert row["finish_reason"] == "stop" and row["completion_token_ids"] is None and row["upstream_ms"] > 0


def test_parameters_the_provider_does_not_take_are_dropped_not_refused(fz_proxy, other, fz_db):
    """The OpenAI Agents SDK sends ``verbosity`` and ``reasoning_effort`` on every chat call; litellm refuses them
    for a model it does not know unless they are dropped. The call is served and recorded as the client sent it."""
    sid = "fz-drop-" + uuid.uuid4().hex[:6]
    raw = client(fz_proxy, **{"X-Session-Id": sid}).chat.completions.with_raw_response.create(
        model="checker",
        messages=[{"role": "user", "content": "check this"}],
        temperature=0.5,
        extra_body={"verbosity": "low", "reasoning_effort": "none"},
    )
    assert raw.http_response.status_code == 200
    assert raw.parse().choices[0].message.content == "Hello there, friend."
    assert "verbosity" not in other.sent[-1].request and other.sent[-1].request["temperature"] == 0.5
    row = dbread.wait_calls(fz_db, 1, sid)[0]
    assert row["status_code"] == 200 and row["request"]["verbosity"] == "low"


def test_frozen_stream_delivers_tool_calls_in_openai_chunks(fz_proxy, other, fz_db):
    args = json.dumps({"expression": "6 * 7"})
    other.script(tool_calls=[{"name": "calculator", "arguments": args}])
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    body = {"model": "checker", "stream": True, "tools": tools, "messages": [{"role": "user", "content": "6*7?"}]}
    with httpx.stream("POST", f"{fz_proxy.v1}/chat/completions", json=body, headers={"X-Session-Id": "fz-stream"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw())
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[len(b"data: ") :]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "checker" for c in chunks)
    assert not any("provider_specific_fields" in json.dumps(c) for c in chunks)  # litellm's extras are gone
    deltas = [tc["function"] for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    name = "".join(fn.get("name") or "" for fn in deltas)
    got = "".join(fn.get("arguments") or "" for fn in deltas)
    assert name == "calculator" and got == args
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # The SDK reads the same stream.
    other.script(text="Forty-two.")
    stream = client(fz_proxy, **{"X-Session-Id": "fz-stream"}).chat.completions.create(
        model="checker", stream=True, messages=[{"role": "user", "content": "again"}]
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Forty-two."
    rows = dbread.wait_calls(fz_db, 2, "fz-stream")
    assert [r["seq"] for r in rows] == [0, 1] and all(r["stream"] and not r["aborted"] for r in rows)
    tc = rows[0]["response"]["choices"][0]["message"]["tool_calls"][0]
    assert tc["function"] == {"name": "calculator", "arguments": args} and rows[0]["finish_reason"] == "tool_calls"
    assert rows[1]["response"]["choices"][0]["message"]["content"] == "Forty-two."
    assert rows[1]["route"] == "frozen" and rows[1]["trainable"] is False and rows[1]["ttft_ms"] is not None


def test_frozen_completions_and_provider_token_data(fz_proxy, other, fz_db):
    c = client(fz_proxy, **{"X-Session-Id": "fz-comp"})
    resp = c.completions.create(model="checker", prompt="Once upon")
    assert resp.choices[0].text == "Hello there, friend." and resp.model == "checker"
    assert other.sent[-1].request["prompt"] == "Once upon" and other.sent[-1].path == "/v1/completions"
    text = "".join(
        ch.choices[0].text for ch in c.completions.create(model="checker", prompt="x", stream=True) if ch.choices
    )
    assert text == "Hello there, friend."
    # A client that asks the provider for logprobs gets them, and so does the record.
    got = c.chat.completions.create(model="checker", logprobs=True, messages=[{"role": "user", "content": "lp"}])
    assert got.choices[0].logprobs is not None
    rows = dbread.wait_calls(fz_db, 3, "fz-comp")
    assert [r["kind"] for r in rows] == ["completion", "completion", "chat"]
    assert rows[0]["response"]["choices"][0]["text"] == "Hello there, friend."
    assert rows[1]["response"]["choices"][0]["text"] == "Hello there, friend." and rows[1]["stream"] is True
    n = len(other.tokenize("Hello there, friend."))
    assert rows[2]["logprobs"] == pytest.approx([other._logprob(i) for i in range(n)])


def test_model_route_flag_and_models_list(fz_proxy, other, fz_db):
    c = client(fz_proxy, **{"X-Session-Id": "fz-judge"})
    assert [m.id for m in c.models.list().data] == ["policy", "checker", "dead", "slow", "judge"]
    resp = c.chat.completions.create(model="judge", messages=[{"role": "user", "content": "judge"}])
    assert resp.model == "judge" and resp.choices[0].message.content == "Hello there, friend."
    assert other.sent[-1].headers["Authorization"] == "Bearer sk-env-key"  # litellm's OPENAI_* environment
    assert dbread.wait_calls(fz_db, 1, "fz-judge")[0]["model_requested"] == "judge"


def test_unknown_model_is_a_404_listing_known_names(fz_proxy, other):
    n = len(other.sent)
    with pytest.raises(openai.NotFoundError) as exc:
        client(fz_proxy).chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}])
    err = exc.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model" and err["type"] == "not_found_error"
    assert "gpt-nope" in err["message"]
    assert all(name in err["message"] for name in ("policy", "checker", "dead", "slow", "judge"))
    assert len(other.sent) == n


def test_provider_errors_keep_their_status_and_are_recorded(fz_proxy, other, fz_db):
    c = client(fz_proxy, **{"X-Session-Id": "fz-err"})
    other.script(
        status=400,
        error_body={
            "object": "error",
            "message": "max_tokens is too large",
            "type": "BadRequestError",
            "param": "max_tokens",
            "code": 400,
        },
    )
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="checker", messages=[{"role": "user", "content": "x"}], max_tokens=10**9)
    assert exc.value.body["message"] == "max_tokens is too large" and exc.value.body["param"] == "max_tokens"
    assert exc.value.body["type"] == "invalid_request_error"
    other.script(
        status=429,
        error_body={
            "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "rate_limited"}
        },
    )
    with pytest.raises(openai.RateLimitError) as exc:  # also when the client asked for a stream
        c.chat.completions.create(model="checker", stream=True, messages=[{"role": "user", "content": "x"}])
    assert exc.value.body == {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "rate_limited"}
    with pytest.raises(openai.APIStatusError) as exc:  # nobody listening: 502, as for the policy's upstream
        c.chat.completions.create(model="dead", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 502 and exc.value.body["code"] == "upstream_unavailable"
    other.script(delay=1.5)
    with pytest.raises(openai.APIStatusError) as exc:  # the route's own timeout (litellm's `timeout` param)
        c.chat.completions.create(model="slow", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 504 and exc.value.body["code"] == "upstream_timeout"
    rows = dbread.wait_calls(fz_db, 4, "fz-err")
    assert [(r["status_code"], r["route"]) for r in rows] == [
        (400, "frozen"),
        (429, "frozen"),
        (502, "frozen"),
        (504, "frozen"),
    ]
    assert rows[0]["error"] == "max_tokens is too large" and rows[1]["error"] == "slow down"
    assert rows[1]["stream"] is True and "Connection error" in rows[2]["error"]


def test_client_abort_mid_frozen_stream_is_recorded(fz_proxy, other, fz_db):
    other.script(text="abcdefghijklmnopqrstuvwxyz" * 4, delay_per_chunk=0.05)
    stream = client(fz_proxy, **{"X-Session-Id": "fz-abort"}).chat.completions.create(
        model="checker", stream=True, messages=[{"role": "user", "content": "go"}]
    )
    got = ""
    for chunk in stream:
        got += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        if len(got) >= 9:
            break
    stream.close()
    rows = dbread.wait_calls(fz_db, 1, "fz-abort", timeout=15)
    assert rows and rows[0]["aborted"] is True and rows[0]["route"] == "frozen"
    content = rows[0]["response"]["choices"][0]["message"]["content"]
    assert content.startswith(got) and len(content) < 26 * 4


def test_litellm_is_not_imported_without_routes(upstream, sqlite_url, tmp_path):
    """In a clean interpreter: the app with no routes starts, serves a policy call, and never imports litellm;
    the same app with a route does (so the check can fail)."""
    script = textwrap.dedent(f"""
        import asyncio, sys
        import httpx
        from trainwire.proxy.app import create_app
        from trainwire.settings import Settings

        async def main(routes):
            settings = Settings(upstream=[{upstream.url!r}], database_url={sqlite_url!r},
                                journal_dir={str(tmp_path / "journal")!r}, model_route=routes)
            app = create_app(settings)
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as c:
                    r = await c.post("/v1/chat/completions", json={{"model": "policy", "messages": [
                        {{"role": "user", "content": "hi"}}]}})
                    assert r.status_code == 200, r.text
            print("litellm imported:", routes != [], "litellm" in sys.modules, flush=True)

        asyncio.run(main([]))
        asyncio.run(main(["checker=openai/some-model"]))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("litellm imported:")]
    assert lines == ["litellm imported: False False", "litellm imported: True True"], out.stdout + out.stderr


def test_route_configuration(tmp_path):
    f = tmp_path / "routes.yaml"
    f.write_text(
        "a: openai/x\nb: {model: hosted_vllm/y, api_base: 'http://h/v1'}\nc: [{model: openai/p}, {model: openai/q}]\n"
    )
    routes = parse_routes(["a=anthropic/claude", "d = openai/z"], f, "policy")
    assert routes == {
        "a": [{"model": "anthropic/claude"}],  # the flag replaces the file's entry
        "b": [{"model": "hosted_vllm/y", "api_base": "http://h/v1"}],
        "c": [{"model": "openai/p"}, {"model": "openai/q"}],
        "d": [{"model": "openai/z"}],
    }
    for bad, needle in [
        (["nomodel"], "NAME=litellm-model-string"),
        (["x="], "NAME=litellm-model-string"),
        (["policy=openai/x"], "policy model"),
    ]:
        with pytest.raises(RouteConfigError, match=needle):
            parse_routes(bad, None, "policy")
    f.write_text("a: {api_base: 'http://h'}\n")
    with pytest.raises(RouteConfigError, match="'model' key"):
        parse_routes([], f, "policy")
    f.write_text("- just a list\n")
    with pytest.raises(RouteConfigError, match="must map model names"):
        parse_routes([], f, "policy")


def test_client_that_gives_up_before_the_provider_answers_is_recorded_once(fz_proxy, other, fz_db):
    other.script(delay=1.5)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{fz_proxy.v1}/chat/completions",
            timeout=0.3,
            headers={"X-Session-Id": "fz-gone"},
            json={"model": "checker", "messages": [{"role": "user", "content": "x"}]},
        )
    assert dbread.wait_calls(fz_db, 1, "fz-gone", timeout=15)
    time.sleep(1.0)  # a second record, if there were one, would be written by now
    rows = dbread.calls(fz_db, "fz-gone")
    # uvicorn lets the handler finish (200, the answer nobody read); were it cancelled, it would be a 499 abort.
    assert len(rows) == 1 and rows[0]["route"] == "frozen" and rows[0]["status_code"] in (200, 499)

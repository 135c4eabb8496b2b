"""The JSON read API against a real `trainwire serve` on Postgres."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.support import dbread
from tests.support.apihelpers import TOOLS, assert_openai_error, chat, get, post, start, tool_call_msg


@pytest.fixture
def pg_proxy(start_proxy, upstream, pg_url, tmp_path):
    p = start(start_proxy, upstream, pg_url, tmp_path)
    yield p
    p.stop()


def _all_pages(proxy, path: str, **params) -> list[list[dict]]:
    pages, cursor = [], None
    while True:
        body = get(proxy, path, cursor=cursor, **params).json()
        pages.append(body["data"])
        assert body["has_more"] == (body["next_cursor"] is not None)
        if not body["has_more"]:
            return pages
        cursor = body["next_cursor"]


def test_sessions_list_filters_and_pages_newest_first(pg_proxy, upstream, pg_url):
    plan = [
        ("s-a", "t1", "alice"),
        ("s-b", "t1", "bob"),
        ("s-c", "t2", "alice"),
        ("s-d", "t2", "carol"),
        ("s-e", "t3", "bob"),
    ]
    for sid, task, agent in plan:
        r = chat(pg_proxy, sid, headers={"X-Task-Id": task, "X-Agent-Name": agent})
        assert r.status_code == 200
    assert post(pg_proxy, "/reward", {"session_id": "s-b", "reward": 1}).status_code == 200
    assert post(pg_proxy, "/sessions/s-d/finish").status_code == 200
    dbread.wait_calls(pg_url, 5)

    body = get(pg_proxy, "/sessions").json()
    assert body["object"] == "list" and body["has_more"] is False and body["next_cursor"] is None
    assert [s["id"] for s in body["data"]] == ["s-e", "s-d", "s-c", "s-b", "s-a"]  # newest first
    by_id = {s["id"]: s for s in body["data"]}
    assert by_id["s-b"]["status"] == "finished" and by_id["s-b"]["final_reward"] == 1.0
    assert by_id["s-d"]["status"] == "finished" and by_id["s-d"]["final_reward"] is None
    assert by_id["s-d"]["final"]["value"] is None and by_id["s-d"]["finished_at"] is not None
    assert by_id["s-a"]["status"] == "open" and by_id["s-a"]["agents"] == ["alice"]
    assert by_id["s-a"]["task_id"] == "t1" and by_id["s-a"]["n_calls"] == 1

    ids = lambda **p: [s["id"] for s in get(pg_proxy, "/sessions", **p).json()["data"]]  # noqa: E731
    assert ids(status="finished") == ["s-d", "s-b"]
    assert ids(status="open") == ["s-e", "s-c", "s-a"]
    assert ids(task="t2") == ["s-d", "s-c"]
    assert ids(agent="bob") == ["s-e", "s-b"]
    assert ids(agent="alice", status="open") == ["s-c", "s-a"]
    first_c = dbread.calls(pg_url, "s-c")[0]["started_at"]
    assert ids(since=first_c.isoformat()) == ["s-e", "s-d", "s-c"]
    assert ids(until=first_c.isoformat()) == ["s-b", "s-a"]
    assert ids(since=(first_c + timedelta(days=1)).isoformat().replace("+00:00", "Z")) == []
    first_b = dbread.calls(pg_url, "s-b")[0]["started_at"]
    assert ids(until=str((first_b + (first_c - first_b) / 2).timestamp())) == ["s-b", "s-a"]  # Unix seconds too

    # Cursor pages: every session once, in order, whatever the page size.
    for limit in (1, 2, 3):
        pages = _all_pages(pg_proxy, "/sessions", limit=limit)
        assert [s["id"] for page in pages for s in page] == ["s-e", "s-d", "s-c", "s-b", "s-a"]
        assert all(len(p) <= limit for p in pages)
    assert ids(limit=2, offset=2) == ["s-c", "s-b"]
    # A session that starts while a client pages does not shift the pages it has not read yet.
    page1 = get(pg_proxy, "/sessions", limit=2).json()
    chat(pg_proxy, "s-new")
    dbread.wait_calls(pg_url, 1, "s-new")
    page2 = get(pg_proxy, "/sessions", limit=2, cursor=page1["next_cursor"]).json()
    assert [s["id"] for s in page2["data"]] == ["s-c", "s-b"]

    for params, needle, param in [
        ({"status": "done"}, "status must be one of", "status"),
        ({"since": "yesterday"}, "ISO 8601", "since"),
        ({"cursor": "not-a-cursor"}, "not a cursor", "cursor"),
        ({"limit": "0"}, "limit", "limit"),
        ({"limit": "abc"}, "limit", "limit"),
    ]:
        err = assert_openai_error(get(pg_proxy, "/sessions", **params), 400, needle)
        assert err["param"] == param


def test_session_detail_has_calls_in_order_with_rewards_and_text(pg_proxy, upstream, pg_url):
    sid = "team/alpha:run-1"  # ids may carry '/', the path routes take them whole
    upstream.script(tool_calls=[{"name": "calculator", "arguments": '{"expression": "2+2"}'}])
    first = chat(pg_proxy, sid, "what is 2+2?", tools=TOOLS)
    history = [
        {"role": "user", "content": "what is 2+2?"},
        tool_call_msg("chatcmpl-tool-0", "calculator", '{"expression": "2+2"}'),
        {"role": "tool", "tool_call_id": "chatcmpl-tool-0", "content": [{"type": "text", "text": "4"}]},
    ]
    upstream.script(text="It is 4.")
    second = chat(pg_proxy, sid, messages=history, tools=TOOLS)
    c1, c2 = first.headers["x-call-id"], second.headers["x-call-id"]
    assert post(pg_proxy, "/reward", {"session_id": sid, "reward": 0.3, "call_id": c1}).status_code == 200
    assert post(pg_proxy, f"/sessions/{sid}/reward", {"reward": 1.0}).status_code == 200

    detail = get(pg_proxy, f"/sessions/{sid}").json()
    assert detail["id"] == sid and detail["status"] == "finished" and detail["final_reward"] == 1.0
    assert [c["id"] for c in detail["calls"]] == [c1, c2] and [c["seq"] for c in detail["calls"]] == [0, 1]
    one, two = detail["calls"]
    assert one["input"] == {"role": "user", "content": "what is 2+2?"}
    assert one["output"] == {
        "content": None,
        "tool_calls": [{"id": "chatcmpl-tool-0", "name": "calculator", "arguments": '{"expression": "2+2"}'}],
    }
    assert two["input"] == {"role": "tool", "content": "4", "tool_call_id": "chatcmpl-tool-0"}
    assert two["output"] == {"content": "It is 4."}
    assert [(r["value"], r["final"]) for r in one["rewards"]] == [(0.3, False)] and two["rewards"] == []
    assert [(r["value"], r["final"]) for r in detail["rewards"]] == [(0.3, False), (1.0, True)]
    # Every call says its API, token counts, tools, whole input and whether it will be trained on.
    rows = {r["id"]: r for r in dbread.calls(pg_url, sid)}
    assert one["api"] == two["api"] == "chat" and one["stream"] is False
    assert one["tools"] == two["tools"] == ["calculator", "search"]
    assert two["prompt_tokens"] == len(rows[c2]["prompt_token_ids"]) and two["prompt_tokens"] > 0
    assert two["completion_tokens"] == len(upstream.tokenize("It is 4."))
    assert one["input_messages"] == [{"role": "user", "content": "what is 2+2?"}]
    assert two["input_messages"] == [
        {"role": "user", "content": "what is 2+2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "chatcmpl-tool-0", "name": "calculator", "arguments": '{"expression": "2+2"}'}],
        },
        {"role": "tool", "content": "4", "tool_call_id": "chatcmpl-tool-0"},
    ]
    assert one["train"] == two["train"] == {"trainable": True, "reason": None}
    assert two["sampling"] == rows[c2]["sampling"] and two["sampling"]["effective"]
    assert detail["n_failed"] == 0 and detail["n_untrainable"] == 0
    # Token ids only when asked for.
    assert "completion_token_ids" not in one and "request" not in one
    with_tokens = get(pg_proxy, f"/sessions/{sid}", tokens="true").json()["calls"][1]
    rows = {r["id"]: r for r in dbread.calls(pg_url, sid)}
    assert with_tokens["completion_token_ids"] == rows[c2]["completion_token_ids"] == upstream.tokenize("It is 4.")
    assert with_tokens["prompt_token_ids"] == rows[c2]["prompt_token_ids"]
    assert with_tokens["logprobs"] == pytest.approx(rows[c2]["logprobs"])
    # The read routes take ids with '/', yet do not shadow the OpenAI routes under /sessions/{id}/v1/.
    r = httpx.post(
        f"{pg_proxy.url}/sessions/plain-1/v1/chat/completions",
        json={"model": "policy", "messages": [{"role": "user", "content": "again"}]},
    )
    assert r.status_code == 200 and r.headers["x-session-id"] == "plain-1"
    r = httpx.get(f"{pg_proxy.url}/sessions/plain-1/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "policy"
    assert_openai_error(get(pg_proxy, "/sessions/nope"), 404, "'nope'")


def test_call_detail(pg_proxy, upstream, pg_url):
    r = chat(pg_proxy, "calls-1", "hello", headers={"X-Agent-Name": "writer"})
    call_id = r.headers["x-call-id"]
    body = get(pg_proxy, f"/calls/{call_id}").json()  # right away: the read waits for the queued call
    assert body["id"] == call_id and body["session_id"] == "calls-1" and body["agent_name"] == "writer"
    assert body["request"]["messages"] == [{"role": "user", "content": "hello"}]
    assert body["response"]["choices"][0]["message"]["content"] == "Hello there, friend."
    assert body["output"]["content"] == "Hello there, friend." and body["input"]["content"] == "hello"
    assert body["rewards"] == [] and body["session_final"] is None and "prompt_token_ids" not in body
    assert post(pg_proxy, "/reward", {"session_id": "calls-1", "reward": 0.5}).status_code == 200
    body = get(pg_proxy, f"/calls/{call_id}", tokens="1").json()
    assert body["session_final"]["value"] == 0.5
    assert body["completion_token_ids"] == upstream.tokenize("Hello there, friend.")
    assert len(body["logprobs"]) == len(body["completion_token_ids"])
    assert_openai_error(get(pg_proxy, "/calls/call_missing"), 404, "call_missing")


def _synthetic_call(i: int, session: str, version: int, started: datetime) -> dict:
    return {
        "id": f"syn-{i}",
        "session_id": session,
        "seq": 0,
        "task_id": None,
        "agent_name": "syn",
        "trainable": True,
        "kind": "chat",
        "path": "/v1/chat/completions",
        "stream": False,
        "model_requested": "policy",
        "model_served": f"v{version}",
        "route": "policy",
        "upstream": None,
        "policy_version": version,
        "request": {"messages": [{"role": "user", "content": str(i)}]},
        "response": None,
        "prompt_token_ids": [1, 2],
        "completion_token_ids": [3],
        "logprobs": [-0.5],
        "finish_reason": "stop",
        "usage": None,
        "status_code": 200 if i % 5 else 500,
        "error": None,
        "aborted": False,
        "started_at": started,
        "finished_at": started,
        "upstream_ms": 1.0,
        "ttft_ms": None,
        "overhead_ms": 0.1,
    }


def test_stats_counts_and_reward_mean_by_policy_version(pg_proxy, upstream, pg_url):
    # Sessions served by versions 1 and 2 (written the way the proxy's write path writes them).
    now = datetime.now(UTC)
    calls = [_synthetic_call(i, f"v{1 + i % 2}-s{i}", 1 + i % 2, now + timedelta(milliseconds=i)) for i in range(6)]
    dbread.insert_calls(pg_url, calls)
    rewards = {"v1-s0": 1.0, "v1-s2": 0.0, "v2-s1": 0.5, "v2-s3": 1.0, "v2-s5": None}
    for sid, value in rewards.items():
        r = (
            post(pg_proxy, "/reward", {"session_id": sid, "reward": value})
            if value is not None
            else post(pg_proxy, f"/sessions/{sid}/finish")
        )
        assert r.status_code == 200, r.text
    post(pg_proxy, "/reward", {"session_id": "v1-s0", "reward": -0.2, "call_id": "syn-0"})
    post(pg_proxy, "/reward", {"session_id": "nobody", "reward": 3})
    stats = get(pg_proxy, "/stats").json()
    assert stats["sessions"] == {"open": 1, "finished": 5, "claimed": 0, "trained": 0, "skipped": 0, "total": 6}
    assert stats["calls"] == {"total": 6, "trainable": 6, "failed": 2, "untrainable": 2, "by_api": {"chat": 6}}
    assert stats["rewards"]["total"] == 7 and stats["rewards"]["final"] == 6
    assert stats["rewards"]["intermediate"] == 1 and stats["rewards"]["finished_without_reward"] == 1
    assert stats["rewards"]["orphaned"] == stats["orphaned_rewards"] == 1
    assert stats["rewards"]["by_source"]["user"]["mean_intermediate"] == pytest.approx(-0.2)
    assert stats["reward_by_policy_version"] == [
        {"policy_version": 1, "sessions": 2, "rewarded": 2, "mean": pytest.approx(0.5)},
        {"policy_version": 2, "sessions": 3, "rewarded": 2, "mean": pytest.approx(0.75)},
    ]
    assert stats["write_queue"] == {"calls": 0, "rewards": 0}


def test_rewards_list_pages_and_filters(pg_proxy, upstream, pg_url):
    call_id = chat(pg_proxy, "rl-1").headers["x-call-id"]
    ids = []
    for i in range(5):
        r = post(pg_proxy, "/reward", {"session_id": "rl-1", "reward": i / 10, "call_id": call_id})
        ids.append(r.json()["id"])
    ids.append(post(pg_proxy, "/reward", {"session_id": "rl-1", "reward": 1}).json()["id"])
    pages = _all_pages(pg_proxy, "/rewards", limit=4)
    assert [r["id"] for page in pages for r in page] == ids[::-1]
    finals = get(pg_proxy, "/rewards", final="true").json()["data"]
    assert [r["id"] for r in finals] == [ids[-1]]
    assert get(pg_proxy, "/rewards", session_id="other").json()["data"] == []
    assert [r["id"] for r in get(pg_proxy, "/rewards", limit=2, offset=1).json()["data"]] == [ids[4], ids[3]]
    assert json.dumps(get(pg_proxy, "/rewards", source="user").json()["data"]) == json.dumps(
        get(pg_proxy, "/rewards", limit=50).json()["data"]
    )


def test_openapi_documents_the_answers(pg_proxy):
    doc = get(pg_proxy, "/openapi.json").json()
    schemas = doc["components"]["schemas"]

    def answer(path: str, method: str = "get") -> dict:
        return doc["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]

    assert answer("/sessions") == {"$ref": "#/components/schemas/Page_SessionSummary_"}
    assert {s["$ref"] for s in answer("/sessions/{session_id}")["anyOf"]} == {
        "#/components/schemas/SessionDetail",
        "#/components/schemas/OrphanedSession",
    }
    assert answer("/calls/{call_id}") == {"$ref": "#/components/schemas/CallDetail"}
    assert answer("/rewards") == {"$ref": "#/components/schemas/Page_RewardListItem_"}
    assert answer("/stats") == {"$ref": "#/components/schemas/StatsAnswer"}
    assert answer("/train/steps") == {"$ref": "#/components/schemas/Page_TrainStepRow_"}
    assert answer("/policy/versions") == {"$ref": "#/components/schemas/Page_PolicyVersionRow_"}
    assert answer("/rewards/{reward_id}", "delete") == {"$ref": "#/components/schemas/Deleted"}
    call = schemas["CallDetail"]
    assert {"input", "output", "rewards", "request", "session_final", "logprobs"} <= set(call["properties"])
    assert "session_final" in call["required"] and "logprobs" not in call["required"]  # tokens only on request
    assert "write_queue" in schemas["StatsAnswer"]["required"]


# --- every API a call can come in on, and whether it will be trained on ---------------------------------------

RESPONSES_REQUEST = {
    "model": "policy",
    "instructions": "You are terse.",
    "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
    "input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "fc_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "fc_1", "output": "sunny"},
    ],
}
RESPONSES_ANSWER = {
    "id": "resp_1",
    "object": "response",
    "status": "completed",
    "output": [
        {
            "id": "msg_1_0",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Sunny.", "annotations": [], "logprobs": []}],
        }
    ],
}
MESSAGES_REQUEST = {
    "model": "policy",
    "max_tokens": 64,
    "system": "You are a calculator.",
    "tools": [{"name": "calc", "input_schema": {"type": "object"}}],
    "messages": [
        {"role": "user", "content": "2+2?"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "calc", "input": {"e": "2+2"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "4"}]},
    ],
}
MESSAGES_ANSWER = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "content": [
        {"type": "text", "text": "It is 4."},
        {"type": "tool_use", "id": "toolu_2", "name": "calc", "input": {"e": "4"}},
    ],
}
SAMPLING = {"requested": {"temperature": 0.7}, "effective": {"temperature": 0.7, "top_p": 1.0}}


def _row(call_id: str, session: str, at: datetime, **kw) -> dict:
    base = {
        "id": call_id,
        "session_id": session,
        "seq": 0,
        "kind": "chat",
        "path": "/v1/chat/completions",
        "status_code": 200,
        "started_at": at,
        "finished_at": at,
        "model_requested": "policy",
        "request": {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": call_id}],
            "tools": TOOLS,
        },
        "response": {"choices": [{"message": {"role": "assistant", "content": "ok"}}]},
        "prompt_token_ids": [1, 2, 3],
        "completion_token_ids": [4, 5],
        "logprobs": [-0.5, -0.25],
    }
    return {**base, **kw}


# call id -> (api, prompt_tokens, completion_tokens, tools, train reason)
EXPECTED = {
    "c-chat": ("chat", 3, 2, ["calculator", "search"], None),
    "c-resp": ("responses", 3, 2, ["get_weather"], None),
    "c-msg": ("messages", 3, 2, ["calc"], None),
    "c-comp": ("completions", 3, 2, [], None),
    "c-pass": ("passthrough", None, None, [], "pass-through call (no token ids)"),
    "c-frozen": ("chat", None, None, ["calculator", "search"], "frozen route (model judge)"),
    "c-eval": ("chat", 3, 2, ["calculator", "search"], "evaluation call (X-Trainwire-Train: false)"),
    "c-fail": ("chat", None, None, ["calculator", "search"], "failed upstream call (status 502)"),
    "c-notok": ("chat", None, None, ["calculator", "search"], "no token ids recorded"),
    "c-abort": ("chat", 3, 0, ["calculator", "search"], "aborted without tokens"),
    "c-samp": ("chat", 3, 2, ["calculator", "search"], "sampling: temperature 0.7 differs from the training value 1.0"),
    "c-nolp": ("chat", 3, 2, ["calculator", "search"], "no logprobs recorded"),
}


def _populate_apis(url: str) -> None:
    t0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    at = lambda i: t0 + timedelta(seconds=i)  # noqa: E731
    s = "apis-1"
    none = {"prompt_token_ids": None, "completion_token_ids": None, "logprobs": None}
    rows = [
        _row("c-chat", s, at(0), stream=True),
        _row(
            "c-resp",
            s,
            at(1),
            kind="responses",
            path="/v1/responses",
            request=RESPONSES_REQUEST,
            response=RESPONSES_ANSWER,
        ),
        _row(
            "c-msg", s, at(2), kind="messages", path="/v1/messages", request=MESSAGES_REQUEST, response=MESSAGES_ANSWER
        ),
        _row(
            "c-comp",
            s,
            at(3),
            kind="completion",
            path="/v1/completions",
            request={"prompt": "Once upon"},
            response={"choices": [{"text": " a time"}]},
        ),
        _row(
            "c-pass",
            s,
            at(4),
            kind="other",
            route="passthrough",
            trainable=False,
            path="/v1/embeddings",
            request={"model": "policy", "input": "embed me"},
            response={"data": []},
            **none,
        ),
        _row("c-frozen", s, at(5), route="frozen", trainable=False, model_requested="judge", **none),
        _row("c-eval", s, at(6), trainable=False),
        _row("c-fail", s, at(7), status_code=502, error="upstream down", response=None, **none),
        _row("c-notok", s, at(8), **none),
        _row("c-abort", s, at(9), aborted=True, completion_token_ids=[], logprobs=[]),
        _row(
            "c-samp",
            s,
            at(10),
            sampling=SAMPLING,
            untrainable_reason="sampling: temperature 0.7 differs from the training value 1.0",
        ),
        _row("c-nolp", s, at(11), logprobs=None),
        _row("clean-1", "apis-clean", at(20)),
        _row("evalonly-1", "apis-evalonly", at(30), trainable=False),  # meant for evaluation: not counted
        _row("failedeval-1", "apis-failed-eval", at(40), trainable=False, status_code=500, **none),
    ]
    for i, r in enumerate(rows):
        r["seq"] = i
    dbread.insert_calls(url, rows)


def test_every_api_and_why_a_call_is_not_trained(proxy, db_url):
    _populate_apis(db_url)
    detail = get(proxy, "/sessions/apis-1").json()
    calls = {c["id"]: c for c in detail["calls"]}
    assert list(calls) == list(EXPECTED)
    for call_id, (api, n_prompt, n_completion, tools, reason) in EXPECTED.items():
        c = calls[call_id]
        assert (c["api"], c["prompt_tokens"], c["completion_tokens"], c["tools"]) == (
            api,
            n_prompt,
            n_completion,
            tools,
        ), call_id
        assert c["train"] == {"trainable": reason is None, "reason": reason}, call_id
        assert "prompt_token_ids" not in c and "logprobs" not in c  # counts, never the arrays, without tokens=
    assert calls["c-chat"]["stream"] is True and calls["c-resp"]["stream"] is False
    assert calls["c-samp"]["sampling"] == SAMPLING and calls["c-chat"]["sampling"] is None
    assert calls["c-chat"]["input_messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "c-chat"},
    ]
    assert calls["c-resp"]["input_messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "fc_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "fc_1"},
    ]
    assert calls["c-resp"]["input"] == {"role": "tool", "content": "sunny", "tool_call_id": "fc_1"}
    assert calls["c-resp"]["output"] == {"content": "Sunny."}
    assert calls["c-msg"]["input_messages"] == [
        {"role": "system", "content": "You are a calculator."},
        {"role": "user", "content": "2+2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "toolu_1", "name": "calc", "arguments": '{"e": "2+2"}'}],
        },
        {"role": "tool", "content": "4", "tool_call_id": "toolu_1"},
    ]
    assert calls["c-msg"]["output"] == {
        "content": "It is 4.",
        "tool_calls": [{"id": "toolu_2", "name": "calc", "arguments": '{"e": "4"}'}],
    }
    assert calls["c-comp"]["input_messages"] == [{"role": "prompt", "content": "Once upon"}]
    assert calls["c-pass"]["input_messages"] == [] and calls["c-pass"]["output"] is None
    # the same per call, with the whole request and the arrays on request
    one = get(proxy, "/calls/c-resp", tokens="true").json()
    assert {k: one[k] for k in ("api", "tools", "input_messages", "train", "prompt_tokens")} == {
        k: calls["c-resp"][k] for k in ("api", "tools", "input_messages", "train", "prompt_tokens")
    }
    assert one["request"] == RESPONSES_REQUEST and one["prompt_token_ids"] == [1, 2, 3]
    assert get(proxy, "/calls/c-fail").json()["train"]["reason"] == "failed upstream call (status 502)"

    # Sessions count failed calls, and trainable calls that will not be trained (the SQL rule agrees with
    # each call's `train`, on both databases).
    untrained = [c for c in detail["calls"] if c["trainable"] and not c["train"]["trainable"]]
    assert detail["n_failed"] == 1 and detail["n_untrainable"] == len(untrained) == 5
    listed = {x["id"]: x for x in get(proxy, "/sessions").json()["data"]}
    assert {k: (v["n_failed"], v["n_untrainable"]) for k, v in listed.items()} == {
        "apis-1": (1, 5),
        "apis-clean": (0, 0),
        "apis-evalonly": (0, 0),
        "apis-failed-eval": (1, 0),
    }

    ids = lambda **p: [x["id"] for x in get(proxy, "/sessions", **p).json()["data"]]  # noqa: E731
    assert ids(has="failed") == ["apis-failed-eval", "apis-1"]
    assert ids(has="untrainable") == ["apis-1"]
    assert ids(has="failed,untrainable") == ["apis-1"] == ids(has=["failed", "untrainable"])
    assert ids(has="") == ids() == ["apis-failed-eval", "apis-evalonly", "apis-clean", "apis-1"]
    assert ids(has="failed", limit=1) == ["apis-failed-eval"]
    page = get(proxy, "/sessions", has="failed", limit=1).json()
    assert [x["id"] for x in get(proxy, "/sessions", has="failed", cursor=page["next_cursor"]).json()["data"]] == [
        "apis-1"
    ]
    err = assert_openai_error(get(proxy, "/sessions", has="broken"), 400, "has must be one of failed, untrainable")
    assert err["param"] == "has"
    assert_openai_error(get(proxy, "/sessions", has=["failed", "nope"]), 400, "'nope'")

    stats = get(proxy, "/stats").json()["calls"]
    assert stats == {
        "total": 15,
        "trainable": 10,
        "failed": 2,
        "untrainable": 5,
        "by_api": {"chat": 11, "completions": 1, "messages": 1, "passthrough": 1, "responses": 1},
    }


# --- hostile input: never a 5xx, and the connection stays usable ---------------------------------------------


def _cursor(*values) -> str:
    import base64

    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode().rstrip("=")


BIG = str(2**63)
HOSTILE = [  # (path, params or None, expected status or statuses)
    ("/sessions", {"offset": BIG}, 400),
    ("/sessions", {"offset": str(2**64)}, 400),
    ("/sessions", {"offset": str(2**62)}, 200),
    ("/sessions", {"offset": "-1"}, 400),
    ("/sessions", {"limit": BIG}, 400),
    ("/sessions", {"limit": "-5"}, 400),
    ("/sessions", {"limit": "1001"}, 400),
    ("/rewards", {"offset": BIG}, 400),
    ("/rewards", {"limit": BIG}, 400),
    ("/train/steps", {"offset": BIG}, 400),
    ("/policy/versions", {"offset": str(2**64)}, 400),
    # cursors whose values have the wrong type, or overflow the key column
    ("/rewards", {"cursor": _cursor(2**63)}, 400),
    ("/rewards", {"cursor": _cursor(-(2**63) - 1)}, 400),
    ("/rewards", {"cursor": _cursor(10**40)}, 400),
    ("/rewards", {"cursor": _cursor("7")}, 400),
    ("/rewards", {"cursor": _cursor(2**63 - 1)}, 200),
    ("/train/steps", {"cursor": _cursor(2**31)}, 400),
    ("/train/steps", {"cursor": _cursor(2**63)}, 400),
    ("/policy/versions", {"cursor": _cursor(2**31)}, 400),
    ("/policy/versions", {"cursor": _cursor(True)}, 400),
    ("/train/steps", {"cursor": _cursor(2**31 - 1)}, 200),
    ("/sessions", {"cursor": _cursor(123, "s")}, 400),
    ("/sessions", {"cursor": _cursor("2026-01-01T00:00:00", 5)}, 400),
    ("/sessions", {"cursor": _cursor("0001-01-01T00:00:00+05:00", "s")}, 400),
    ("/sessions", {"cursor": _cursor("9999-12-31T23:59:59-05:00", "s")}, 400),
    ("/sessions", {"cursor": _cursor("2026-01-01T00:00:00", "a\x00b")}, 400),
    ("/sessions", {"cursor": _cursor("2026-01-01T00:00:00Z", "s")}, 200),
    ("/sessions", {"cursor": "ünï\x00"}, 400),
    ("/sessions", {"cursor": "%%"}, 400),
    # times near the calendar's ends, with and without a UTC offset
    ("/sessions", {"since": "0001-01-01T00:00:00+05:00"}, 400),
    ("/sessions", {"until": "9999-12-31T23:59:59-05:00"}, 400),
    ("/sessions", {"since": "0001-01-01T00:00:00"}, 200),
    ("/sessions", {"until": "9999-12-31T23:59:59.999999Z"}, 200),
    ("/sessions", {"since": "0001-01-01T00:00:00+00:00", "until": "9999-12-31T23:59:59+00:00"}, 200),
    ("/sessions", {"since": "1e20"}, 400),
    ("/sessions", {"since": "-1e20"}, 400),
    ("/sessions", {"until": "nan"}, 400),
    ("/sessions", {"until": "inf"}, 400),
    ("/sessions", {"since": "\x00"}, 400),
    # NUL characters in filter values and ids
    ("/sessions", {"task": "\x00"}, 400),
    ("/sessions", {"agent": "bob\x00"}, 400),
    ("/sessions", {"status": "\x00"}, 400),
    ("/sessions", {"has": "\x00"}, 400),
    ("/rewards", {"session_id": "s\x00"}, 400),
    ("/rewards", {"source": "\x00"}, 400),
    ("/calls/%00", None, (400, 404)),
    ("/calls/a%00b", None, (400, 404)),
    ("/sessions/%00", None, (400, 404)),
    ("/sessions/a%00b", None, (400, 404)),
    # what URLs make of lone surrogates and other invalid UTF-8 (decoded as U+FFFD)
    ("/calls/%ED%A0%80", None, 404),
    ("/calls/%FF%FE", None, 404),
    ("/sessions?agent=%ED%A0%80", None, 200),
    ("/rewards?source=%ED%B2%80&session_id=%C0", None, 200),
    # integer-looking ids of 2^63 and more, booleans that are not
    (f"/calls/{BIG}", None, 404),
    (f"/sessions/{2**64}", None, 404),
    ("/calls/" + "9" * 400, None, 404),
    ("/sessions/apis-1", {"tokens": BIG}, 400),
    ("/rewards", {"final": BIG}, 400),
    ("/rewards", {"orphaned": "\x00"}, 400),
    ("/sessions", {"agent": "a" * 20000}, 200),
]


def test_hostile_input_never_gets_a_5xx_and_keeps_the_connection(proxy, db_url):
    _populate_apis(db_url)
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        assert client.get("/stats").status_code == 200
        first = client.get("/stats")
        addr = first.extensions["network_stream"].get_extra_info("client_addr")
        for path, params, expected in HOSTILE:
            r = client.get(path, params=params)
            where = (path, params, r.status_code, r.text[:300])
            assert r.status_code < 500, where
            assert r.status_code in (expected if isinstance(expected, tuple) else (expected,)), where
            if r.status_code >= 400:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}, where
                assert isinstance(err["message"], str) and err["type"] in ("invalid_request_error", "not_found_error")
            assert r.headers.get("connection") != "close", where
            ok = client.get("/sessions", params={"limit": 1})  # the same keep-alive connection still serves
            assert ok.status_code == 200 and ok.json()["object"] == "list", where
            assert ok.extensions["network_stream"].get_extra_info("client_addr") == addr, where


def test_fuzzed_query_parameters_never_get_a_5xx(proxy, db_url):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    _populate_apis(db_url)
    post(proxy, "/reward", {"session_id": "apis-1", "reward": 0.5})
    text = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
    number = st.integers(min_value=-(2**80), max_value=2**80).map(str)
    scalar = st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70),
        st.text(max_size=12),
        st.none(),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False),
    )
    cursor = st.lists(scalar, max_size=3).map(lambda v: _cursor(*v))
    special = st.sampled_from(
        [
            "",
            "true",
            "false",
            "open",
            "finished",
            "failed",
            "untrainable",
            "failed,untrainable",
            "0001-01-01T00:00:00+05:00",
            "9999-12-31T23:59:59-01:00",
            "2026-05-01T12:00:00Z",
            "1e300",
            "-0",
            "apis-1",
            "user",
            "\x00",
            BIG,
        ]
    )
    value = st.one_of(text, number, cursor, special)
    names = {
        "/sessions": ["status", "task", "agent", "since", "until", "has", "limit", "cursor", "offset"],
        "/rewards": ["session_id", "source", "final", "orphaned", "limit", "cursor", "offset"],
    }

    with httpx.Client(base_url=proxy.url, timeout=30) as client:

        @settings(
            max_examples=200,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(path=st.sampled_from(sorted(names)), data=st.data())
        def check(path, data):
            keys = st.sampled_from(names[path] + ["junk"])
            params = data.draw(st.lists(st.tuples(keys, value), max_size=5))
            r = client.get(path, params=params)
            assert r.status_code < 500, (path, params, r.text[:300])
            body = r.json()
            if r.status_code >= 400:
                assert set(body["error"]) == {"message", "type", "param", "code"}, (path, params, body)
            else:
                assert body["object"] == "list"

        check()

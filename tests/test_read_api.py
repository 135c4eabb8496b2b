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
    plan = [("s-a", "t1", "alice"), ("s-b", "t1", "bob"), ("s-c", "t2", "alice"), ("s-d", "t2", "carol"),
            ("s-e", "t3", "bob")]
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

    for params, needle, param in [({"status": "done"}, "status must be one of", "status"),
                                  ({"since": "yesterday"}, "ISO 8601", "since"),
                                  ({"cursor": "not-a-cursor"}, "not a cursor", "cursor"),
                                  ({"limit": "0"}, "limit", "limit"), ({"limit": "abc"}, "limit", "limit")]:
        err = assert_openai_error(get(pg_proxy, "/sessions", **params), 400, needle)
        assert err["param"] == param


def test_session_detail_has_calls_in_order_with_rewards_and_text(pg_proxy, upstream, pg_url):
    sid = "team/alpha:run-1"  # ids may carry '/', the path routes take them whole
    upstream.script(tool_calls=[{"name": "calculator", "arguments": '{"expression": "2+2"}'}])
    first = chat(pg_proxy, sid, "what is 2+2?", tools=TOOLS)
    history = [{"role": "user", "content": "what is 2+2?"},
               tool_call_msg("chatcmpl-tool-0", "calculator", '{"expression": "2+2"}'),
               {"role": "tool", "tool_call_id": "chatcmpl-tool-0", "content": [{"type": "text", "text": "4"}]}]
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
    assert one["output"] == {"content": None, "tool_calls": [
        {"id": "chatcmpl-tool-0", "name": "calculator", "arguments": '{"expression": "2+2"}'}]}
    assert two["input"] == {"role": "tool", "content": "4", "tool_call_id": "chatcmpl-tool-0"}
    assert two["output"] == {"content": "It is 4."}
    assert [(r["value"], r["final"]) for r in one["rewards"]] == [(0.3, False)] and two["rewards"] == []
    assert [(r["value"], r["final"]) for r in detail["rewards"]] == [(0.3, False), (1.0, True)]
    # Token ids only when asked for.
    assert "completion_token_ids" not in one and "request" not in one
    with_tokens = get(pg_proxy, f"/sessions/{sid}", tokens="true").json()["calls"][1]
    rows = {r["id"]: r for r in dbread.calls(pg_url, sid)}
    assert with_tokens["completion_token_ids"] == rows[c2]["completion_token_ids"] == upstream.tokenize("It is 4.")
    assert with_tokens["prompt_token_ids"] == rows[c2]["prompt_token_ids"]
    assert with_tokens["logprobs"] == pytest.approx(rows[c2]["logprobs"])
    # The read routes take ids with '/', yet do not shadow the OpenAI routes under /sessions/{id}/v1/.
    r = httpx.post(f"{pg_proxy.url}/sessions/plain-1/v1/chat/completions",
                   json={"model": "policy", "messages": [{"role": "user", "content": "again"}]})
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
    return {"id": f"syn-{i}", "session_id": session, "seq": 0, "task_id": None, "agent_name": "syn",
            "trainable": True, "kind": "chat", "path": "/v1/chat/completions", "stream": False,
            "model_requested": "policy", "model_served": f"v{version}", "route": "policy", "upstream": None,
            "policy_version": version, "request": {"messages": [{"role": "user", "content": str(i)}]},
            "response": None, "prompt_token_ids": [1, 2], "completion_token_ids": [3], "logprobs": [-0.5],
            "finish_reason": "stop", "usage": None, "status_code": 200 if i % 5 else 500, "error": None,
            "aborted": False, "started_at": started, "finished_at": started, "upstream_ms": 1.0, "ttft_ms": None,
            "overhead_ms": 0.1}


def test_stats_counts_and_reward_mean_by_policy_version(pg_proxy, upstream, pg_url):
    # Sessions served by versions 1 and 2 (written the way the proxy's write path writes them).
    now = datetime.now(UTC)
    calls = [_synthetic_call(i, f"v{1 + i % 2}-s{i}", 1 + i % 2, now + timedelta(milliseconds=i)) for i in range(6)]
    dbread.insert_calls(pg_url, calls)
    rewards = {"v1-s0": 1.0, "v1-s2": 0.0, "v2-s1": 0.5, "v2-s3": 1.0, "v2-s5": None}
    for sid, value in rewards.items():
        r = post(pg_proxy, "/reward", {"session_id": sid, "reward": value}) if value is not None else \
            post(pg_proxy, f"/sessions/{sid}/finish")
        assert r.status_code == 200, r.text
    post(pg_proxy, "/reward", {"session_id": "v1-s0", "reward": -0.2, "call_id": "syn-0"})
    post(pg_proxy, "/reward", {"session_id": "nobody", "reward": 3})
    stats = get(pg_proxy, "/stats").json()
    assert stats["sessions"] == {"open": 1, "finished": 5, "claimed": 0, "trained": 0, "skipped": 0, "total": 6}
    assert stats["calls"] == {"total": 6, "trainable": 6, "failed": 2}
    assert stats["rewards"]["total"] == 7 and stats["rewards"]["final"] == 6
    assert stats["rewards"]["intermediate"] == 1 and stats["rewards"]["finished_without_reward"] == 1
    assert stats["rewards"]["orphaned"] == stats["orphaned_rewards"] == 1
    assert stats["rewards"]["by_source"]["user"]["mean_intermediate"] == pytest.approx(-0.2)
    assert stats["reward_by_policy_version"] == [
        {"policy_version": 1, "sessions": 2, "rewarded": 2, "mean": pytest.approx(0.5)},
        {"policy_version": 2, "sessions": 3, "rewarded": 2, "mean": pytest.approx(0.75)}]
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
    assert json.dumps(get(pg_proxy, "/rewards", source="user").json()["data"]) == \
        json.dumps(get(pg_proxy, "/rewards", limit=50).json()["data"])


def test_openapi_documents_the_answers(pg_proxy):
    doc = get(pg_proxy, "/openapi.json").json()
    schemas = doc["components"]["schemas"]

    def answer(path: str, method: str = "get") -> dict:
        return doc["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]

    assert answer("/sessions") == {"$ref": "#/components/schemas/Page_SessionSummary_"}
    assert {s["$ref"] for s in answer("/sessions/{session_id}")["anyOf"]} == {
        "#/components/schemas/SessionDetail", "#/components/schemas/OrphanedSession"}
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

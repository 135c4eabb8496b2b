"""Automatic intermediate rewards on recorded tool-call sessions (real proxy, real Postgres)."""

from __future__ import annotations

import asyncio
from datetime import UTC

import pytest

from tests.support import dbread
from tests.support.apihelpers import TOOLS, chat, get, start, tool_call_msg, wait_for, wait_rewards


@pytest.fixture
def pg_proxy(start_proxy, upstream, pg_url, tmp_path):
    p = start(start_proxy, upstream, pg_url, tmp_path)
    yield p
    p.stop()


def _air(url: str) -> list[dict]:
    return [r for r in dbread.rewards(url) if r["source"] != "user"]


def _stream_chat(proxy, session: str, **body) -> str:
    import httpx

    with httpx.stream(
        "POST",
        f"{proxy.v1}/chat/completions",
        headers={"X-Session-Id": session},
        timeout=30,
        json={"model": "policy", "stream": True, "messages": [{"role": "user", "content": "go"}], **body},
    ) as r:
        assert r.status_code == 200
        b"".join(r.iter_raw())
        return r.headers["x-call-id"]


def test_invalid_tool_calls(pg_proxy, upstream, pg_url):
    upstream.script(tool_calls=[{"name": "calculator", "arguments": '{"expression": "2+'}])
    bad_json = chat(pg_proxy, "inv", tools=TOOLS).headers["x-call-id"]
    upstream.script(tool_calls=[{"name": "delete_everything", "arguments": "{}"}])
    unknown = chat(pg_proxy, "inv", tools=TOOLS).headers["x-call-id"]
    upstream.script(tool_calls=[{"name": "calculator", "arguments": '{"expression": "1"}'}])
    fine = chat(pg_proxy, "inv", tools=TOOLS).headers["x-call-id"]
    upstream.script(tool_calls=[{"name": "search", "arguments": "[1, 2]"}])
    streamed = _stream_chat(pg_proxy, "inv", tools=TOOLS)
    upstream.script(tool_calls=[{"name": "search", "arguments": '{"q": "a"}'}, {"name": "search", "arguments": "nope"}])
    second_of_two = chat(pg_proxy, "inv", tools=TOOLS).headers["x-call-id"]
    upstream.script(tool_calls=[{"name": "calculator", "arguments": "{}"}])
    no_tools_offered = chat(pg_proxy, "inv").headers["x-call-id"]
    rows = wait_rewards(pg_url, 5, source="invalid_tool_call")
    dbread.wait_calls(pg_url, 6)
    by_call = {}
    for r in _air(pg_url):
        by_call.setdefault(r["call_id"], []).append(r)
    assert set(by_call) == {bad_json, unknown, streamed, second_of_two, no_tools_offered}
    assert fine not in by_call
    for call_rewards in by_call.values():
        assert len(call_rewards) == 1
        r = call_rewards[0]
        assert r["value"] == -0.5 and r["final"] is False and r["session_id"] == "inv"
        assert r["source"] == "invalid_tool_call" and r["idempotency_key"].startswith("air:invalid_tool_call:")
    problems = lambda call: " ".join(by_call[call][0]["metadata"]["problems"])  # noqa: E731
    assert "not valid JSON" in problems(bad_json)
    assert "'delete_everything' is not among the request's tools (calculator, search)" in problems(unknown)
    assert "not a JSON object" in problems(streamed)
    assert by_call[second_of_two][0]["metadata"]["tool_call_id"] == "chatcmpl-tool-1"
    assert "none offered" in problems(no_tools_offered)
    assert len(rows) == 5


def test_truncated_responses(pg_proxy, upstream, pg_url):
    upstream.script(finish_reason="length")
    cut = chat(pg_proxy, "trunc", max_tokens=5).headers["x-call-id"]
    whole = chat(pg_proxy, "trunc").headers["x-call-id"]
    upstream.script(finish_reason="length")
    cut_stream = _stream_chat(pg_proxy, "trunc")
    rows = wait_rewards(pg_url, 2, source="truncated")
    dbread.wait_calls(pg_url, 3)
    assert sorted(r["call_id"] for r in _air(pg_url)) == sorted([cut, cut_stream])
    assert all(r["value"] == -0.2 and not r["final"] for r in rows)
    assert next(r for r in rows if r["call_id"] == cut)["metadata"]["max_tokens"] == 5
    assert whole not in {r["call_id"] for r in rows}


def _turn(
    proxy,
    upstream,
    session: str,
    messages: list[dict],
    *,
    answer_tool: tuple[str, str] | None = None,
    answer_text: str = "done",
) -> str:
    if answer_tool:
        upstream.script(tool_calls=[{"name": answer_tool[0], "arguments": answer_tool[1]}])
    else:
        upstream.script(text=answer_text)
    r = chat(proxy, session, messages=messages, tools=TOOLS)
    assert r.status_code == 200
    return r.headers["x-call-id"]


def test_tool_error_goes_to_the_call_that_made_the_tool_call(pg_proxy, upstream, pg_url):
    s = "tools-err"
    h = [{"role": "user", "content": "compute 1/0, then search"}]
    # The scripted upstream names every first tool call "chatcmpl-tool-0", so ids repeat across calls: the
    # rule must tell the calls apart by where the tool call sits in the history.
    call1 = _turn(pg_proxy, upstream, s, h, answer_tool=("calculator", '{"expression": "1/0"}'))
    h += [
        tool_call_msg("chatcmpl-tool-0", "calculator", '{"expression": "1/0"}'),
        {"role": "tool", "tool_call_id": "chatcmpl-tool-0", "content": "Error: division by zero"},
    ]
    call2 = _turn(pg_proxy, upstream, s, h, answer_tool=("search", '{"q": "x"}'))
    h += [
        tool_call_msg("chatcmpl-tool-0", "search", '{"q": "x"}'),
        {"role": "tool", "tool_call_id": "chatcmpl-tool-0", "content": '{"results": [], "error": "timeout"}'},
    ]
    call3 = _turn(pg_proxy, upstream, s, h, answer_tool=("calculator", '{"expression": "3"}'))
    h += [
        tool_call_msg("chatcmpl-tool-0", "calculator", '{"expression": "3"}'),
        {"role": "tool", "tool_call_id": "chatcmpl-tool-0", "content": '{"error": null, "result": 3}'},
    ]
    call4 = _turn(pg_proxy, upstream, s, h, answer_tool=("search", '{"q": "y"}'))
    h += [
        tool_call_msg("chatcmpl-tool-0", "search", '{"q": "y"}'),
        {"role": "tool", "tool_call_id": "chatcmpl-tool-0", "content": [{"type": "text", "text": "3 results"}]},
    ]
    call5 = _turn(pg_proxy, upstream, s, h)
    dbread.wait_calls(pg_url, 5, s)
    rows = [r for r in _air(pg_url) if r["source"] == "tool_error"]
    # Every later request resent the earlier error messages: still one reward per failed tool call.
    assert sorted((r["call_id"], r["metadata"]["answered_in"]) for r in rows) == sorted(
        [(call1, call2), (call2, call3)]
    )
    assert all(r["value"] == -0.2 and r["final"] is False and r["session_id"] == s for r in rows)
    assert next(r for r in rows if r["call_id"] == call1)["metadata"]["tool_message"] == "Error: division by zero"
    assert {call3, call4, call5}.isdisjoint(r["call_id"] for r in rows)
    # Visible in the read API, on the call they judge.
    detail = get(pg_proxy, f"/sessions/{s}").json()
    assert [r["source"] for r in detail["calls"][0]["rewards"]] == ["tool_error"]


def test_tool_error_found_in_the_store_after_a_restart(start_proxy, upstream, pg_url, tmp_path):
    first = start(start_proxy, upstream, pg_url, tmp_path)
    s = "restart-err"
    h = [{"role": "user", "content": "look it up"}]
    call1 = _turn(first, upstream, s, h, answer_tool=("search", '{"q": "z"}'))
    first.stop()  # the new process has no memory of call1's tool call
    second = start(start_proxy, upstream, pg_url, tmp_path)
    h += [
        tool_call_msg("chatcmpl-tool-0", "search", '{"q": "z"}'),
        {"role": "tool", "tool_call_id": "chatcmpl-tool-0", "content": "Error: search backend down"},
        tool_call_msg("call-unknown", "search", '{"q": "w"}'),
        {"role": "tool", "tool_call_id": "call-unknown", "content": "Error: nobody made this call"},
    ]
    call2 = _turn(second, upstream, s, h)
    rows = wait_rewards(pg_url, 1, source="tool_error")
    assert [(r["call_id"], r["metadata"]["answered_in"]) for r in rows] == [(call1, call2)]
    # A tool message no recorded call answers to is logged, not guessed.
    wait_for(
        lambda: "no recorded call of session 'restart-err' made tool call 'call-unknown'" in second.log_tail(),
        what="the log line",
    )
    assert len([r for r in _air(pg_url) if r["source"] == "tool_error"]) == 1
    second.stop()


def test_rules_are_configurable(start_proxy, upstream, pg_url, tmp_path):
    p = start(
        start_proxy,
        upstream,
        pg_url,
        tmp_path,
        "--air-truncated",
        "off",
        "--air-invalid-tool-call",
        "1.5",
        "--air-tool-error-pattern",
        r"FAILED\b",
    )
    s = "cfg"
    upstream.script(finish_reason="length", tool_calls=[{"name": "nope", "arguments": "{}"}])
    call1 = chat(p, s, tools=TOOLS).headers["x-call-id"]
    h = [
        {"role": "user", "content": "hi"},
        tool_call_msg("chatcmpl-tool-0", "nope", "{}"),
        {"role": "tool", "tool_call_id": "chatcmpl-tool-0", "content": "Error: not matched by the custom pattern"},
    ]
    _turn(p, upstream, s, h, answer_tool=("search", "{}"))
    h += [
        tool_call_msg("chatcmpl-tool-0", "search", "{}"),
        {"role": "tool", "tool_call_id": "chatcmpl-tool-0", "content": "search FAILED (quota)"},
    ]
    call3 = _turn(p, upstream, s, h)
    dbread.wait_calls(pg_url, 3, s)
    rows = sorted((r["source"], r["value"], r["call_id"]) for r in _air(pg_url))
    call2 = dbread.calls(pg_url, s)[1]["id"]
    assert rows == sorted([("invalid_tool_call", 1.5, call1), ("tool_error", -0.2, call2)])
    assert call3 not in {r[2] for r in rows}
    p.stop()


def test_air_rewards_are_removable(pg_proxy, upstream, pg_url):
    import httpx

    for _ in range(3):
        upstream.script(finish_reason="length")
        chat(pg_proxy, "rm")
    upstream.script(tool_calls=[{"name": "nope", "arguments": "{}"}])
    chat(pg_proxy, "rm", tools=TOOLS)
    wait_rewards(pg_url, 3, source="truncated")
    wait_rewards(pg_url, 1, source="invalid_tool_call")
    r = httpx.delete(f"{pg_proxy.url}/rewards", params={"source": "truncated"})
    assert r.status_code == 200 and r.json() == {"object": "deleted", "deleted": 3}
    assert [r["source"] for r in dbread.rewards(pg_url)] == ["invalid_tool_call"]
    rid = dbread.rewards(pg_url)[0]["id"]
    assert httpx.delete(f"{pg_proxy.url}/rewards/{rid}").json()["deleted"] == 1
    assert dbread.rewards(pg_url) == []
    assert httpx.delete(f"{pg_proxy.url}/rewards/{rid}").status_code == 404
    assert httpx.delete(f"{pg_proxy.url}/rewards").status_code == 400  # never "everything" by accident


def test_bad_air_setting_stops_the_start(start_proxy, upstream, pg_url, tmp_path):
    with pytest.raises(RuntimeError) as exc:
        start(start_proxy, upstream, pg_url, tmp_path, "--air-truncated", "minus one")
    assert "--air-truncated must be a number or 'off'; got 'minus one'" in str(exc.value)


def test_air_rewards_keep_the_journals_guarantee(pg_url, tmp_path):
    """Database down at shutdown: queued calls and their AIR rewards, and the batch being retried, stay in the
    journal; the next start writes them, and replaying the same journal again stores nothing twice."""
    import shutil
    from datetime import datetime

    from tests.support.ports import free_port
    from trainwire.records import CallRecord, RewardRecord
    from trainwire.store.db import make_engine
    from trainwire.store.journal import Journal
    from trainwire.store.writer import BatchWriter

    def call(i: int) -> CallRecord:
        now = datetime.now(UTC)
        return CallRecord(
            id=f"spool-{i}",
            session_id="spooled",
            seq=i,
            kind="chat",
            path="/v1/chat/completions",
            model_requested="policy",
            model_served="base",
            policy_version=0,
            request={"messages": []},
            prompt_token_ids=[1],
            completion_token_ids=[2],
            logprobs=[-0.1],
            finish_reason="length",
            status_code=200,
            started_at=now,
            finished_at=now,
        )

    def reward(i: int) -> RewardRecord:
        return RewardRecord(
            session_id="spooled",
            call_id=f"spool-{i}",
            value=-0.2,
            final=False,
            source="truncated",
            idempotency_key=f"air:truncated:spool-{i}",
            metadata={"i": i},
            created_at=datetime.now(UTC),
        )

    async def scenario() -> None:
        spool = tmp_path / "journal"
        dead = make_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing")
        writer = BatchWriter(dead, batch_size=2, interval_ms=10, journal=Journal(spool))
        await writer.start()
        for i in range(5):
            writer.begin("spooled")
            writer.submit_reward(reward(i))
            writer.submit(call(i))
        await asyncio.sleep(0.3)  # let the writer take a batch and start retrying it
        await writer.stop(timeout=0.5)
        await dead.dispose()
        files = list(spool.glob("journal-*.jsonl"))
        assert sum(len(f.read_bytes().splitlines()) for f in files) == 10
        backup = tmp_path / "backup"
        shutil.copytree(spool, backup)

        live = make_engine(pg_url)
        for _ in range(2):  # the second time replays the very same files
            w = BatchWriter(live, journal=Journal(spool))
            await w.start()
            await w.stop()
            assert not list(spool.glob("*.jsonl"))
            shutil.rmtree(spool)
            shutil.copytree(backup, spool)
        await live.dispose()

    asyncio.run(scenario())
    assert sorted(c["id"] for c in dbread.calls(pg_url)) == [f"spool-{i}" for i in range(5)]
    rows = dbread.rewards(pg_url)
    assert sorted(r["call_id"] for r in rows) == [f"spool-{i}" for i in range(5)]
    assert all(r["source"] == "truncated" and r["value"] == -0.2 for r in rows)

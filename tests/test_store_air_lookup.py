"""find_tool_call_producers: the store query automatic rewards use to find the call that made a tool call,
on Postgres and SQLite, with calls written the way the proxy's write path writes them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from tests.support import dbread
from trainwire.store.db import make_engine
from trainwire.store.reads.calls import ProducerCandidate, find_tool_call_producers

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def made(*ids: str, content: str | None = None) -> dict:
    tool_calls = [{"id": i, "type": "function", "function": {"name": "calc", "arguments": "{}"}} for i in ids]
    return {"choices": [{"message": {"role": "assistant", "content": content, "tool_calls": tool_calls or None}}]}


def asked(n_messages: int) -> dict:
    return {"messages": [{"role": "user", "content": str(i)} for i in range(n_messages)]}


def call(cid: str, started: datetime, response, *, session: str = "s", seq: int = 0, request=None) -> dict:
    return {
        "id": cid,
        "session_id": session,
        "seq": seq,
        "kind": "chat",
        "path": "/v1/chat/completions",
        "status_code": 200,
        "started_at": started,
        "finished_at": started,
        "request": request or asked(1),
        "response": response,
    }


def find(
    url: str, tool_call_id: str, *, exclude: str = "now", before: datetime = at(10), session: str = "s", limit: int = 50
) -> list[ProducerCandidate]:
    async def go():
        engine = make_engine(url)
        try:
            return await find_tool_call_producers(
                engine,
                session_id=session,
                exclude_call_id=exclude,
                started_before=before,
                tool_call_id=tool_call_id,
                limit=limit,
            )
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_producers_newest_first_within_the_session_and_before_the_call(db_url):
    dbread.insert_calls(
        db_url,
        [
            call("first", at(1), made("tc-1"), request=asked(1)),
            call("again", at(2), made("tc-1", "tc-2"), seq=1, request=asked(3)),
            call("same-time", at(2), made("tc-1"), seq=2, request="not a chat request"),
            call("mentions", at(3), made(content="I will not call tc-1 again"), seq=3),  # text, not a tool call
            call("now", at(10), made("tc-1"), seq=4),  # the call asking: excluded
            call("later", at(11), made("tc-1"), seq=5),  # after it: excluded
            call("elsewhere", at(1), made("tc-1"), session="other"),  # another session
            call("failed", at(4), None, seq=6),
        ],
    )
    found = find(db_url, "tc-1")
    assert [c.call_id for c in found] == ["same-time", "again", "first"]  # by (started_at, seq), newest first
    assert found[0] == ProducerCandidate(call_id="same-time", n_messages=None, tool_call_ids=("tc-1",))
    assert found[1] == ProducerCandidate(call_id="again", n_messages=3, tool_call_ids=("tc-1", "tc-2"))
    assert found[2].n_messages == 1
    assert [c.call_id for c in find(db_url, "tc-2")] == ["again"]
    assert [c.call_id for c in find(db_url, "tc-1", before=at(2))] == ["same-time", "again", "first"]  # inclusive
    assert [c.call_id for c in find(db_url, "tc-1", before=at(1.5))] == ["first"]
    assert [c.call_id for c in find(db_url, "tc-1", exclude="same-time")] == ["now", "again", "first"]
    assert [c.call_id for c in find(db_url, "tc-1", session="other")] == ["elsewhere"]
    assert find(db_url, "tc-9") == [] and find(db_url, "tc-1", session="nobody") == []


def test_ids_with_like_wildcards_match_only_themselves(db_url):
    # With `_` and `%` unescaped, the newer decoy would take the one row `limit` allows and nothing would be found.
    dbread.insert_calls(db_url, [call("real", at(1), made("tc_%x")), call("decoy", at(2), made("tcZ-yx"), seq=1)])
    assert [c.call_id for c in find(db_url, "tc_%x", limit=1)] == ["real"]

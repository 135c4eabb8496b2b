"""Rewards by curl against a real `trainwire serve`, on a real Postgres (and SQLite where it matters)."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from sqlalchemy import text

from tests.support import dbread
from tests.support.apihelpers import assert_openai_error, chat, curl, get, post, start, wait_for
from trainwire.store.db import make_engine


@pytest.fixture
def pg_proxy(start_proxy, upstream, pg_url, tmp_path):
    p = start(start_proxy, upstream, pg_url, tmp_path)
    yield p
    p.stop()


def _sql(url: str, statement: str, **params) -> None:
    async def go():
        engine = make_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text(statement), params)
        finally:
            await engine.dispose()

    asyncio.run(go())


def _session(url: str, sid: str) -> dict:
    return next(s for s in dbread.sessions(url) if s["id"] == sid)


def test_curl_final_reward_closes_the_session(proxy, upstream, db_url):
    r = chat(proxy, "ep-1")
    assert r.status_code == 200
    status, body = curl(
        f"{proxy.url}/reward",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        '{"session_id": "ep-1", "reward": 1.0}',
    )
    assert status == 200, body
    assert body["session_id"] == "ep-1" and body["value"] == 1.0 and body["final"] is True
    assert body["call_id"] is None and body["source"] == "user"
    assert body["duplicate"] is False and body["orphaned"] is False and isinstance(body["id"], int)
    rows = dbread.rewards(db_url)
    assert [(r["id"], r["session_id"], r["value"], r["final"]) for r in rows] == [(body["id"], "ep-1", 1.0, True)]
    sess = _session(db_url, "ep-1")
    assert sess["final_reward"] == 1.0 and sess["finished_at"] is not None and sess["status"] == "open"
    assert get(proxy, "/sessions/ep-1").json()["status"] == "finished"


def test_intermediate_reward_on_a_call_then_final_by_path(pg_proxy, upstream, pg_url):
    first = chat(pg_proxy, "ep-2", "step 1")
    second = chat(pg_proxy, "ep-2", "step 2")
    call_id = first.headers["x-call-id"]
    r = post(
        pg_proxy,
        "/reward",
        {"session_id": "ep-2", "reward": 0.25, "call_id": call_id, "metadata": {"why": "good first step"}},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["call_id"] == call_id and body["final"] is False and body["metadata"] == {"why": "good first step"}
    # An intermediate reward does not close the session.
    assert _session(pg_url, "ep-2")["finished_at"] is None
    r = post(pg_proxy, "/sessions/ep-2/reward", {"reward": -1, "call_id": second.headers["x-call-id"], "final": True})
    assert r.status_code == 200 and r.json()["final"] is True and r.json()["value"] == -1.0
    rows = dbread.rewards(pg_url)
    assert [(r["call_id"], r["value"], r["final"]) for r in rows] == [
        (call_id, 0.25, False),
        (second.headers["x-call-id"], -1.0, True),
    ]
    assert _session(pg_url, "ep-2")["final_reward"] == -1.0


def test_finish_closes_without_reward_and_second_final_is_409(pg_proxy, upstream, pg_url):
    chat(pg_proxy, "ep-3")
    r = post(pg_proxy, "/sessions/ep-3/finish")
    assert r.status_code == 200, r.text
    assert r.json()["value"] is None and r.json()["final"] is True
    sess = _session(pg_url, "ep-3")
    assert sess["finished_at"] is not None and sess["final_reward"] is None
    for path, body in [
        ("/reward", {"session_id": "ep-3", "reward": 1}),
        ("/sessions/ep-3/finish", None),
        ("/sessions/ep-3/reward", {"reward": 2, "final": True}),
    ]:
        err = assert_openai_error(post(pg_proxy, path, body), 409, "ep-3", "already closed")
        assert err["code"] == "session_closed" and err["type"] == "conflict_error"
    # Intermediate rewards are still welcome until the trainer claims the session.
    call_id = dbread.calls(pg_url, "ep-3")[0]["id"]
    assert post(pg_proxy, "/reward", {"session_id": "ep-3", "reward": 0.1, "call_id": call_id}).status_code == 200
    assert [(r["value"], r["final"]) for r in dbread.rewards(pg_url)] == [(None, True), (0.1, False)]


def test_every_bad_input_is_a_4xx_that_stores_nothing(pg_proxy, upstream, pg_url):
    mine = chat(pg_proxy, "mine").headers["x-call-id"]
    theirs = chat(pg_proxy, "theirs").headers["x-call-id"]
    post(pg_proxy, "/reward", {"session_id": "closed", "reward": 1})  # an orphan, closed
    before = dbread.rewards(pg_url)
    J = "application/json"
    cases = [
        # (path, raw body, headers, status, message fragments, param)
        ("/reward", b'{"session_id": "mine", "reward": NaN}', {}, 400, ["reward", "finite", "NaN"], "reward"),
        ("/reward", b'{"session_id": "mine", "reward": Infinity}', {}, 400, ["finite", "Infinity"], "reward"),
        ("/reward", b'{"session_id": "mine", "reward": -Infinity}', {}, 400, ["finite", "-Infinity"], "reward"),
        ("/reward", b'{"session_id": "mine", "reward": 1e999}', {}, 400, ["finite", "Infinity"], "reward"),
        ("/reward", b'{"session_id": "mine", "reward": "1.0"}', {}, 400, ["reward", "a string", "'1.0'"], "reward"),
        ("/reward", b'{"session_id": "mine", "reward": true}', {}, 400, ["reward", "boolean"], "reward"),
        ("/reward", b'{"session_id": "mine", "reward": null}', {}, 400, ["reward", "null"], "reward"),
        ("/reward", b'{"session_id": "mine", "reward": [1]}', {}, 400, ["reward", "array"], "reward"),
        ("/reward", b'{"session_id": "mine"}', {}, 400, ["missing required field 'reward'"], "reward"),
        ("/reward", b'{"reward": 1}', {}, 400, ["missing required field 'session_id'"], "session_id"),
        ("/reward", b'{"session_id": 7, "reward": 1}', {}, 400, ["session_id", "must be a string"], "session_id"),
        ("/reward", b'{"session_id": "has space", "reward": 1}', {}, 400, ["session_id", "'has space'"], "session_id"),
        (
            "/reward",
            b'{"session_id": "mine", "reward": 1, "final": "yes"}',
            {},
            400,
            ["final", "true or false"],
            "final",
        ),
        ("/reward", b'{"session_id": "mine", "reward": 1, "final": 1}', {}, 400, ["final", "true or false"], "final"),
        (
            "/reward",
            b'{"session_id": "mine", "reward": 1, "metadata": [1]}',
            {},
            400,
            ["metadata", "JSON object"],
            "metadata",
        ),
        (
            "/reward",
            b'{"session_id": "mine", "reward": 1, "metadata": {"x": NaN}}',
            {},
            400,
            ["metadata.x", "finite"],
            "metadata",
        ),
        (
            "/reward",
            b'{"session_id": "mine", "reward": 1e13}',
            {},
            400,
            ["reward", "magnitude at most 1e+12"],
            "reward",
        ),
        (
            "/reward",
            b'{"session_id": "mine", "reward": 1, "metadata": {"x": "a\\u0000"}}',
            {},
            400,
            ["metadata.x", "NUL"],
            "metadata",
        ),
        (
            "/reward",
            b'{"session_id": "mine", "reward": 1, "metadata": {"x": "\\ud800"}}',
            {},
            400,
            ["metadata.x", "lone surrogate"],
            "metadata",
        ),
        (
            "/reward",
            b'{"session_id": "mine", "reward": 1, "idempotency_key": "k\\u0000"}',
            {},
            400,
            ["idempotency_key", "NUL"],
            "idempotency_key",
        ),
        ("/reward", b'{"session_id": "mine", "reward": 1, "rewrd": 2}', {}, 400, ["unknown field 'rewrd'"], "rewrd"),
        ("/reward", b'{"session_id": "mine", "reward": 1, "call_id": 5}', {}, 400, ["call_id", "string"], "call_id"),
        (
            "/reward",
            f'{{"session_id": "mine", "reward": 1, "call_id": "{theirs}"}}'.encode(),
            {},
            400,
            [theirs, "belongs to session 'theirs'", "not 'mine'"],
            "call_id",
        ),
        (
            "/reward",
            b'{"session_id": "mine", "reward": 1, "call_id": "call_nope"}',
            {},
            404,
            ["'call_nope'", "not a recorded call"],
            "call_id",
        ),
        ("/reward", b'{"session_id": "closed", "reward": 2}', {}, 409, ["'closed'", "already closed"], "session_id"),
        ("/reward", b'{"session_id": "mine", "reward": 1', {}, 400, ["not valid JSON"], None),
        ("/reward", b"[1, 2]", {}, 400, ["must be a JSON object", "array"], None),
        ("/reward", b"", {}, 400, ["empty"], None),
        (
            "/reward",
            b'{"session_id": "mine", "reward": 1, "idempotency_key": "a"}',
            {"Idempotency-Key": "b"},
            400,
            ["differs from the Idempotency-Key header"],
            "idempotency_key",
        ),
        (
            "/reward",
            b'{"session_id": "mine", "reward": 1, "idempotency_key": 3}',
            {},
            400,
            ["idempotency_key", "string"],
            "idempotency_key",
        ),
        (
            "/reward",
            b'{"session_id": "mine", "reward": 1}',
            {"Idempotency-Key": "air:truncated:x"},
            400,
            ["reserved for automatic rewards"],
            "idempotency_key",
        ),
        (
            "/sessions/mine/reward",
            b'{"session_id": "theirs", "reward": 1}',
            {},
            400,
            ["differs from the one in the path"],
            "session_id",
        ),
        ("/sessions/mine/finish", b'{"reward": 1}', {}, 400, ["takes no 'reward'"], "reward"),
    ]
    for path, raw, headers, status, needles, param in cases:
        r = post(pg_proxy, path, raw=raw, headers={"content-type": J, **headers})
        err = assert_openai_error(r, status, *needles)
        assert err["param"] == param, (raw, err)
    assert dbread.rewards(pg_url) == before
    assert mine != theirs


def test_same_idempotency_key_twice_stores_one_reward(proxy, upstream, db_url):
    chat(proxy, "idem")
    body = {"session_id": "idem", "reward": 0.5, "idempotency_key": "run-17/episode-3"}
    first = post(proxy, "/reward", body)
    second = post(proxy, "/reward", body)
    assert first.status_code == second.status_code == 200
    a, b = first.json(), second.json()
    assert a.pop("duplicate") is False and b.pop("duplicate") is True
    assert a == b
    # The header works the same way, and agrees with a body carrying the same key.
    third = post(
        proxy, "/reward", {"session_id": "idem", "reward": 0.5}, headers={"Idempotency-Key": "run-17/episode-3"}
    )
    assert third.status_code == 200 and third.json()["id"] == a["id"] and third.json()["duplicate"] is True
    assert len(dbread.rewards(db_url)) == 1
    # Same key, different reward: refused, and it says why.
    err = assert_openai_error(
        post(proxy, "/reward", {**body, "reward": 0.75}), 422, "run-17/episode-3", "already used for a different reward"
    )
    assert err["code"] == "idempotency_key_reused"
    assert len(dbread.rewards(db_url)) == 1


def _hammer(url: str, bodies: list[dict], headers: list[dict] | None = None) -> list[httpx.Response]:
    """Post all bodies at the same moment, one thread each."""
    barrier = threading.Barrier(len(bodies))
    out: list[httpx.Response | None] = [None] * len(bodies)

    def go(i: int) -> None:
        with httpx.Client(timeout=60) as client:
            barrier.wait()
            out[i] = client.post(url, json=bodies[i], headers=(headers or [{}] * len(bodies))[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_duplicate_posts_store_exactly_one(proxy, upstream, db_url):
    chat(proxy, "race-idem")
    body = {"session_id": "race-idem", "reward": 1.0}
    responses = _hammer(f"{proxy.url}/reward", [body] * 12, [{"Idempotency-Key": "once"}] * 12)
    assert all(r.status_code == 200 for r in responses), [
        (r.status_code, r.text) for r in responses if r.status_code != 200
    ]
    answers = [r.json() for r in responses]
    assert sum(not a["duplicate"] for a in answers) == 1
    assert len({(a["id"], a["value"], a["final"], a["created_at"]) for a in answers}) == 1
    rows = dbread.rewards(db_url)
    assert len(rows) == 1 and rows[0]["idempotency_key"] == "once"


def test_concurrent_finals_without_keys_store_one(proxy, upstream, db_url):
    chat(proxy, "race-final")
    bodies = [{"session_id": "race-final", "reward": float(i)} for i in range(10)]
    responses = _hammer(f"{proxy.url}/reward", bodies)
    ok = [r for r in responses if r.status_code == 200]
    assert len(ok) == 1, [r.text for r in responses]
    for r in responses:
        if r.status_code != 200:
            assert_openai_error(r, 409, "already closed")
    rows = dbread.rewards(db_url)
    assert len(rows) == 1 and rows[0]["value"] == ok[0].json()["value"]


@pytest.mark.parametrize("stream", [False, True])
def test_reward_right_after_the_response_races_the_write_queue(start_proxy, upstream, pg_url, tmp_path, stream):
    # A long write interval keeps the calls in the queue while the rewards arrive.
    p = start(start_proxy, upstream, pg_url, tmp_path, "--write-interval-ms", "500")
    sid = f"queued-{stream}"
    if stream:
        body = {"model": "policy", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        with httpx.stream("POST", f"{p.v1}/chat/completions", headers={"X-Session-Id": sid}, json=body) as r:
            call_id = r.headers["x-call-id"]
            b"".join(r.iter_raw())
    else:
        call_id = chat(p, sid).headers["x-call-id"]
    inter = post(p, "/reward", {"session_id": sid, "reward": 0.5, "call_id": call_id})
    final = post(p, f"/sessions/{sid}/reward", {"reward": 1.0})
    assert inter.status_code == 200, inter.text
    assert final.status_code == 200, final.text
    assert inter.json()["orphaned"] is False and final.json()["orphaned"] is False
    # The calls were written before the rewards were checked: the session row carries the final reward.
    assert [c["id"] for c in dbread.calls(pg_url, sid)] == [call_id]
    assert _session(pg_url, sid)["final_reward"] == 1.0
    p.stop()


def test_orphaned_reward_is_kept_reported_and_adopted_when_the_session_appears(pg_proxy, upstream, pg_url):
    r = post(pg_proxy, "/reward", {"session_id": "ghost", "reward": 0.9})
    assert r.status_code == 200 and r.json()["orphaned"] is True
    orphans = get(pg_proxy, "/rewards", orphaned="true").json()
    assert [(o["session_id"], o["value"], o["orphaned"]) for o in orphans["data"]] == [("ghost", 0.9, True)]
    stats = get(pg_proxy, "/stats").json()
    assert stats["orphaned_rewards"] == 1 and stats["rewards"]["orphaned_sessions"] == 1
    # Orphans are never a session the trainer could claim, and never count as one.
    assert dbread.sessions(pg_url) == [] and get(pg_proxy, "/sessions").json()["data"] == []
    assert stats["sessions"]["total"] == 0 and stats["reward_by_policy_version"] == []
    detail = get(pg_proxy, "/sessions/ghost").json()
    assert detail["status"] == "orphaned" and detail["final_reward"] == 0.9 and detail["calls"] == []
    # The same reward again (no key): refused, the orphan already closed "ghost".
    assert_openai_error(post(pg_proxy, "/reward", {"session_id": "ghost", "reward": 0.9}), 409, "already closed")
    # The session shows up after all (another worker's queue, say): no longer orphaned, and finished.
    chat(pg_proxy, "ghost")
    wait_for(lambda: dbread.sessions(pg_url), what="the session row")
    sess = _session(pg_url, "ghost")
    assert sess["final_reward"] == 0.9 and sess["finished_at"] is not None
    assert get(pg_proxy, "/rewards", orphaned="true").json()["data"] == []
    assert get(pg_proxy, "/sessions/ghost").json()["status"] == "finished"


def test_rewards_refused_once_the_trainer_claimed_the_session(pg_proxy, upstream, pg_url):
    call_id = chat(pg_proxy, "claimed-1").headers["x-call-id"]
    assert post(pg_proxy, "/reward", {"session_id": "claimed-1", "reward": 1}).status_code == 200
    _sql(pg_url, "UPDATE sessions SET status = 'claimed', claimed_by = 'trainer-a' WHERE id = 'claimed-1'")
    err = assert_openai_error(
        post(pg_proxy, "/reward", {"session_id": "claimed-1", "reward": 0.3, "call_id": call_id}),
        409,
        "already claimed",
    )
    assert err["code"] == "session_claimed"
    assert len(dbread.rewards(pg_url)) == 1
    assert get(pg_proxy, "/sessions/claimed-1").json()["status"] == "claimed"

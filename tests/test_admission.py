"""Admission control (`trainwire serve --max-backlog N`, proxy/admission.py) on a real proxy and Postgres, the
trainer stopped: new sessions get a 429 with Retry-After in their API's error format, sessions already started
(here or in another proxy process) and evaluation calls are served, /stats and /metrics count it, nothing recorded
is lost, and the real OpenAI SDK with its default retries gets through once a trainer claims the backlog. A
scripted upstream stands in for vLLM: what is tested is the proxy's admission, not generation."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai

from tests.support import dbread
from tests.support.apihelpers import assert_openai_error, chat, get, post, start, wait_for
from trainwire.store import claims
from trainwire.store.db import make_engine


def _stats(proxy) -> dict:
    return get(proxy, "/stats").json()["admission"]


def _claim_all(db_url: str) -> int:
    async def claim() -> int:
        engine = make_engine(db_url)
        try:
            got = await claims.claim_batch(engine, worker_id="test-trainer", batch_size=100, group_by_task=False)
            return len(got)
        finally:
            await engine.dispose()

    return asyncio.run(claim())


def test_full_backlog_refuses_only_new_sessions_and_the_sdk_retries_through(start_proxy, upstream, db_url, tmp_path):
    proxy = start(start_proxy, upstream, db_url, tmp_path, "--max-backlog", "2")
    for sid in ("adm-a", "adm-b", "adm-open"):
        assert chat(proxy, sid).status_code == 200
    for sid in ("adm-a", "adm-b"):
        assert post(proxy, "/reward", {"session_id": sid, "reward": 1.0}).status_code == 200
    wait_for(lambda: _stats(proxy)["full"], 10, what="the backlog read as full")
    assert _stats(proxy) == {"max_backlog": 2, "backlog": 2, "full": True, "refused": 0}

    # a new session, with or without an id, in OpenAI's format
    r = chat(proxy, "adm-new")
    err = assert_openai_error(r, 429, "--max-backlog 2", "2 rewarded sessions")
    assert err["type"] == "rate_limit_error" and err["code"] == "backlog_full"
    assert r.headers["retry-after"] == "2"
    assert_openai_error(chat(proxy), 429)
    r = httpx.post(f"{proxy.v1}/responses", json={"model": "policy", "input": "hi"}, timeout=30)
    assert_openai_error(r, 429, "--max-backlog") and r.headers["retry-after"] == "2"
    # in Anthropic's on /v1/messages
    r = httpx.post(
        f"{proxy.v1}/messages",
        json={"model": "policy", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Session-Id": "adm-new-messages", "anthropic-version": "2023-06-01"},
        timeout=60,
    )
    assert r.status_code == 429 and r.headers["retry-after"] == "2", r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "rate_limit_error"

    # sessions already started are served: one still open, one rewarded, one started by another proxy process
    # (no admission there); evaluation calls are never refused
    assert chat(proxy, "adm-open").status_code == 200
    assert chat(proxy, "adm-a").status_code == 200
    other = start(start_proxy, upstream, db_url, tmp_path / "other")
    assert chat(other, "adm-elsewhere").status_code == 200
    wait_for(lambda: dbread.calls(db_url, "adm-elsewhere"), 10, what="the other proxy's call stored")
    assert chat(proxy, "adm-elsewhere").status_code == 200
    assert chat(proxy, "adm-eval", headers={"X-Trainwire-Train": "false"}).status_code == 200

    assert _stats(proxy)["refused"] == 4
    metrics = get(proxy, "/metrics").text
    assert "trainwire_admission_refused_total 4.0" in metrics and "trainwire_backlog_sessions 2.0" in metrics

    # The trainer catches up (claims the backlog) while the OpenAI SDK, default retries, waits out Retry-After.
    client = openai.OpenAI(base_url=proxy.v1, api_key="unused", default_headers={"X-Session-Id": "adm-patient"})
    assert client.max_retries == 2
    claimed: list[int] = []
    trainer = threading.Timer(0.5, lambda: claimed.append(_claim_all(db_url)))
    trainer.start()
    t0 = time.monotonic()
    answer = client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "hi"}])
    waited = time.monotonic() - t0
    trainer.join()
    assert answer.choices[0].message.content is not None
    assert claimed == [2] and waited >= 1.5, (claimed, waited)  # refused once, served after Retry-After
    assert _stats(proxy)["refused"] == 5 and not _stats(proxy)["full"]

    # nothing recorded is lost: every served call is stored, the refused ones never reached the upstream
    served = ["adm-a", "adm-a", "adm-b", "adm-open", "adm-open", "adm-elsewhere", "adm-elsewhere", "adm-eval"]
    stored = wait_for(lambda: (rows := dbread.calls(db_url)) and len(rows) >= 9 and rows, 10, what="9 calls")
    assert sorted(c["session_id"] for c in stored) == sorted([*served, "adm-patient"])
    assert len(upstream.sent) == 9
    assert {s["id"]: s["status"] for s in dbread.sessions(db_url) if s["id"] in ("adm-a", "adm-b")} == {
        "adm-a": "claimed",
        "adm-b": "claimed",
    }


def test_off_by_default(start_proxy, upstream, db_url, tmp_path):
    proxy = start(start_proxy, upstream, db_url, tmp_path)
    assert chat(proxy, "off-a").status_code == 200
    assert post(proxy, "/reward", {"session_id": "off-a", "reward": 1.0}).status_code == 200
    assert chat(proxy, "off-b").status_code == 200
    stats = _stats(proxy)
    assert stats["max_backlog"] == 0 and stats["full"] is False and stats["refused"] == 0
    assert stats["backlog"] == 1  # /stats reads it from the store when admission is off

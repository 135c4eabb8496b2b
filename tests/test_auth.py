"""Keys: `--api-key` for agents, `--admin-key` for rewards, reads and admin; the upstream key never leaves."""

from __future__ import annotations

import httpx
import pytest

from tests.support import dbread
from tests.support.apihelpers import assert_openai_error, chat, curl, get, post, start

AGENT, ADMIN, UPSTREAM = "agent-key-123", "admin-key-456", "upstream-secret-789"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(start_proxy, upstream, pg_url, tmp_path):
    p = start(
        start_proxy,
        upstream,
        pg_url,
        tmp_path,
        "--api-key",
        AGENT,
        "--admin-key",
        ADMIN,
        "--upstream-api-key",
        UPSTREAM,
    )
    yield p
    p.stop()


ADMIN_ROUTES = [
    ("POST", "/reward", {"session_id": "k-1", "reward": 1}),
    ("POST", "/sessions/k-1/reward", {"reward": 1}),
    ("POST", "/sessions/k-1/finish", None),
    ("GET", "/sessions", None),
    ("GET", "/sessions/k-1", None),
    ("GET", "/calls/call_x", None),
    ("GET", "/rewards", None),
    ("GET", "/stats", None),
    ("DELETE", "/rewards?source=user", None),
    ("DELETE", "/rewards/1", None),
    ("GET", "/train/steps", None),
    ("GET", "/policy/versions", None),
    ("GET", "/metrics", None),
]


def _admin_request(proxy, method: str, path: str, body, headers: dict[str, str]) -> httpx.Response:
    return httpx.request(method, f"{proxy.url}{path}", json=body, headers=headers, timeout=30)


def test_agents_need_the_api_key_and_nothing_is_recorded_without_it(keyed, upstream, pg_url):
    for headers in ({}, bearer("wrong"), bearer(ADMIN), {"Authorization": AGENT}):
        r = chat(keyed, "k-1", headers=headers)
        err = assert_openai_error(r, 401, "API key")
        assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    assert_openai_error(httpx.get(f"{keyed.v1}/models"), 401)
    assert upstream.sent == []
    # The right key works (also as X-Api-Key); only those calls are recorded.
    assert chat(keyed, "k-1", headers=bearer(AGENT)).status_code == 200
    assert chat(keyed, "k-1", headers={"X-Api-Key": AGENT}).status_code == 200
    rows = dbread.wait_calls(pg_url, 2)
    assert len(rows) == 2 and {r["session_id"] for r in rows} == {"k-1"}
    assert len(upstream.sent) == 2


def test_admin_routes_need_the_admin_key(keyed, upstream, pg_url):
    chat(keyed, "k-1", headers=bearer(AGENT))
    dbread.wait_calls(pg_url, 1)
    for method, path, body in ADMIN_ROUTES:
        for headers in ({}, bearer(AGENT), bearer("nope")):
            r = _admin_request(keyed, method, path, body, headers)
            assert_openai_error(r, 401, "admin key")
    # Unauthenticated garbage gets 401, not a validation error that would reveal the schema.
    assert post(keyed, "/reward", raw=b"{nope").status_code == 401
    for path in ("/rewards/99999999999999999999", "/train/steps?cursor=!!", "/calls/x%00y", "/sessions?task=%00"):
        method = "DELETE" if path.startswith("/rewards/") else "GET"
        assert_openai_error(httpx.request(method, f"{keyed.url}{path}", timeout=30), 401, "admin key")
    status, body = curl(
        f"{keyed.url}/reward",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        '{"session_id": "k-1", "reward": 1}',
    )
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert dbread.rewards(pg_url) == []
    # With the admin key every route answers.
    status, body = curl(
        f"{keyed.url}/reward",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-H",
        f"Authorization: Bearer {ADMIN}",
        "-d",
        '{"session_id": "k-1", "reward": 1}',
    )
    assert status == 200 and body["value"] == 1.0
    assert get(keyed, "/stats", headers=bearer(ADMIN)).json()["rewards"]["total"] == 1
    assert get(keyed, "/sessions/k-1", headers=bearer(ADMIN)).json()["status"] == "finished"
    metrics = httpx.get(f"{keyed.url}/metrics", headers=bearer(ADMIN))
    assert metrics.status_code == 200 and "trainwire_requests" in metrics.text


def test_upstream_key_is_sent_upstream_and_never_echoed(keyed, upstream, pg_url):
    r = chat(keyed, "k-echo", headers=bearer(AGENT))
    assert r.status_code == 200
    call_id = r.headers["x-call-id"]
    # vLLM gets its own key, never the agent's.
    assert upstream.sent[-1].headers["Authorization"] == f"Bearer {UPSTREAM}"
    assert AGENT not in str(upstream.sent[-1].headers)
    upstream.script(
        status=401,
        error_body={
            "object": "error",
            "message": "upstream refused",
            "type": "Unauthorized",
            "param": None,
            "code": 401,
        },
    )
    failed = chat(keyed, "k-echo", headers=bearer(AGENT))
    assert failed.status_code == 401
    seen = [r.text + str(r.headers), failed.text + str(failed.headers)]
    for path in ("/sessions", "/sessions/k-echo?tokens=true", f"/calls/{call_id}?tokens=true", "/stats", "/rewards"):
        resp = get(keyed, path, headers=bearer(ADMIN))
        assert resp.status_code == 200
        seen.append(resp.text + str(resp.headers))
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        resp = httpx.get(f"{keyed.url}{path}")
        seen.append(resp.text + str(resp.headers))
    dbread.wait_calls(pg_url, 2)
    seen.append(repr(dbread.calls(pg_url)))
    seen.append(keyed.log_tail())
    for text in seen:
        assert UPSTREAM not in text


def test_without_an_admin_key_the_api_key_guards_admin_routes(start_proxy, upstream, pg_url, tmp_path):
    p = start(start_proxy, upstream, pg_url, tmp_path, "--api-key", AGENT)
    assert chat(p, "k-2", headers=bearer(AGENT)).status_code == 200
    assert_openai_error(post(p, "/reward", {"session_id": "k-2", "reward": 1}), 401, "API key")
    assert_openai_error(get(p, "/sessions"), 401)
    assert dbread.rewards(pg_url) == []
    assert post(p, "/reward", {"session_id": "k-2", "reward": 1}, headers=bearer(AGENT)).status_code == 200
    assert get(p, "/sessions", headers=bearer(AGENT)).status_code == 200
    p.stop()


def test_no_keys_means_open(pg_url, start_proxy, upstream, tmp_path):
    p = start(start_proxy, upstream, pg_url, tmp_path)
    assert chat(p, "open-1").status_code == 200
    assert post(p, "/reward", {"session_id": "open-1", "reward": 1}).status_code == 200
    assert get(p, "/stats").status_code == 200
    p.stop()

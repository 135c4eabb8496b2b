"""Helpers for the reward, read, AIR, export and auth tests: requests shaped the way curl sends them."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import httpx

from tests.support import dbread

TOOLS = [
    {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}},
]


def start(start_proxy, upstream, db_url: str, tmp_path, *extra: str, env: dict[str, str] | None = None):
    return start_proxy(
        "--upstream",
        upstream.url,
        "--database-url",
        db_url,
        "--journal-dir",
        str(tmp_path / "journal"),
        *extra,
        env=env,
    )


def chat(
    proxy,
    session: str | None = None,
    content: str = "hi",
    *,
    messages: list | None = None,
    headers: dict[str, str] | None = None,
    **body: Any,
) -> httpx.Response:
    h = dict(headers or {})
    if session:
        h["X-Session-Id"] = session
    payload = {"model": "policy", "messages": messages or [{"role": "user", "content": content}], **body}
    r = httpx.post(f"{proxy.v1}/chat/completions", json=payload, headers=h, timeout=30)
    return r


def post(
    proxy,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> httpx.Response:
    h = {"content-type": "application/json", **(headers or {})}
    content = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    return httpx.post(f"{proxy.url}{path}", content=content, headers=h, timeout=timeout)


def get(proxy, path: str, *, headers: dict[str, str] | None = None, **params: Any) -> httpx.Response:
    return httpx.get(
        f"{proxy.url}{path}", params={k: v for k, v in params.items() if v is not None}, headers=headers, timeout=30
    )


def curl(url: str, *args: str) -> tuple[int, Any]:
    """Run the real curl; returns (HTTP status, parsed JSON body)."""
    out = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", *args, url], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    body, _, status = out.rpartition("\n")
    return int(status), json.loads(body) if body.strip() else None


def assert_openai_error(r: httpx.Response, status: int, *needles: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    for needle in needles:
        assert needle in err["message"], (needle, err["message"])
    return err


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll until `predicate()` returns something truthy; fail after `timeout`."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_rewards(url: str, n: int, timeout: float = 10.0, **match: Any) -> list[dict]:
    def found():
        rows = [r for r in dbread.rewards(url) if all(r[k] == v for k, v in match.items())]
        return rows if len(rows) >= n else None

    return wait_for(found, timeout, what=f"{n} rewards matching {match}")


def tool_call_msg(call_id: str, name: str, arguments: str) -> dict:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}],
    }

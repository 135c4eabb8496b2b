"""An upstream answer that is not what it claims (a non-JSON 200, truncated JSON, a completion sent as text/html)
becomes a 502 in OpenAI's format, recorded as an upstream error, never a made-up answer."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from aiohttp import web

from tests.support import dbread
from tests.support.ports import free_port

COMPLETION = (
    b'{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":'
    b'{"role":"assistant","content":"hi"},"finish_reason":"stop","token_ids":[1]}],"prompt_token_ids":[2],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)
ANSWERS = {
    "html": (b"<html><body>502 Bad Gateway</body></html>", "text/html"),
    "truncated": (COMPLETION[:-20], "application/json"),
    "wrong-type": (COMPLETION, "text/html"),
    "not-a-completion": (b'{"status": "ok"}', "application/json"),
}


class LyingUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.next = "html"

    async def _chat(self, request: web.Request) -> web.Response:
        body, ctype = ANSWERS[self.next]
        return web.Response(body=body, content_type=ctype.split(";")[0])

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model", "parent": None}]})

    def __enter__(self) -> "LyingUpstream":
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_get("/v1/models", self._models)
            self.runner = web.AppRunner(app)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.mark.parametrize("lie", list(ANSWERS))
def test_an_upstream_200_that_is_not_a_completion_is_a_502(lie, start_proxy, sqlite_url, tmp_path):
    with LyingUpstream() as up:
        up.next = lie
        proxy = start_proxy("--upstream", up.url, "--database-url", sqlite_url, "--journal-dir", str(tmp_path / "j"))
        with httpx.Client(timeout=30) as client:
            r = client.post(
                f"{proxy.v1}/chat/completions",
                headers={"X-Session-Id": f"lie-{lie}"},
                json={"model": "policy", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 502, r.text
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "upstream_bad_response"
            assert up.url not in r.text and str(up.port) not in r.text  # no upstream address for the agent
            assert client.get(f"{proxy.url}/healthz").status_code == 200  # the connection is still usable
        (row,) = dbread.wait_calls(sqlite_url, 1, f"lie-{lie}")
        assert row["status_code"] == 502 and row["response"] is None and "not a completion" in row["error"]
        assert row["prompt_token_ids"] is None  # nothing of a made-up answer is kept for training

"""The streams a Responses or Messages client receives from trainwire, byte for byte, against a scripted upstream
(no vLLM): the event sequence of each API, a tool-call-only answer, a client that stops reading once the answer is
whole, and an upstream that answers 200 with something that is not a completion.

One scripted upstream and one proxy (`trainwire serve` subprocess, SQLite) for the module; each test queues what
the upstream answers next and reads what was recorded by the call id the proxy returned."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.support import dbread
from tests.support.proxyproc import ProxyProcess
from tests.support.scripted_upstream import ScriptedUpstream, Sent

TEXT = "The answer is forty-two."
CALC = {"name": "calculator", "arguments": '{"expression": "6 * 7"}'}
RESPONSES_TOOL = {
    "type": "function",
    "name": "calculator",
    "description": "Evaluate arithmetic",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}
MESSAGES_TOOL = {
    "name": "calculator",
    "description": "Evaluate arithmetic",
    "input_schema": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}


class Upstream(ScriptedUpstream):
    """The shared scripted upstream, plus two answers it does not script (configured per request, here only):

    * `raw(status, content_type, body)`: the next chat request gets exactly these bytes (an HTML error page
      behind a 200, truncated JSON);
    * `vllm_text(text, hold_s)`: the next chat stream is shaped like vLLM's: the finish_reason rides on the last
      token chunk (not on a chunk of its own), and the usage chunk and [DONE] follow only after `hold_s`."""

    def __init__(self) -> None:
        super().__init__()
        self._raw: list[tuple[int, str, bytes]] = []
        self._vllm: list[tuple[str, float, float]] = []

    def raw(self, status: int, content_type: str, body: bytes) -> None:
        self._raw.append((status, content_type, body))

    def vllm_text(self, text: str, *, hold_s: float, delay_per_chunk: float = 0.05) -> None:
        self._vllm.append((text, hold_s, delay_per_chunk))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if self._raw:
            req = await request.json()
            status, content_type, body = self._raw.pop(0)
            self.sent.append(Sent(request=req, path=request.path, headers=dict(request.headers), body=body))
            return web.Response(body=body, status=status, headers={"content-type": content_type})
        if self._vllm:
            req = await request.json()
            if req.get("stream"):
                self.sent.append(Sent(request=req, path=request.path, headers=dict(request.headers)))
                return await self._vllm_stream(request, req, *self._vllm.pop(0))
        return await super().chat(request)

    async def _vllm_stream(self, request, req, text: str, hold_s: float, delay: float) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        base = {"id": "chatcmpl-vllm", "object": "chat.completion.chunk", "created": 1700000000, "model": req["model"]}
        prompt = self._prompt_ids(req)
        first = {
            **base,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
            "prompt_token_ids": prompt,
        }
        events = [first]
        pieces = self._pieces(text)
        n = 0
        for k, piece in enumerate(pieces):
            ids = self.tokenize(piece)
            last = k == len(pieces) - 1
            choice = {
                "index": 0,
                "delta": {"content": piece},
                "logprobs": {
                    "content": [
                        {"token": f"t{t}", "logprob": self._logprob(n + j), "bytes": [t], "top_logprobs": []}
                        for j, t in enumerate(ids)
                    ]
                },
                "finish_reason": "stop" if last else None,
                "token_ids": ids,
            }
            if last:
                choice["stop_reason"] = None
            events.append({**base, "choices": [choice]})
            n += len(ids)
        try:
            for ev in events:
                await resp.write(b"data: " + orjson.dumps(ev) + b"\n\n")
                await asyncio.sleep(delay)
            await asyncio.sleep(hold_s)
            usage = {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}
            await resp.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.aborted += 1
            raise
        return resp


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp: Path = tmp_path_factory.mktemp("api-streams")
    db = f"sqlite+aiosqlite:///{tmp}/trainwire.db"  # serve creates the embedded schema itself
    up = Upstream().start()
    proxy = ProxyProcess(
        ["--upstream", up.url, "--database-url", db, "--journal-dir", str(tmp / "journal")], log_path=tmp / "proxy.log"
    )
    proxy.start(timeout=90)
    yield {"proxy": proxy, "up": up, "db": db}
    proxy.stop()
    up.stop()


# --- helpers ------------------------------------------------------------------------------------------------


def parse_sse(raw: bytes) -> list[tuple[str | None, Any]]:
    """(event name, parsed data) per SSE event; each event must be `event:`/`data:` lines ending in a blank line."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    out = []
    for block in raw.split(b"\n\n")[:-1]:
        name, data = None, []
        for line in block.split(b"\n"):
            field, _, value = line.partition(b": ")
            assert field in (b"event", b"data"), line
            if field == b"event":
                name = value.decode()
            else:
                data.append(value)
        payload = b"\n".join(data)
        out.append((name, payload.decode() if payload == b"[DONE]" else json.loads(payload)))
    return out


def call_row(stack, call_id: str, timeout: float = 10.0) -> dict:
    deadline = time.time() + timeout
    while True:
        rows = [r for r in dbread.calls(stack["db"]) if r["id"] == call_id]
        if rows or time.time() > deadline:
            assert rows, f"call {call_id} was not recorded; proxy log:\n{stack['proxy'].log_tail()}"
            return rows[0]
        time.sleep(0.05)


def post_stream(stack, path: str, body: dict, headers: dict | None = None) -> tuple[httpx.Response, bytes]:
    with httpx.stream(
        "POST", f"{stack['proxy'].url}{path}", json={**body, "stream": True}, headers=headers, timeout=30
    ) as r:
        return r, r.read()


def responses_body(**kw) -> dict:
    return {"model": "policy", "instructions": "You are terse.", "input": "What is six times seven?", **kw}


def messages_body(**kw) -> dict:
    return {
        "model": "policy",
        "max_tokens": 64,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "What is six times seven?"}],
        **kw,
    }


def expected_tokens(text: str) -> tuple[list[int], list[float]]:
    """What the scripted upstream generates for a text answer: one id per character, its logprob pattern."""
    ids = ScriptedUpstream.tokenize(text)
    return ids, [-0.125 * ((i % 7) + 1) for i in range(len(ids))]


def tool_tokens(call: dict) -> list[int]:
    return ScriptedUpstream.tokenize(call["name"] + call["arguments"])


# --- Responses ----------------------------------------------------------------------------------------------


def test_responses_text_stream_is_openais_event_sequence(stack):
    stack["up"].script(text=TEXT)
    r, raw = post_stream(stack, "/v1/responses", responses_body(), {"X-Session-Id": "rs-text"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(raw)
    names = [n for n, _ in events]
    n_deltas = len(ScriptedUpstream()._pieces(TEXT))
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * n_deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert all(data["type"] == name for name, data in events)  # the event: line names the data's type
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert "[DONE]" not in raw.decode()  # Responses streams end with response.completed, not [DONE]
    deltas = [d for n, d in events if n == "response.output_text.delta"]
    assert "".join(d["delta"] for d in deltas) == TEXT
    item_id = events[2][1]["item"]["id"]
    assert {d["item_id"] for d in deltas} == {item_id}
    assert events[-4][1]["text"] == TEXT
    created, completed = events[0][1]["response"], events[-1][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert created["id"] == completed["id"] == "resp_" + r.headers["x-call-id"].removeprefix("call_")
    assert completed["status"] == "completed" and completed["instructions"] == "You are terse."
    assert completed["output"] == [
        {
            "id": item_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": TEXT, "annotations": [], "logprobs": []}],
        }
    ]
    # Nothing the proxy injected for training reaches the client.
    for needle in ("token_ids", "prompt_token_ids", "chatcmpl"):
        assert needle not in raw.decode()

    row = call_row(stack, r.headers["x-call-id"])
    ids, lps = expected_tokens(TEXT)
    assert (row["kind"], row["stream"], row["status_code"], row["aborted"], row["session_id"]) == (
        "responses",
        True,
        200,
        False,
        "rs-text",
    )
    assert row["completion_token_ids"] == ids and row["logprobs"] == pytest.approx(lps)
    assert row["prompt_token_ids"] == ScriptedUpstream.tokenize("You are terse.What is six times seven?")
    assert row["untrainable_reason"] is None and row["finish_reason"] == "stop"
    assert row["response"]["output"] == completed["output"]  # what the client saw, recorded
    assert row["request"] == responses_body(stream=True)  # the client's request, not vLLM's


def test_responses_tool_call_only_stream(stack):
    stack["up"].script(tool_calls=[CALC])
    r, raw = post_stream(stack, "/v1/responses", responses_body(tools=[RESPONSES_TOOL]))
    assert r.status_code == 200
    events = parse_sse(raw)
    assert [n for n, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    added = events[2][1]["item"]
    assert (added["type"], added["name"], added["call_id"], added["status"]) == (
        "function_call",
        "calculator",
        "chatcmpl-tool-0",
        "in_progress",
    )
    assert "".join(d["delta"] for n, d in events if n.endswith("arguments.delta")) == CALC["arguments"]
    assert events[5][1]["arguments"] == CALC["arguments"] and events[5][1]["name"] == "calculator"
    (item,) = events[-1][1]["response"]["output"]  # no empty message item before the call
    assert (item["type"], item["status"], item["arguments"]) == ("function_call", "completed", CALC["arguments"])

    row = call_row(stack, r.headers["x-call-id"])
    ids = tool_tokens(CALC)
    assert row["completion_token_ids"] == ids and row["logprobs"] == [-0.5] * len(ids)
    assert row["finish_reason"] == "tool_calls" and row["untrainable_reason"] is None and not row["aborted"]
    assert row["response"]["output"] == events[-1][1]["response"]["output"]
    sent = stack["up"].sent[-1].request  # the function tool went upstream as a chat tool
    assert sent["tools"][0]["function"]["name"] == "calculator" and sent["stream"] is True


def test_responses_stream_completed_carries_usage(stack):
    stack["up"].script(text=TEXT)
    r, raw = post_stream(stack, "/v1/responses", responses_body())
    completed = parse_sse(raw)[-1][1]["response"]
    row = call_row(stack, r.headers["x-call-id"])
    assert row["response"]["usage"]["output_tokens"] == len(row["completion_token_ids"])
    assert completed["usage"] == row["response"]["usage"]


# --- Messages -----------------------------------------------------------------------------------------------


def test_messages_text_stream_is_anthropics_event_sequence(stack):
    stack["up"].script(text=TEXT)
    r, raw = post_stream(stack, "/v1/messages", messages_body(), {"X-Session-Id": "ms-text"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(raw)
    names = [n for n, _ in events]
    n_deltas = len(ScriptedUpstream()._pieces(TEXT))
    assert names == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * n_deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert (start["type"], start["role"], start["content"], start["model"]) == ("message", "assistant", [], "policy")
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    deltas = [d for n, d in events if n == "content_block_delta"]
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for d in deltas)
    assert "".join(d["delta"]["text"] for d in deltas) == TEXT
    assert events[-3][1] == {"type": "content_block_stop", "index": 0}
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert events[-1][1] == {"type": "message_stop"}
    assert "token_ids" not in raw.decode() and "[DONE]" not in raw.decode()

    row = call_row(stack, r.headers["x-call-id"])
    ids, lps = expected_tokens(TEXT)
    assert (row["kind"], row["stream"], row["status_code"], row["aborted"], row["session_id"]) == (
        "messages",
        True,
        200,
        False,
        "ms-text",
    )
    assert row["completion_token_ids"] == ids and row["logprobs"] == pytest.approx(lps)
    assert row["untrainable_reason"] is None
    assert row["response"]["content"] == [{"type": "text", "text": TEXT}]
    assert row["response"]["stop_reason"] == "end_turn"
    sent = stack["up"].sent[-1].request
    assert sent["messages"][0] == {"role": "system", "content": "You are terse."}  # the system prompt, first


def test_messages_tool_use_only_stream(stack):
    stack["up"].script(tool_calls=[CALC])
    r, raw = post_stream(stack, "/v1/messages", messages_body(tools=[MESSAGES_TOOL]))
    assert r.status_code == 200
    events = parse_sse(raw)
    assert [n for n, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    block = events[1][1]["content_block"]
    assert (block["type"], block["name"], block["id"], block["input"]) == (
        "tool_use",
        "calculator",
        "chatcmpl-tool-0",
        {},
    )
    partial = "".join(d["delta"]["partial_json"] for n, d in events if n == "content_block_delta")
    assert json.loads(partial) == json.loads(CALC["arguments"])
    assert all(d["delta"]["type"] == "input_json_delta" for n, d in events if n == "content_block_delta")
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

    row = call_row(stack, r.headers["x-call-id"])
    ids = tool_tokens(CALC)
    assert row["completion_token_ids"] == ids and row["logprobs"] == [-0.5] * len(ids)
    assert row["finish_reason"] == "tool_calls" and row["untrainable_reason"] is None and not row["aborted"]
    assert row["response"]["content"] == [
        {"type": "tool_use", "id": "chatcmpl-tool-0", "name": "calculator", "input": {"expression": "6 * 7"}}
    ]
    assert row["response"]["stop_reason"] == "tool_use"


def test_messages_stream_reports_usage(stack):
    stack["up"].script(text=TEXT)
    r, raw = post_stream(stack, "/v1/messages", messages_body())
    events = parse_sse(raw)
    row = call_row(stack, r.headers["x-call-id"])
    assert row["response"]["usage"]["output_tokens"] == len(row["completion_token_ids"]) > 0
    assert events[-2][1]["usage"]["output_tokens"] == row["response"]["usage"]["output_tokens"]


# --- a client that stops reading --------------------------------------------------------------------------------


def _read_until(stack, path: str, body: dict, stop) -> str:
    """Stream `body`, feed each received SSE data payload to `stop` until it says so, then close the connection
    without reading the rest. Returns the call id."""
    with httpx.stream("POST", f"{stack['proxy'].url}{path}", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and stop(json.loads(line[6:])):
                break
        return r.headers["x-call-id"]


def _text_so_far(api: str):
    seen: list[str] = []

    def piece(data: dict) -> str:
        if api == "chat":
            return "".join((c.get("delta") or {}).get("content") or "" for c in data.get("choices") or [])
        if api == "responses":
            return data["delta"] if data.get("type") == "response.output_text.delta" else ""
        return data["delta"].get("text", "") if data.get("type") == "content_block_delta" else ""

    def add(data: dict) -> str:
        seen.append(piece(data))
        return "".join(seen)

    return add


API_REQUESTS = {
    "chat": (
        "/v1/chat/completions",
        {"model": "policy", "messages": [{"role": "user", "content": "Six times seven?"}]},
    ),
    "responses": ("/v1/responses", responses_body()),
    "messages": ("/v1/messages", messages_body()),
}


@pytest.mark.parametrize("api", list(API_REQUESTS))
def test_client_that_stops_after_the_last_content_chunk_is_recorded_complete(stack, api):
    """vLLM puts finish_reason on the last token chunk; the usage chunk and [DONE] come later (here: 1.5 s). A
    client that has the whole answer and closes then made a complete call, not an aborted one."""
    path, body = API_REQUESTS[api]
    stack["up"].vllm_text(TEXT, hold_s=1.5)
    text = _text_so_far(api)
    call_id = _read_until(stack, path, body, lambda data: text(data) == TEXT)
    row = call_row(stack, call_id)
    ids, lps = expected_tokens(TEXT)
    assert (row["status_code"], row["aborted"], row["error"]) == (200, False, None), row["error"]
    assert row["completion_token_ids"] == ids and row["logprobs"] == pytest.approx(lps)
    assert row["finish_reason"] == "stop" and row["untrainable_reason"] is None


@pytest.mark.parametrize("api", list(API_REQUESTS))
def test_client_that_stops_mid_answer_is_recorded_aborted(stack, api):
    """The control for the test above: leaving before the last token chunk is an abort."""
    path, body = API_REQUESTS[api]
    stack["up"].vllm_text(TEXT, hold_s=1.5, delay_per_chunk=0.2)
    text = _text_so_far(api)
    call_id = _read_until(stack, path, body, lambda data: len(text(data)) >= 3)
    row = call_row(stack, call_id)
    assert row["status_code"] == 200 and row["aborted"] is True
    assert row["error"] == "client disconnected before the stream ended"
    ids, _ = expected_tokens(TEXT)
    assert 0 < len(row["completion_token_ids"]) < len(ids)
    assert ids[: len(row["completion_token_ids"])] == row["completion_token_ids"]
    assert len(row["logprobs"]) == len(row["completion_token_ids"])


# --- an upstream 200 that is not a completion -------------------------------------------------------------------

HTML = b"<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1>nginx</body></html>"


def _assert_api_error(api: str, r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    if api == "messages":  # Anthropic's error shape
        assert set(body) == {"type", "error"} and body["type"] == "error"
        assert body["error"]["type"] == "api_error"
        return body["error"]["message"]
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "upstream_bad_response"
    return body["error"]["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", list(API_REQUESTS))
@pytest.mark.parametrize(
    "answer", [("text/html", HTML), ("application/json", b'{"id": "chatcmpl-1", "choi')], ids=["html", "truncated-json"]
)
def test_upstream_200_that_is_not_a_completion_is_a_502(stack, api, stream, answer):
    path, body = API_REQUESTS[api]
    content_type, page = answer
    stack["up"].raw(200, content_type, page)
    r = httpx.post(f"{stack['proxy'].url}{path}", json={**body, "stream": stream}, timeout=30)
    message = _assert_api_error(api, r, 502)
    assert "not a completion" in message
    assert stack["up"].url not in message and "127.0.0.1" not in message  # agents never see the upstream's address
    row = call_row(stack, r.headers["x-call-id"])
    assert row["status_code"] == 502 and row["kind"] == api
    assert row["completion_token_ids"] is None and row["response"] is None
    assert "not a completion" in row["error"]


# --- the non-stream answers' headers and ids -------------------------------------------------------------------


@pytest.mark.parametrize("api", ["responses", "messages"])
def test_translated_answer_has_one_content_type(stack, api):
    path, body = API_REQUESTS[api]
    stack["up"].script(text=TEXT)
    r = httpx.post(f"{stack['proxy'].url}{path}", json=body, timeout=30)
    assert r.status_code == 200
    assert r.headers.get_list("content-type") == ["application/json"]


def test_chat_answer_has_one_content_type(stack):
    """The control: the chat answer passes vLLM's own header through, once."""
    path, body = API_REQUESTS["chat"]
    stack["up"].script(text=TEXT)
    r = httpx.post(f"{stack['proxy'].url}{path}", json=body, timeout=30)
    assert r.status_code == 200 and r.headers.get_list("content-type") == ["application/json"]


def test_messages_stream_id_is_the_recorded_one(stack):
    stack["up"].script(text=TEXT)
    r, raw = post_stream(stack, "/v1/messages", messages_body())
    message = parse_sse(raw)[0][1]["message"]
    row = call_row(stack, r.headers["x-call-id"])
    assert message["id"].startswith("msg_")
    assert row["response"]["id"] == message["id"]


@pytest.mark.parametrize("api", ["responses", "messages"])
def test_bad_tw_base_url_is_refused_in_the_apis_error_shape(stack, api):
    """A /tw/ base URL with a key trainwire does not know: a 404 that says which keys exist, in the API's format."""
    path, body = API_REQUESTS[api]
    sent = len(stack["up"].sent)
    r = httpx.post(f"{stack['proxy'].url}/tw/sesion=typo{path}", json=body, timeout=30)
    assert r.status_code == 404, r.text
    err = r.json()
    if api == "messages":
        assert err["type"] == "error" and err["error"]["type"] == "not_found_error"
        message = err["error"]["message"]
    else:
        assert set(err["error"]) == {"message", "type", "param", "code"}
        message = err["error"]["message"]
    assert "session, task, agent, train" in message and "sesion=typo" in message
    assert len(stack["up"].sent) == sent  # nothing went upstream

"""proxy/forward.py's pure parts: SSE event splitting and `data:` extraction, the model name rewritten back, when a
response needs rewriting, the upstream headers kept (from a stand-in with a CIMultiDict, no live aiohttp object), the
call's own headers and ids, and the error text of a failed call."""

from __future__ import annotations

import re

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from trainwire.proxy.forward import (
    Call,
    _data_of,
    _error_text,
    _split_events,
    needs_rewrite,
    new_call_id,
    response_headers,
    rewrite_back,
)
from trainwire.proxy.session_headers import CallContext
from trainwire.proxy.transparency import Injected


def make_call(
    kind="chat", *, requested="policy", served="policy", injected=Injected(), stream_=False, request=None, version=None
) -> Call:
    call = Call(
        ctx=CallContext("sess-1", False, "task-1", "agent-1", True),
        kind=kind,
        path="/v1/chat/completions" if kind == "chat" else "/v1/completions",
        request=request if request is not None else {"model": requested},
        stream=stream_,
        model_requested=requested,
    )
    call.model_served = served
    call.injected = injected
    call.policy_version = version
    return call


# --- _split_events -----------------------------------------------------------------------------------------


def test_split_lf_events_keeps_the_partial_tail():
    assert _split_events(b"data: a\n\ndata: b\n\ndata: c") == ([b"data: a\n\n", b"data: b\n\n"], b"data: c")


def test_split_crlf_events():
    assert _split_events(b"data: a\r\n\r\ndata: b\r\n\r\n") == ([b"data: a\r\n\r\n", b"data: b\r\n\r\n"], b"")


@pytest.mark.parametrize(
    "buf, events, rest",
    [
        (b"data: a\r\n\r\ndata: b\n\n", [b"data: a\r\n\r\n", b"data: b\n\n"], b""),
        (b"data: a\n\ndata: b\r\n\r\nx", [b"data: a\n\n", b"data: b\r\n\r\n"], b"x"),
        (b"", [], b""),
        (b'data: {"x"', [], b'data: {"x"'),
        (b"data: a\n", [], b"data: a\n"),
        (b"data: a\r\n", [], b"data: a\r\n"),
        (b"data: a\r\n\r", [], b"data: a\r\n\r"),
        (b"event: x\ndata: a\n\n: ping\n\n", [b"event: x\ndata: a\n\n", b": ping\n\n"], b""),
        (b"\n\n", [b"\n\n"], b""),
    ],
)
def test_split_cases(buf, events, rest):
    assert _split_events(buf) == (events, rest)


def test_split_completes_across_reads():
    events, rest = _split_events(b"data: a\r\n")
    assert events == []
    events, rest = _split_events(rest + b"\r\ndata: b")
    assert (events, rest) == ([b"data: a\r\n\r\n"], b"data: b")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.binary(max_size=20).filter(lambda b: b"\n" not in b and b"\r" not in b),
            st.sampled_from([b"\n\n", b"\r\n\r\n"]),
        ),
        max_size=8,
    ),
    st.binary(max_size=10).filter(lambda b: b"\n" not in b and b"\r" not in b),
)
def test_split_is_lossless_and_event_by_event(parts, tail):
    buf = b"".join(p + s for p, s in parts) + tail
    events, rest = _split_events(buf)
    assert b"".join(events) + rest == buf
    assert events == [p + s for p, s in parts]
    assert rest == tail


# --- _data_of ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event, data",
    [
        (b'data: {"a": 1}\n\n', b'{"a": 1}'),
        (b"data:x\n\n", b"x"),
        (b"data: [DONE]\n\n", b"[DONE]"),
        (b"data: x\r\n\r\n", b"x"),
        (b'data: {"a":\ndata: 1}\n\n', b'{"a":\n1}'),
        (b'data: {"a":\r\ndata: 1}\r\n\r\n', b'{"a":\n1}'),
        (b"event: message\nid: 7\ndata: y\nretry: 10\n\n", b"y"),
        (b": keep-alive\n\n", None),
        (b"event: ping\n\n", None),
        (b"", None),
    ],
)
def test_data_of(event, data):
    assert _data_of(event) == data


def test_multi_line_data_parses_as_json():
    assert orjson.loads(_data_of(b'data: {"choices":\ndata: [], "id": "x"}\n\n')) == {"choices": [], "id": "x"}


# --- rewrite_back / needs_rewrite ---------------------------------------------------------------------------


def test_rewrite_back_restores_the_requested_model_name():
    obj = {"model": "policy-lora-v3", "choices": []}
    rewrite_back(obj, make_call(requested="policy", served="policy-lora-v3"))
    assert obj == {"model": "policy", "choices": []}


@pytest.mark.parametrize(
    "requested, served, obj",
    [
        ("policy", "policy", {"model": "policy"}),
        (None, "policy-lora-v3", {"model": "policy-lora-v3"}),
        ("policy", "policy-lora-v3", {"choices": []}),  # no model key: none is added
    ],
)
def test_rewrite_back_leaves_alone(requested, served, obj):
    before = dict(obj)
    rewrite_back(obj, make_call(requested=requested, served=served))
    assert obj == before


@pytest.mark.parametrize(
    "injected, requested, served, expected",
    [
        (Injected(), "policy", "policy", False),
        (Injected(), None, "anything", False),
        (Injected(token_ids=True), "policy", "policy", True),
        (Injected(logprobs=True), "policy", "policy", True),
        (Injected(usage=True), "policy", "policy", True),
        (Injected(), "policy", "policy-lora-v3", True),
        (Injected(), "policy", None, True),
    ],
)
def test_needs_rewrite(injected, requested, served, expected):
    assert needs_rewrite(make_call(injected=injected, requested=requested, served=served)) is expected


# --- headers, ids, error text --------------------------------------------------------------------------------


class FakeResponse:
    """The one part of aiohttp.ClientResponse that response_headers reads."""

    def __init__(self, headers):
        self.headers = CIMultiDict(headers)


def test_response_headers_keep_three_and_add_the_calls():
    resp = FakeResponse(
        headers=[
            ("Content-Type", "text/event-stream"),
            ("Content-Length", "99"),
            ("X-Request-Id", "req-1"),
            ("retry-after", "3"),
            ("Transfer-Encoding", "chunked"),
            ("Server", "uvicorn"),
            ("Date", "today"),
            ("Connection", "keep-alive"),
        ]
    )
    call = make_call(version=7)
    # kept under lower-case names, so a translated answer's own content-type replaces the upstream's
    assert response_headers(resp, call) == {
        "content-type": "text/event-stream",
        "x-request-id": "req-1",
        "retry-after": "3",
        "X-Session-Id": "sess-1",
        "X-Call-Id": call.call_id,
        "X-Policy-Version": "7",
    }


def test_call_headers_without_a_version_say_zero():
    call = make_call(version=None)
    assert call.headers() == {"X-Session-Id": "sess-1", "X-Call-Id": call.call_id, "X-Policy-Version": "0"}


def test_new_call_ids():
    a, b = new_call_id(), new_call_id()
    assert re.fullmatch(r"call_[0-9a-f]{32}", a) and a != b
    assert make_call().call_id != make_call().call_id


@pytest.mark.parametrize(
    "parsed, raw, text",
    [
        ({"error": {"message": "bad model", "type": "NotFoundError"}}, b"", "bad model"),
        ({"error": {"type": "X"}}, b"", "{'type': 'X'}"),
        (
            {"object": "error", "message": "The model `x` does not exist.", "code": 404},
            b"",
            "The model `x` does not exist.",
        ),
        ({"detail": "nope"}, b'{"detail": "nope"}', '{"detail": "nope"}'),
        (None, b"Internal Server Error", "Internal Server Error"),
        (None, b"x" * 3000, "x" * 2000),
    ],
)
def test_error_text(parsed, raw, text):
    assert _error_text(parsed, raw) == text


class _Upstream:
    url = "http://vllm:8000"


class _Pool:
    def __init__(self) -> None:
        self.dead: list = []

    def order(self, session_id):
        return [_Upstream()]

    def mark_dead(self, upstream) -> None:
        self.dead.append(upstream)


class _Http:
    """A stand-in aiohttp session whose first posts fail the way a kept-alive connection the upstream was closing
    does (or with ``errors`` of one's choosing)."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors, self.posts = list(errors), 0

    async def post(self, url, **kwargs):
        self.posts += 1
        if self.errors:
            raise self.errors.pop(0)
        return "response"


def _open(http, pool):
    import asyncio

    import aiohttp

    from trainwire.proxy.forward import open_upstream

    return asyncio.run(
        open_upstream(pool, http, make_call(), b"{}", {}, aiohttp.ClientTimeout(total=5), prepare_for=None)
    )


def _unwritten():
    import aiohttp

    return aiohttp.ClientOSError(None, "Can not write request body for http://vllm:8000/v1/chat/completions")


def test_a_request_not_written_into_a_closing_connection_is_sent_again():
    """Measured in make demo-real: 2 of 200 evaluation calls got a 502 right after an idle spell, when vLLM closed
    kept-alive connections as the proxy wrote into them. Nothing reached vLLM, so the proxy sends it again."""
    from trainwire.proxy.forward import STALE_CONNECTION_RETRIES

    pool, http = _Pool(), _Http([_unwritten(), _unwritten()])
    assert _open(http, pool) == "response" and http.posts == 3 and pool.dead == []
    http = _Http([_unwritten()] * (STALE_CONNECTION_RETRIES + 1))
    with pytest.raises(Exception, match="Can not write request body"):
        _open(http, _Pool())
    assert http.posts == STALE_CONNECTION_RETRIES + 1


def test_an_error_after_the_request_was_written_is_not_retried():
    import aiohttp

    http = _Http([aiohttp.ClientOSError(104, "Connection reset by peer")])
    with pytest.raises(aiohttp.ClientOSError):
        _open(http, _Pool())
    assert http.posts == 1  # it may have reached vLLM: sending it again could run the generation twice

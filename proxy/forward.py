"""The hot path: send a call to the upstream, give the client exactly what it would have got from vLLM,
and hand a complete record of the call to the write path."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator

import aiohttp
import orjson
from starlette.responses import Response, StreamingResponse
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt
from trainwire.records import CallRecord
from trainwire.proxy.assemble import StreamAssembler, tokens_of
from trainwire.proxy.errors import error_body
from trainwire.proxy.ids import random_hex
from trainwire.proxy.session_headers import CallContext
from trainwire.proxy.transparency import Injected, strip

# Response headers of the upstream worth keeping; hop-by-hop and length headers are recomputed.
_KEEP_HEADERS = ("content-type", "x-request-id", "retry-after")


def response_headers(resp: aiohttp.ClientResponse, call: "Call") -> dict[str, str]:
    """The upstream headers worth keeping, plus the call's session, id and policy version."""
    headers = {k: v for k, v in resp.headers.items() if k.lower() in _KEEP_HEADERS}
    headers.update(call.headers())
    return headers


def new_call_id() -> str:
    return "call_" + random_hex()


@dataclass(slots=True)
class Call:
    """Everything known about one call while it is being served."""

    ctx: CallContext
    kind: str                     # chat | completion | other
    path: str
    request: Any                  # the client's body, as sent (before injection)
    stream: bool
    model_requested: str | None
    route: str = "policy"         # policy | frozen | passthrough
    call_id: str = field(default_factory=new_call_id)
    seq: int = 0
    started: float = field(default_factory=time.perf_counter)
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    model_served: str | None = None
    upstream: str | None = None
    policy_version: int | None = None
    injected: Injected = field(default_factory=Injected)
    t_sent: float | None = None
    t_first: float | None = None
    t_upstream_done: float | None = None
    processing_s: float = 0.0

    def headers(self) -> dict[str, str]:
        return {"X-Session-Id": self.ctx.session_id, "X-Call-Id": self.call_id,
                "X-Policy-Version": str(self.policy_version or 0)}

    def record(self, *, status: int, response: Any, error: str | None = None, aborted: bool = False,
               tokens=None, usage: dict | None = None) -> CallRecord:
        now = time.perf_counter()
        upstream_ms = (self.t_upstream_done - self.t_sent) * 1000 if self.t_sent and self.t_upstream_done else None
        pre_ms = ((self.t_sent or now) - self.started) * 1000
        post_ms = (now - self.t_upstream_done) * 1000 if self.t_upstream_done else 0.0
        if usage is None and isinstance(response, dict):
            usage = response.get("usage")
        return CallRecord(
            id=self.call_id, session_id=self.ctx.session_id, seq=self.seq, task_id=self.ctx.task_id,
            agent_name=self.ctx.agent_name, trainable=self.ctx.trainable and self.route == "policy",
            kind=self.kind, path=self.path, stream=self.stream, model_requested=self.model_requested,
            model_served=self.model_served, route=self.route, upstream=self.upstream,
            policy_version=self.policy_version, request=self.request, response=response,
            prompt_token_ids=tokens.prompt_token_ids if tokens else None,
            completion_token_ids=tokens.completion_token_ids if tokens else None,
            logprobs=tokens.logprobs if tokens else None,
            finish_reason=tokens.finish_reason if tokens else None,
            usage=usage if isinstance(usage, dict) else None, status_code=status, error=error,
            aborted=aborted, started_at=self.started_at, finished_at=datetime.now(timezone.utc),
            upstream_ms=upstream_ms,
            ttft_ms=(self.t_first - self.t_sent) * 1000 if self.t_first and self.t_sent else None,
            overhead_ms=pre_ms + post_ms + self.processing_s * 1000,
        )


class UpstreamUnavailable(Exception):
    pass


async def open_upstream(pool, http: aiohttp.ClientSession, call: Call, body: bytes, headers: dict[str, str],
                        timeout: aiohttp.ClientTimeout, prepare_for) -> aiohttp.ClientResponse:
    """POST to the session's upstream. Only a refused connection (nothing was sent) moves on to the next
    upstream: retrying anything later could run the generation twice."""
    order = pool.order(call.ctx.session_id)
    attempt_no = 0

    async def once() -> aiohttp.ClientResponse:
        nonlocal attempt_no
        upstream = order[min(attempt_no, len(order) - 1)]
        attempt_no += 1
        payload = prepare_for(upstream.url) if prepare_for else body
        call.upstream = upstream.url
        call.t_sent = time.perf_counter()
        try:
            return await http.post(f"{upstream.url}{call.path}", data=payload, headers=headers, timeout=timeout)
        except aiohttp.ClientConnectorError:
            pool.mark_dead(upstream)
            raise

    try:
        return await once()  # the common case: no retry machinery on the hot path
    except aiohttp.ClientConnectorError as exc:
        if len(order) == 1:
            raise UpstreamUnavailable(f"upstream unreachable: {exc}") from exc
    try:
        async for attempt in AsyncRetrying(stop=stop_after_attempt(len(order)),
                                           retry=retry_if_exception_type(aiohttp.ClientConnectorError),
                                           reraise=True):
            with attempt:
                return await once()
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamUnavailable(f"no upstream reachable: {exc}") from exc
    raise AssertionError("unreachable")


def rewrite_back(obj: dict[str, Any], call: Call) -> None:
    """The client asked for `policy`; it sees `policy` in the answer, not the adapter name behind it."""
    if call.model_requested and call.model_served != call.model_requested and "model" in obj:
        obj["model"] = call.model_requested


def needs_rewrite(call: Call) -> bool:
    return call.injected.any or (call.model_requested is not None and call.model_served != call.model_requested)


async def complete(resp: aiohttp.ClientResponse, call: Call, submit) -> Response:
    """Non-streaming: read, record, strip, answer."""
    try:
        raw = await resp.read()
    finally:
        resp.release()
    call.t_upstream_done = time.perf_counter()
    headers = response_headers(resp, call)
    parsed: Any = None
    try:
        parsed = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        parsed = {"raw": raw.decode("utf-8", "replace")}
    if resp.status != 200 or not isinstance(parsed, dict):
        error = _error_text(parsed, raw) if resp.status != 200 else None
        submit(call.record(status=resp.status, response=parsed, error=error))
        return Response(raw, status_code=resp.status, headers=headers)
    tokens = tokens_of(parsed)
    if needs_rewrite(call):
        strip(parsed, call.injected)
        rewrite_back(parsed, call)
        raw = orjson.dumps(parsed)
    submit(call.record(status=200, response=parsed, tokens=tokens))
    return Response(raw, status_code=200, headers=headers)


def _error_text(parsed: Any, raw: bytes) -> str:
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return str(parsed["error"].get("message") or parsed["error"])
    if isinstance(parsed, dict) and "message" in parsed:
        return str(parsed["message"])
    return raw[:2000].decode("utf-8", "replace")


def _split_events(buf: bytes) -> tuple[list[bytes], bytes]:
    events = []
    while True:
        i = buf.find(b"\n\n")
        j = buf.find(b"\r\n\r\n")
        if i < 0 and j < 0:
            return events, buf
        if j >= 0 and (i < 0 or j < i):
            events.append(buf[:j + 4])
            buf = buf[j + 4:]
        else:
            events.append(buf[:i + 2])
            buf = buf[i + 2:]


def _data_of(event: bytes) -> bytes | None:
    lines = [ln[5:].lstrip(b" ") for ln in event.splitlines() if ln.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def stream(resp: aiohttp.ClientResponse, call: Call, submit) -> Response:
    """Streaming: forward each SSE event as it arrives; only events carrying injected fields are rewritten."""
    if resp.status != 200:
        return _stream_error(resp, call, submit)
    asm = StreamAssembler(call.kind)
    rewrite = needs_rewrite(call)

    def process(event: bytes) -> bytes:
        data = _data_of(event)
        if data is None:
            return event
        if data.strip() == b"[DONE]":
            asm.done = True
            return event
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(chunk, dict):
            return event
        asm.feed(chunk)
        if not rewrite:
            return event
        if not strip(chunk, call.injected):
            return b""
        rewrite_back(chunk, call)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def body() -> AsyncIterator[bytes]:
        buf = b""
        completed = False
        error = None
        try:
            async for data in resp.content.iter_any():
                t0 = time.perf_counter()
                if call.t_first is None:
                    call.t_first = t0
                events, buf = _split_events(buf + data)
                out = b"".join(process(e) for e in events)
                call.processing_s += time.perf_counter() - t0
                if out:
                    yield out
            if buf.strip():
                yield process(buf)
            completed = True
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            error = f"upstream stream broke: {exc!r}"
            yield b"data: " + error_body(502, error) + b"\n\n"
        finally:
            call.t_upstream_done = call.t_upstream_done or time.perf_counter()
            resp.close()  # on a client abort this also stops the generation upstream
            assembled = asm.body()
            tokens = tokens_of(assembled)
            usage = assembled.get("usage")
            strip(assembled, call.injected)
            rewrite_back(assembled, call)
            aborted = not (completed and asm.done)
            if aborted and error is None:
                error = "client disconnected before the stream ended" if not completed else "stream ended without [DONE]"
            submit(call.record(status=200, response=assembled, tokens=tokens, aborted=aborted, error=error,
                               usage=usage))

    headers = response_headers(resp, call)
    return StreamingResponse(body(), status_code=200, headers=headers)


def _stream_error(resp: aiohttp.ClientResponse, call: Call, submit) -> Response:
    async def body() -> AsyncIterator[bytes]:
        raw = b""
        try:
            raw = await resp.read()
            yield raw
        finally:
            resp.release()
            call.t_upstream_done = time.perf_counter()
            try:
                parsed = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                parsed = {"raw": raw.decode("utf-8", "replace")}
            submit(call.record(status=resp.status, response=parsed, error=_error_text(parsed, raw)))

    headers = response_headers(resp, call)
    return StreamingResponse(body(), status_code=resp.status, headers=headers)

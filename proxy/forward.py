"""The upstream call of one generation call (after proxy/hot_path.py routed it and proxy/generation.py prepared
it): send it to the session's upstream (affinity, failover), give the client exactly what it would have got from
vLLM (non-stream, SSE relay, or an API's translation), and hand a complete record of the call to the write path."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from starlette.responses import Response, StreamingResponse
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from trainwire.proxy.api_fields import HEADER as IGNORED_HEADER
from trainwire.proxy.api_fields import header_value
from trainwire.proxy.apis import Api, Ids
from trainwire.proxy.assemble import StreamAssembler, tokens_of
from trainwire.proxy.errors import error_body
from trainwire.proxy.ids import random_hex
from trainwire.proxy.session_headers import CallContext
from trainwire.proxy.transparency import Injected, strip
from trainwire.records import CallRecord, token_problem

log = logging.getLogger("trainwire.proxy")

# Response headers of the upstream worth keeping; hop-by-hop and length headers are recomputed.
_KEEP_HEADERS = ("content-type", "x-request-id", "retry-after")


def response_headers(resp: aiohttp.ClientResponse, call: "Call") -> dict[str, str]:
    """The upstream headers worth keeping (by lower-case name), plus the call's session, id and policy version."""
    headers = {k.lower(): v for k, v in resp.headers.items() if k.lower() in _KEEP_HEADERS}
    headers.update(call.headers())
    return headers


def new_call_id() -> str:
    return "call_" + random_hex()


@dataclass(slots=True)
class Call:
    """Everything known about one call while it is being served."""

    ctx: CallContext
    kind: str  # chat | completion | responses | messages | other
    path: str  # the client's path

    request: Any  # the client's body, as sent (before injection)
    stream: bool
    model_requested: str | None
    route: str = "policy"  # policy | frozen | passthrough
    upstream_path: str = ""  # what vLLM was asked: the API's chat or completions path
    sampling: dict[str, Any] | None = None  # proxy.sampling.Outcome.record()
    untrainable: str | None = None  # why this call's tokens must not be trained on
    enforced: list[str] = field(default_factory=list)  # sampling settings the proxy replaced
    ignored: list[str] = field(default_factory=list)  # request fields accepted and not acted on (api_fields)
    call_id: str = field(default_factory=new_call_id)
    seq: int = 0
    started: float = field(default_factory=time.perf_counter)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    model_served: str | None = None
    upstream: str | None = None
    policy_version: int | None = None
    injected: Injected = field(default_factory=Injected)
    t_sent: float | None = None
    t_first: float | None = None
    t_upstream_done: float | None = None
    processing_s: float = 0.0

    def headers(self) -> dict[str, str]:
        out = {
            "X-Session-Id": self.ctx.session_id,
            "X-Call-Id": self.call_id,
            "X-Policy-Version": str(self.policy_version or 0),
        }
        if self.enforced:
            out["X-Trainwire-Sampling"] = "enforced " + ",".join(self.enforced)
        if self.ignored:
            out[IGNORED_HEADER] = header_value(self.ignored)
        return out

    def record(
        self,
        *,
        status: int,
        response: Any,
        error: str | None = None,
        aborted: bool = False,
        tokens=None,
        usage: dict | None = None,
    ) -> CallRecord:
        now = time.perf_counter()
        upstream_ms = (self.t_upstream_done - self.t_sent) * 1000 if self.t_sent and self.t_upstream_done else None
        pre_ms = ((self.t_sent or now) - self.started) * 1000
        post_ms = (now - self.t_upstream_done) * 1000 if self.t_upstream_done else 0.0
        if usage is None and isinstance(response, dict):
            usage = response.get("usage")
        usage = usage if isinstance(usage, dict) else None
        untrainable = self.untrainable
        if untrainable is None and not self.ctx.trainable:
            # Said for every route: a frozen teacher's evaluation calls must stay out of fine-tuning too.
            untrainable = "evaluation call (X-Trainwire-Train: false)"
        if untrainable is None and tokens is not None and status == 200:
            untrainable = token_problem(
                tokens.prompt_token_ids, tokens.completion_token_ids, tokens.logprobs, usage, aborted
            )
        return CallRecord(
            id=self.call_id,
            session_id=self.ctx.session_id,
            seq=self.seq,
            task_id=self.ctx.task_id,
            agent_name=self.ctx.agent_name,
            trainable=self.ctx.trainable and self.route == "policy",
            kind=self.kind,
            path=self.path,
            stream=self.stream,
            model_requested=self.model_requested,
            model_served=self.model_served,
            route=self.route,
            upstream=self.upstream,
            policy_version=self.policy_version,
            request=self.request,
            response=response,
            prompt_token_ids=tokens.prompt_token_ids if tokens else None,
            completion_token_ids=tokens.completion_token_ids if tokens else None,
            logprobs=tokens.logprobs if tokens else None,
            finish_reason=tokens.finish_reason if tokens else None,
            usage=usage,
            status_code=status,
            error=error,
            sampling=self.sampling,
            untrainable_reason=untrainable,
            trace_id=self.ctx.trace_id,
            parent_span_id=self.ctx.parent_span_id,
            aborted=aborted,
            started_at=self.started_at,
            finished_at=datetime.now(UTC),
            upstream_ms=upstream_ms,
            ttft_ms=(self.t_first - self.t_sent) * 1000 if self.t_first and self.t_sent else None,
            overhead_ms=pre_ms + post_ms + self.processing_s * 1000,
        )


class UpstreamUnavailable(Exception):
    pass


# A burst of requests after an idle spell can meet several connections the upstream is closing at once.
STALE_CONNECTION_RETRIES = 3


def unwritten(exc: aiohttp.ClientOSError) -> bool:
    """aiohttp's error for a request body it could not write: the upstream never got the whole request."""
    return "Can not write request body" in str(exc)


async def open_upstream(
    pool,
    http: aiohttp.ClientSession,
    call: Call,
    body: bytes,
    headers: dict[str, str],
    timeout: aiohttp.ClientTimeout,
    prepare_for,
) -> aiohttp.ClientResponse:
    """POST to the session's upstream. Only a refused connection (nothing was sent) moves on to the next
    upstream: retrying anything later could run the generation twice. A request that could not be written into a
    kept-alive connection the upstream was closing is sent again on another connection (it never arrived whole)."""
    order = pool.order(call.ctx.session_id)
    attempt_no = 0

    async def once() -> aiohttp.ClientResponse:
        nonlocal attempt_no
        upstream = order[min(attempt_no, len(order) - 1)]
        attempt_no += 1
        payload = prepare_for(upstream.url) if prepare_for else body
        call.upstream = upstream.url
        url = f"{upstream.url}{call.upstream_path or call.path}"
        for stale_left in range(STALE_CONNECTION_RETRIES, -1, -1):
            call.t_sent = time.perf_counter()
            try:
                return await http.post(url, data=payload, headers=headers, timeout=timeout)
            except aiohttp.ClientConnectorError:
                pool.mark_dead(upstream)
                raise
            except aiohttp.ClientOSError as exc:
                if not stale_left or not unwritten(exc):
                    raise
        raise AssertionError("unreachable")

    try:
        return await once()  # the common case: no retry machinery on the hot path
    except aiohttp.ClientConnectorError as exc:
        if len(order) == 1:
            raise UpstreamUnavailable(f"upstream unreachable: {exc}") from exc
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(len(order)),
            retry=retry_if_exception_type(aiohttp.ClientConnectorError),
            reraise=True,
        ):
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


async def complete(resp: aiohttp.ClientResponse, call: Call, submit, api: Api) -> Response:
    """Non-streaming: read, record, strip, answer (translated into the client's API where it has its own)."""
    try:
        raw = await resp.read()
    finally:
        resp.release()
    call.t_upstream_done = time.perf_counter()
    headers = response_headers(resp, call)
    try:
        parsed: Any = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        parsed = None
    if resp.status != 200:
        if parsed is None and raw:
            parsed = {"raw": raw[:65536].decode("utf-8", "replace")}
        error = _error_text(parsed, raw)
        submit(call.record(status=resp.status, response=parsed, error=error))
        if api.translated:
            return _translated_error(api, resp.status, error, call)
        return Response(raw, status_code=resp.status, headers=headers)
    content_type = resp.headers.get("content-type") or ""
    if (
        not isinstance(parsed, dict)
        or not isinstance(parsed.get("choices"), list)
        or "json" not in content_type.lower()
    ):
        return _not_an_answer(call, submit, api, raw, content_type or None)
    tokens = tokens_of(parsed)
    if api.from_upstream is not None:
        strip(parsed, call.injected)
        client = api.from_upstream(parsed, call.request, Ids.of(call.call_id))
        submit(call.record(status=200, response=client, tokens=tokens, usage=parsed.get("usage")))
        headers["content-type"] = "application/json"
        return Response(orjson.dumps(client), status_code=200, headers=headers)
    if needs_rewrite(call):
        strip(parsed, call.injected)
        rewrite_back(parsed, call)
        raw = orjson.dumps(parsed)
    submit(call.record(status=200, response=parsed, tokens=tokens))
    return Response(raw, status_code=200, headers=headers)


def _not_an_answer(call: Call, submit, api: Api, raw: bytes, content_type: str | None) -> Response:
    """A 200 whose body is not a completion (an HTML error page, truncated JSON, a wrong content type): an
    upstream error, never a made-up answer."""
    what = f"{len(raw)} bytes of {content_type or 'no content type'}"
    detail = f"upstream answered 200 with a body that is not a completion ({what}): {raw[:300]!r}"
    submit(call.record(status=502, response=None, error=detail))
    return Response(
        api.error_body(
            502,
            f"the policy server answered 200 with a body that is not a completion ({what})",
            None,
            "upstream_bad_response",
        ),
        status_code=502,
        media_type="application/json",
        headers=call.headers(),
    )


def _translated_error(api: Api, status: int, message: str, call: Call) -> Response:
    return Response(
        api.error_body(status, message, None, None),
        status_code=status,
        media_type="application/json",
        headers=call.headers(),
    )


def _error_text(parsed: Any, raw: bytes) -> str:
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return str(parsed["error"].get("message") or parsed["error"])
    if isinstance(parsed, dict) and "message" in parsed:
        return str(parsed["message"])
    return raw[:2000].decode("utf-8", "replace")


def _split_events(buf: bytes) -> tuple[list[bytes], bytes]:
    events: list[bytes] = []
    while True:
        i = buf.find(b"\n\n")
        j = buf.find(b"\r\n\r\n")
        if i < 0 and j < 0:
            return events, buf
        if j >= 0 and (i < 0 or j < i):
            events.append(buf[: j + 4])
            buf = buf[j + 4 :]
        else:
            events.append(buf[: i + 2])
            buf = buf[i + 2 :]


def _data_of(event: bytes) -> bytes | None:
    lines = [ln[5:].lstrip(b" ") for ln in event.splitlines() if ln.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


class RecordedStream(StreamingResponse):
    """A StreamingResponse that always runs `on_close`, also when the client leaves before the first byte
    (then the body generator never starts and its own `finally` would never run)."""

    def __init__(self, content, on_close, **kw) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


class _StreamState:
    """What a relayed stream knows when it ends, however it ends."""

    __slots__ = ("asm", "completed", "error", "recorded")

    def __init__(self, kind: str) -> None:
        self.asm = StreamAssembler(kind)
        self.completed = False  # the upstream's body was read to its end
        self.error: str | None = None
        self.recorded = False


def stream(resp: aiohttp.ClientResponse, call: Call, submit, api: Api) -> Response:
    """Streaming: forward each SSE event as it arrives; only events carrying injected fields are rewritten
    (chat, completions), or every chunk is translated into the client's API (Responses, Messages)."""
    if resp.status != 200:
        return _stream_error(resp, call, submit, api)
    if "text/event-stream" not in (resp.headers.get("content-type") or ""):
        return _not_a_stream(resp, call, submit, api)
    state = _StreamState(api.upstream_kind)

    def record() -> None:
        """Into the journal, once: before the event that ends the stream leaves (a SIGKILL right after it must not
        lose a call its client saw complete), or, when the stream ends otherwise, as it ends."""
        if state.recorded:
            return
        state.recorded = True
        call.t_upstream_done = call.t_upstream_done or time.perf_counter()
        asm = state.asm
        assembled = asm.body()
        tokens = tokens_of(assembled)
        usage = assembled.get("usage")
        strip(assembled, call.injected)
        # Complete when every choice has its finish_reason (a client may stop reading after the last choice chunk
        # and never read the usage chunk or [DONE] behind it), or when the upstream said [DONE].
        aborted = not (asm.finished() or asm.done)
        error = state.error
        if aborted and error is None:
            error = (
                "client disconnected before the stream ended" if not state.completed else "stream ended without [DONE]"
            )
        if api.translated:
            response = _translated_record(api, assembled, usage, call)
        else:
            rewrite_back(assembled, call)
            response = assembled
        submit(call.record(status=200, response=response, tokens=tokens, aborted=aborted, error=error, usage=usage))

    async def finish() -> None:
        record()  # a client that left early: its record was not written by the body
        resp.close()  # on a client abort this also stops the generation upstream

    if api.translated:
        body = _translated_body(resp, call, state, api, record)
    else:
        body = _relayed_body(resp, call, state, record)
    headers = response_headers(resp, call)
    return RecordedStream(body, finish, status_code=200, headers=headers)


def _translated_record(api: Api, assembled: dict[str, Any], usage: Any, call: Call) -> Any:
    """What the client of a translated stream received, as one answer. Never raises: the record must be written
    whatever the translation thinks of a broken stream (then it keeps vLLM's assembled answer)."""
    if not assembled.get("choices"):
        return None
    try:
        assert api.from_upstream is not None
        return api.from_upstream(
            {**assembled, "usage": usage} if usage else assembled, call.request, Ids.of(call.call_id)
        )
    except Exception:
        log.exception("could not translate the assembled stream of call %s; recording vLLM's answer", call.call_id)
        return assembled


async def _events(resp: aiohttp.ClientResponse, call: Call, state: _StreamState) -> AsyncIterator[list[bytes]]:
    """The upstream's SSE events, one read at a time."""
    buf = b""
    try:
        async for data in resp.content.iter_any():
            if call.t_first is None:
                call.t_first = time.perf_counter()
            events, buf = _split_events(buf + data)
            if events:
                yield events
        if buf.strip():
            yield [buf]
        state.completed = True
    except (TimeoutError, aiohttp.ClientError) as exc:
        state.error = f"upstream stream broke: {exc!r}"


def _chunk_of(event: bytes, state: _StreamState) -> dict[str, Any] | None:
    data = _data_of(event)
    if data is None:
        return None
    if data.strip() == b"[DONE]":
        state.asm.done = True
        return None
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(chunk, dict):
        return None
    state.asm.feed(chunk)
    return chunk


async def _relayed_body(
    resp: aiohttp.ClientResponse, call: Call, state: _StreamState, record: Callable[[], None]
) -> AsyncIterator[bytes]:
    rewrite = needs_rewrite(call)

    def on_event(event: bytes) -> bytes:
        chunk = _chunk_of(event, state)
        if chunk is None or not rewrite:
            return event
        if not strip(chunk, call.injected):
            return b""
        rewrite_back(chunk, call)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async for events in _events(resp, call, state):
        t0 = time.perf_counter()
        out = b"".join(on_event(e) for e in events)
        call.processing_s += time.perf_counter() - t0
        if state.asm.done:
            record()  # these bytes carry [DONE]
        if out:
            yield out
    record()  # before the error event, or before the end of a stream without [DONE]
    if state.error:
        yield b"data: " + error_body(502, "the policy server's stream broke off") + b"\n\n"


async def _translated_body(
    resp: aiohttp.ClientResponse, call: Call, state: _StreamState, api: Api, record: Callable[[], None]
) -> AsyncIterator[bytes]:
    """vLLM's chat stream, stripped of what the proxy injected, as the client API's events. The record is
    journaled when vLLM's stream has ended, before the translator writes its closing events; and, should a
    translator close the stream earlier, before any output carrying one of the API's ending events."""

    # The usage chunk the proxy asked for is part of these APIs' own answers (Responses' usage, Anthropic's
    # message_delta): only the token ids and logprobs are taken out before translation.
    injected = dataclasses.replace(call.injected, usage=False)

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        async for events in _events(resp, call, state):
            for event in events:
                chunk = _chunk_of(event, state)
                if chunk is not None and strip(chunk, injected):
                    yield chunk
        record()
        if state.error:
            yield {"error": {"message": "the policy server's stream broke off", "type": "upstream_error"}}

    assert api.stream is not None
    async for out in api.stream(chunks(), call.request, Ids.of(call.call_id)):
        if not state.recorded and any(end in out for end in api.stream_ends):
            record()
        yield out


def _stream_error(resp: aiohttp.ClientResponse, call: Call, submit, api: Api) -> Response:
    """The upstream refused the stream (a 4xx or 5xx before any event): relay its error, recorded."""

    async def body() -> AsyncIterator[bytes]:
        raw = b""
        try:
            raw = await resp.read()
        finally:
            resp.release()
            call.t_upstream_done = time.perf_counter()
            try:
                parsed = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                parsed = {"raw": raw[:65536].decode("utf-8", "replace")}
            error = _error_text(parsed, raw)
            submit(call.record(status=resp.status, response=parsed, error=error))
        yield api.error_body(resp.status, error, None, None) if api.translated else raw

    headers = response_headers(resp, call)
    if api.translated:
        headers["content-type"] = "application/json"
    return StreamingResponse(body(), status_code=resp.status, headers=headers)


def _not_a_stream(resp: aiohttp.ClientResponse, call: Call, submit, api: Api) -> Response:
    """A 200 that is not an event stream (an HTML page, a JSON body): an upstream error, recorded as one."""

    async def body() -> AsyncIterator[bytes]:
        try:
            raw = await resp.read()
        finally:
            resp.release()
        call.t_upstream_done = time.perf_counter()
        yield bytes(_not_an_answer(call, submit, api, raw, resp.headers.get("content-type")).body)

    return StreamingResponse(body(), status_code=502, media_type="application/json", headers=call.headers())

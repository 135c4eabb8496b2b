"""Serving one chat or completion call: admission, the session's context, the policy or a frozen route, and
the record. It takes the client's headers and body bytes and returns the response to send, so the hot path
(proxy/hot_path.py) runs it without the web framework's per-request machinery."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Mapping

import aiohttp
import orjson
from starlette.responses import Response
from trainwire.proxy.auth import require_agent_key
from trainwire.proxy.errors import ApiError, error_response
from trainwire.proxy.forward import (
    Call,
    UpstreamUnavailable,
    complete,
    open_upstream,
    stream,
)
from trainwire.proxy.plumbing import admit
from trainwire.proxy.session_headers import context_from
from trainwire.proxy.transparency import prepare

KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise ApiError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


async def generate(tw, headers: Mapping[str, str], raw: bytes, path: str, session_id: str | None) -> Response:
    """`path` is the OpenAI path (/v1/chat/completions or /v1/completions); `session_id` the one from the
    URL, if the client put it there."""
    require_agent_key(headers, tw.settings)
    ctx = context_from(headers, session_id)
    body = parse_body(raw)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
    call = Call(ctx=ctx, kind=KINDS[path], path=path, request=body, stream=bool(body.get("stream")),
                model_requested=model)
    if model is not None and model != tw.settings.policy_model:
        if tw.frozen is None or not tw.frozen.knows(model):
            known = [tw.settings.policy_model, *(tw.frozen.names() if tw.frozen else [])]
            raise ApiError(404, f"The model '{model}' does not exist. Known models: {', '.join(known)}",
                           param="model", code="model_not_found")
        call.route = "frozen"
    call.seq = await admit(tw, ctx)
    if call.route == "frozen":
        return await tw.frozen.serve(call, tw.record)
    return await _serve_policy(tw, tw.upstream_headers(headers), call)


async def _serve_policy(tw, upstream_headers: dict[str, str], call: Call) -> Response:
    upstream_body = dict(call.request)
    call.injected = prepare(call.kind, upstream_body)

    def payload_for(url: str) -> bytes:
        served, version = tw.policy.resolve(url)
        call.model_served, call.policy_version = served, version
        if served is not None:
            upstream_body["model"] = served
        return orjson.dumps(upstream_body)

    if tw.policy.base_model is None:
        await tw.discover_base_model()
    try:
        resp = await open_upstream(tw.pool, tw.http, call, b"", upstream_headers, tw.timeout, payload_for)
    except UpstreamUnavailable as exc:
        return fail(tw, call, 502, str(exc))
    except asyncio.TimeoutError:
        return fail(tw, call, 504, f"upstream did not answer within {tw.settings.upstream_timeout_s:.0f}s")
    except aiohttp.ClientError as exc:
        return fail(tw, call, 502, f"upstream error: {exc!r}")
    if resp.status == 404 and call.policy_version and call.model_served != tw.policy.base_model:
        resp = await _retry_on_base(tw, upstream_headers, call, resp, payload_for)
        if isinstance(resp, Response):
            return resp
    if call.stream:
        return stream(resp, call, tw.record)
    try:
        return await complete(resp, call, tw.record)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return fail(tw, call, 502, f"upstream broke off: {exc!r}")


async def _retry_on_base(tw, upstream_headers: dict[str, str], call: Call, resp, payload_for):
    """The upstream lost the adapter it was publishing (vLLM restarted): serve this call from the base model
    instead of failing the agent, and stamp it honestly as version 0."""
    body = await resp.read()
    resp.release()
    if b"does not exist" not in body and b"not found" not in body.lower():
        call.t_upstream_done = time.perf_counter()
        tw.record(call.record(status=404, response={"raw": body.decode("utf-8", "replace")},
                              error=body[:2000].decode("utf-8", "replace")))
        return Response(body, status_code=404, headers=call.headers(), media_type="application/json")
    tw.policy.mark_missing(call.upstream)
    url = call.upstream
    try:
        return await tw.http.post(f"{url}{call.path}", data=payload_for(url), headers=upstream_headers,
                                  timeout=tw.timeout)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return fail(tw, call, 502, f"upstream error: {exc!r}")


def fail(tw, call: Call, status: int, message: str) -> Response:
    """Answer with an upstream failure, and record it."""
    call.t_upstream_done = time.perf_counter()
    tw.record(call.record(status=status, response=None, error=message))
    return error_response(status, message, code="upstream_unavailable", headers=call.headers())

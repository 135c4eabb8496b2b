"""OpenAI-compatible routes, at /v1/... and at /sessions/{session_id}/v1/... for clients that cannot set headers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from proxy.auth import require_agent_key
from proxy.errors import ApiError, error_response
from proxy.forward import Call, UpstreamUnavailable, complete, open_upstream, response_headers, stream
from proxy.session_headers import context_from
from proxy.transparency import prepare

router = APIRouter()
# Catch-all for the rest of vLLM's API; included last so it shadows nothing.
passthrough_router = APIRouter()

KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


def _state(request: Request):
    return request.app.state.tw


async def _read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        raise ApiError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


async def _generate(request: Request, path: str, session_id: str | None) -> Response:
    tw = _state(request)
    require_agent_key(request, tw.settings)
    ctx = context_from(request.headers, session_id)
    body = await _read_json(request)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
    kind = KINDS[path]
    call = Call(ctx=ctx, kind=kind, path=path, request=body, stream=bool(body.get("stream")),
                model_requested=model)
    if model is not None and model != tw.settings.policy_model:
        if tw.frozen is None or not tw.frozen.knows(model):
            known = [tw.settings.policy_model, *(tw.frozen.names() if tw.frozen else [])]
            raise ApiError(404, f"The model '{model}' does not exist. Known models: {', '.join(known)}",
                           param="model", code="model_not_found")
        call.route = "frozen"
    await tw.writer.wait_for_room()
    call.seq = tw.next_seq(ctx.session_id)
    tw.writer.begin(ctx.session_id)
    if call.route == "frozen":
        return await tw.frozen.serve(call, tw.record)
    return await _serve_policy(tw, request, call)


async def _serve_policy(tw, request: Request, call: Call) -> Response:
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
        resp = await open_upstream(tw.pool, tw.http, call, b"", tw.upstream_headers(request), tw.timeout,
                                   payload_for)
    except UpstreamUnavailable as exc:
        return _fail(tw, call, 502, str(exc))
    except asyncio.TimeoutError:
        return _fail(tw, call, 504, f"upstream did not answer within {tw.settings.upstream_timeout_s:.0f}s")
    except aiohttp.ClientError as exc:
        return _fail(tw, call, 502, f"upstream error: {exc!r}")
    if resp.status == 404 and call.policy_version and call.model_served != tw.policy.base_model:
        resp = await _retry_on_base(tw, request, call, resp, payload_for)
        if isinstance(resp, Response):
            return resp
    if call.stream:
        return stream(resp, call, tw.record)
    try:
        return await complete(resp, call, tw.record)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return _fail(tw, call, 502, f"upstream broke off: {exc!r}")


async def _retry_on_base(tw, request: Request, call: Call, resp, payload_for):
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
        return await tw.http.post(f"{url}{call.path}", data=payload_for(url), headers=tw.upstream_headers(request),
                                  timeout=tw.timeout)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return _fail(tw, call, 502, f"upstream error: {exc!r}")


def _fail(tw, call: Call, status: int, message: str) -> Response:
    call.t_upstream_done = time.perf_counter()
    tw.record(call.record(status=status, response=None, error=message))
    return error_response(status, message, code="upstream_unavailable", headers=call.headers())


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _generate(request, "/v1/chat/completions", None)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _generate(request, "/v1/completions", None)


@router.post("/sessions/{session_id}/v1/chat/completions")
async def session_chat_completions(request: Request, session_id: str) -> Response:
    return await _generate(request, "/v1/chat/completions", session_id)


@router.post("/sessions/{session_id}/v1/completions")
async def session_completions(request: Request, session_id: str) -> Response:
    return await _generate(request, "/v1/completions", session_id)


def _models_body(tw) -> bytes:
    created = int(tw.started_at)
    names = [tw.settings.policy_model, *(tw.frozen.names() if tw.frozen else [])]
    return orjson.dumps({"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "trainwire"} for name in names]})


@router.get("/v1/models")
@router.get("/sessions/{session_id}/v1/models")
async def models(request: Request, session_id: str | None = None) -> Response:
    tw = _state(request)
    require_agent_key(request, tw.settings)
    return Response(_models_body(tw), media_type="application/json")


# --- everything else vLLM serves: passed through, recorded as generic calls -----------------------------

PASSTHROUGH_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH"]


@passthrough_router.api_route("/v1/{rest:path}", methods=PASSTHROUGH_METHODS)
async def passthrough(request: Request, rest: str) -> Response:
    return await _passthrough(request, f"/v1/{rest}", None)


@passthrough_router.api_route("/sessions/{session_id}/v1/{rest:path}", methods=PASSTHROUGH_METHODS)
async def session_passthrough(request: Request, session_id: str, rest: str) -> Response:
    return await _passthrough(request, f"/v1/{rest}", session_id)


@router.api_route("/tokenize", methods=["POST"])
@router.api_route("/detokenize", methods=["POST"])
async def tokenize(request: Request) -> Response:
    return await _passthrough(request, request.url.path, None)


async def _passthrough(request: Request, path: str, session_id: str | None) -> Response:
    tw = _state(request)
    require_agent_key(request, tw.settings)
    ctx = context_from(request.headers, session_id)
    raw = await request.body()
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        body = {"raw": raw.decode("utf-8", "replace")}
    call = Call(ctx=ctx, kind="other", path=path, request=body, stream=False,
                model_requested=body.get("model") if isinstance(body, dict) else None, route="passthrough")
    await tw.writer.wait_for_room()
    call.seq = tw.next_seq(ctx.session_id)
    tw.writer.begin(ctx.session_id)
    upstream = tw.pool.order(ctx.session_id)[0]
    served, version = tw.policy.resolve(upstream.url)
    call.upstream, call.policy_version = upstream.url, version
    if isinstance(body, dict) and body.get("model") == tw.settings.policy_model and served:
        body = {**body, "model": served}
        raw = orjson.dumps(body)
    call.model_served = body.get("model") if isinstance(body, dict) else None
    headers = tw.upstream_headers(request)
    call.t_sent = time.perf_counter()
    try:
        resp = await tw.http.request(request.method, f"{upstream.url}{path}", params=request.query_params,
                                     data=raw or None, headers=headers, timeout=tw.timeout)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return _fail(tw, call, 502, f"upstream error: {exc!r}")
    out_headers = response_headers(resp, call)

    async def relay():
        chunks: list[bytes] = []
        try:
            async for data in resp.content.iter_any():
                chunks.append(data)
                yield data
        finally:
            resp.close()
            call.t_upstream_done = time.perf_counter()
            text = b"".join(chunks)
            try:
                parsed = orjson.loads(text) if text else None
            except orjson.JSONDecodeError:
                parsed = {"raw": text.decode("utf-8", "replace")}
            tw.record(call.record(status=resp.status, response=parsed,
                                  error=None if resp.status < 400 else text[:2000].decode("utf-8", "replace")))

    return StreamingResponse(relay(), status_code=resp.status, headers=out_headers)

"""OpenAI-compatible routes other than generation, at /v1/... and at /sessions/{session_id}/v1/... for clients
that cannot set headers: the model list, and the rest of vLLM's API passed through and recorded. Chat and
completions are served by proxy/hot_path.py, in front of the framework."""

from __future__ import annotations

import time

import aiohttp
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from trainwire.call_shapes import OTHER
from trainwire.proxy.apis import CHAT
from trainwire.proxy.auth import require_agent_key
from trainwire.proxy.forward import Call, response_headers
from trainwire.proxy.generation import fail
from trainwire.proxy.hot_path import CONTEXT_KEY
from trainwire.proxy.plumbing import admit, state_of
from trainwire.proxy.session_headers import context_from

router = APIRouter()
# Catch-all for the rest of vLLM's API; included last so it shadows nothing.
passthrough_router = APIRouter()


def _models_body(tw) -> bytes:
    created = int(tw.started_at)
    names = [tw.settings.policy_model, *(tw.frozen.names() if tw.frozen else [])]
    return orjson.dumps(
        {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "trainwire"} for name in names],
        }
    )


@router.get("/v1/models")
@router.get("/sessions/{session_id:twsession}/v1/models")
async def models(request: Request, session_id: str | None = None) -> Response:
    tw = state_of(request)
    require_agent_key(request.headers, tw.settings)
    return Response(_models_body(tw), media_type="application/json")


# --- everything else vLLM serves: passed through, recorded as generic calls -----------------------------

PASSTHROUGH_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH"]


@passthrough_router.api_route("/v1/{rest:path}", methods=PASSTHROUGH_METHODS)
async def passthrough(request: Request, rest: str) -> Response:
    return await _passthrough(request, f"/v1/{rest}", None)


@passthrough_router.api_route("/sessions/{session_id:twsession}/v1/{rest:path}", methods=PASSTHROUGH_METHODS)
async def session_passthrough(request: Request, session_id: str, rest: str) -> Response:
    return await _passthrough(request, f"/v1/{rest}", session_id)


@router.api_route("/tokenize", methods=["POST"])
@router.api_route("/detokenize", methods=["POST"])
async def tokenize(request: Request) -> Response:
    return await _passthrough(request, request.url.path, None)


async def _passthrough(request: Request, path: str, session_id: str | None) -> Response:
    tw = state_of(request)
    require_agent_key(request.headers, tw.settings)
    ctx = context_from(request.headers, session_id, request.scope.get(CONTEXT_KEY))
    raw = await request.body()
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        body = {"raw": raw.decode("utf-8", "replace")}
    call = Call(
        ctx=ctx,
        kind=OTHER.kind,  # a pass-through call: its shape reads nothing
        path=path,
        request=body,
        stream=False,
        model_requested=body.get("model") if isinstance(body, dict) else None,
        route="passthrough",
    )
    call.seq = await admit(tw, ctx, generation=False)
    upstream = tw.pool.order(ctx.session_id)[0]
    served, version = tw.policy.resolve(upstream.url)
    call.upstream, call.policy_version = upstream.url, version
    if isinstance(body, dict) and body.get("model") == tw.settings.policy_model and served:
        body = {**body, "model": served}
        raw = orjson.dumps(body)
    call.model_served = body.get("model") if isinstance(body, dict) else None
    headers = tw.upstream_headers(request.headers)
    call.t_sent = time.perf_counter()
    try:
        resp = await tw.http.request(
            request.method,
            f"{upstream.url}{path}",
            params=request.query_params,
            data=raw or None,
            headers=headers,
            timeout=tw.timeout,
        )
    except (TimeoutError, aiohttp.ClientError) as exc:
        return fail(tw, call, CHAT, 502, "the policy server failed", f"upstream error: {exc!r}")
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
            tw.record(
                call.record(
                    status=resp.status,
                    response=parsed,
                    error=None if resp.status < 400 else text[:2000].decode("utf-8", "replace"),
                )
            )

    return StreamingResponse(relay(), status_code=resp.status, headers=out_headers)

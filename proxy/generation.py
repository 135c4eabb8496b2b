"""Serving one generation call (chat, completions, Responses, Messages): translation, sampling integrity, admission, the session's context, the policy or a frozen route, and
the record. It takes the client's headers and body bytes and returns the response to send, so the hot path
(proxy/hot_path.py) runs it without the web framework's per-request machinery."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
from starlette.responses import Response

from trainwire.proxy import sampling
from trainwire.proxy.api_fields import Screened, screen
from trainwire.proxy.apis import Api
from trainwire.proxy.auth import require_agent_key
from trainwire.proxy.errors import ApiError
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


async def generate(
    tw,
    headers: Mapping[str, str],
    raw: bytes,
    api: Api,
    path: str,
    session_id: str | None,
    path_values: Mapping[str, str] | None = None,
) -> Response:
    """`path` is the API's path (/v1/chat/completions, /v1/responses, ...); `session_id` the one from a
    /sessions/{id}/ URL and `path_values` what a /tw/.../ URL said, if the client put them there."""
    require_agent_key(headers, tw.settings)
    ctx = context_from(headers, session_id, path_values)
    body = parse_body(raw)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
    call = Call(
        ctx=ctx,
        kind=api.kind,
        path=path,
        request=body,
        stream=bool(body.get("stream")),
        model_requested=model,
        upstream_path=api.upstream_path,
    )
    if model is not None and model != tw.settings.policy_model:
        if tw.frozen is None or not tw.frozen.knows(model):
            known = [tw.settings.policy_model, *(tw.frozen.names() if tw.frozen else [])]
            raise ApiError(
                404,
                f"The model '{model}' does not exist. Known models: {', '.join(known)}",
                param="model",
                code="model_not_found",
            )
        if api.translated:
            raise ApiError(
                400,
                f"model routes serve chat and completions; {path} serves the policy "
                f"({tw.settings.policy_model!r}) only",
                param="model",
                code="model_not_supported",
            )
        call.route = "frozen"
    if api.ready is not None:
        await api.ready()
    if api.to_upstream is not None:
        screened = Screened(body)
        if api.fields is not None:
            screened = screen(body, api.fields, unknown=tw.settings.unknown_fields, headers=headers)
        upstream_body = api.to_upstream(screened.body)
        call.ignored = list(screened.ignored)
    else:
        upstream_body = dict(body)
    if call.route == "policy" and ctx.trainable:
        outcome = sampling.apply(upstream_body, policy=tw.settings.sampling_policy, temperature=tw.settings.temperature)
        call.sampling, call.untrainable = outcome.record(), outcome.untrainable
        call.enforced = outcome.changed
    else:
        call.sampling = {"requested": {k: upstream_body[k] for k in sampling.neutral(1.0) if k in upstream_body}}
    if call.ignored:
        call.sampling["ignored"] = call.ignored  # beside the request as sent: what of it changed nothing
    call.seq = await admit(tw, ctx)
    if call.route == "frozen":
        return await tw.frozen.serve(call, tw.record)
    return await _serve_policy(tw, tw.upstream_headers(headers), call, api, upstream_body)


async def _serve_policy(
    tw, upstream_headers: dict[str, str], call: Call, api: Api, upstream_body: dict[str, Any]
) -> Response:
    call.injected = prepare(api.upstream_kind, upstream_body)

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
        return fail(tw, call, api, 502, "the policy server is unreachable", str(exc))
    except TimeoutError:
        return fail(
            tw, call, api, 504, f"the policy server did not answer within {tw.settings.upstream_timeout_s:.0f}s"
        )
    except aiohttp.ClientError as exc:
        return fail(tw, call, api, 502, "the policy server failed", f"upstream error: {exc!r}")
    if resp.status == 404 and call.policy_version and call.model_served != tw.policy.base_model:
        resp = await _retry_on_base(tw, upstream_headers, call, api, resp, payload_for)
        if isinstance(resp, Response):
            return resp
    if call.stream:
        return stream(resp, call, tw.record, api)
    try:
        return await complete(resp, call, tw.record, api)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return fail(tw, call, api, 502, "the policy server broke off its answer", f"upstream broke off: {exc!r}")


async def _retry_on_base(tw, upstream_headers: dict[str, str], call: Call, api: Api, resp, payload_for):
    """The upstream lost the adapter it was publishing (vLLM restarted): serve this call from the base model
    instead of failing the agent, and stamp it honestly as version 0."""
    body = await resp.read()
    resp.release()
    if b"does not exist" not in body and b"not found" not in body.lower():
        call.t_upstream_done = time.perf_counter()
        text = body[:2000].decode("utf-8", "replace")
        tw.record(call.record(status=404, response={"raw": text}, error=text))
        return Response(
            api.error_body(404, f"the policy server answered 404: {text[:500]}", None, "upstream_error"),
            status_code=404,
            headers=call.headers(),
            media_type="application/json",
        )
    tw.policy.mark_missing(call.upstream)
    url = call.upstream
    try:
        return await tw.http.post(
            f"{url}{call.upstream_path}", data=payload_for(url), headers=upstream_headers, timeout=tw.timeout
        )
    except (TimeoutError, aiohttp.ClientError) as exc:
        return fail(tw, call, api, 502, "the policy server failed", f"upstream error: {exc!r}")


def fail(tw, call: Call, api: Api, status: int, message: str, detail: str | None = None) -> Response:
    """Answer with an upstream failure, and record it. The agent gets `message`; `detail`, which names the
    upstream's address, goes only into the record (and the read API, behind the admin key)."""
    call.t_upstream_done = time.perf_counter()
    tw.record(call.record(status=status, response=None, error=detail or message))
    return Response(
        api.error_body(status, message, None, "upstream_timeout" if status == 504 else "upstream_unavailable"),
        status_code=status,
        media_type="application/json",
        headers=call.headers(),
    )

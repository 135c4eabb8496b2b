"""`POST /v1/traces`: an agent's OTLP/HTTP traces, turned into automatic rewards from its tools' real status.

Authorized like the generation routes (the agent key, when one is set). Protobuf or JSON, gzip or not
(proxy/otlp_ingest.py); tool spans linked to their session and call (proxy/tool_spans.py) and judged by the
tool-span rules (`--air-tool-span-error`). The answer is OTLP's: 200 with an ExportTraceServiceResponse in the
request's encoding, `partial_success` counting the spans refused (malformed ids, too many in one request). Spans
of unknown traces or sessions are accepted and ignored. Errors (not OTLP, wrong key, too large) are 4xx in the
proxy's error format; exporters act on the status alone.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from starlette.responses import Response

from trainwire.proxy.auth import require_agent_key
from trainwire.proxy.errors import ApiError, responses
from trainwire.proxy.hot_path import CONTEXT_KEY
from trainwire.proxy.otlp_ingest import DECODERS, BadOtlp, Decoded, gunzip
from trainwire.proxy.plumbing import state_of
from trainwire.proxy.session_headers import check_id
from trainwire.proxy.tool_spans import IngestCounts, link_after_writes

log = logging.getLogger("trainwire.otlp")
router = APIRouter(tags=["tracing"])

_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": "OTLP's JSON mapping of ExportTraceServiceRequest (hex ids, camelCase)",
                    "properties": {"resourceSpans": {"type": "array", "items": {"type": "object"}}},
                }
            },
        },
    }
}
_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "ExportTraceServiceResponse, in the request's encoding; `partialSuccess.rejectedSpans` "
        "counts spans refused (malformed ids, too many tool spans in one request)",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "partialSuccess": {
                            "type": "object",
                            "properties": {
                                "rejectedSpans": {"type": "string"},
                                "errorMessage": {"type": "string"},
                            },
                        }
                    },
                }
            },
            "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _media(request: Request) -> str:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in DECODERS:
        raise ApiError(
            415,
            f"POST /v1/traces takes OTLP as application/x-protobuf or application/json; got {media or 'none'!r}",
            code="unsupported_media_type",
        )
    return media


def _answer(media: str, decoded: Decoded) -> Response:
    msg = ExportTraceServiceResponse()
    if decoded.rejected:
        msg.partial_success.rejected_spans = decoded.rejected
        msg.partial_success.error_message = "; ".join(decoded.problems)
    if media == "application/json":
        body = orjson.dumps(json_format.MessageToDict(msg))
    else:
        body = msg.SerializeToString()
    return Response(body, media_type=media)


@router.post(
    "/v1/traces",
    responses={
        **_OK,
        **responses(400, 401, 413, 415, s415="Not OTLP protobuf or JSON, or an encoding other than gzip"),
    },
    openapi_extra=_BODY,
)
async def ingest_traces(request: Request) -> Response:
    tw = state_of(request)
    require_agent_key(request.headers, tw.settings)
    media = _media(request)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        raise ApiError(415, f"content-encoding {encoding!r}: only gzip or none", code="unsupported_media_type")
    named = request.headers.get("x-session-id") or (request.scope.get(CONTEXT_KEY) or {}).get("x-session-id")
    default_session = check_id(named, "X-Session-Id") if named else None
    body = await request.body()
    limit = tw.settings.max_request_bytes
    try:
        if encoding == "gzip":
            body = gunzip(body, limit)
        # Decoding a large batch is CPU work: off the event loop, so calls keep flowing meanwhile.
        decoded = await asyncio.to_thread(DECODERS[media], body)
    except OverflowError:
        raise ApiError(
            413, f"gzip body inflates past {limit} bytes (--max-request-bytes)", code="request_too_large"
        ) from None
    except BadOtlp as exc:
        raise ApiError(400, str(exc), code="invalid_otlp") from None
    counts = tw.otlp_ingest
    counts.requests += 1
    counts.spans += decoded.spans
    counts.rejected += decoded.rejected
    counts.tool_spans += len(decoded.tool_spans)
    counts.tool_errors += sum(1 for s in decoded.tool_spans if s.error)
    if decoded.tool_spans:
        await _reward(tw, decoded, default_session, counts)
    return _answer(media, decoded)


async def _reward(tw, decoded: Decoded, default_session: str | None, counts: IngestCounts) -> None:
    # Only spans some rule could reward need a call: today that is the failed ones.
    wanted = [s for s in decoded.tool_spans if s.error]
    if not wanted:
        return
    for result in await link_after_writes(tw, wanted, default_session):
        if isinstance(result, str):
            counts.unlink(result)
            continue
        counts.linked += 1
        try:
            counts.rewards += tw.air.observe_tool_span(result)
        except Exception:
            log.exception("tool-span rules failed on span %s; no reward", result.span.span_id)

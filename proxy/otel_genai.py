"""A recorded call's span attributes: OpenTelemetry's GenAI semantic conventions plus trainwire's own.

Pure functions of a CallRecord (proxy/otel_export.py runs them on its own thread). Each API's answer keeps its
id, finish reasons and token counts in its own place; `_SHAPES` says where, one entry per API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from trainwire.records import CallRecord

# gen_ai.operation.name per recorded API (`CallRecord.kind`).
OPERATIONS = {
    "chat": "chat",
    "completion": "text_completion",
    "responses": "chat",
    "messages": "chat",
    "other": "other",
}
# Request fields -> gen_ai.request.* attributes, as the client asked for them (what was sent is in
# trainwire.sampling.enforced when the sampling policy changed it).
_REQUEST = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "max_output_tokens": "gen_ai.request.max_tokens",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
    "n": "gen_ai.request.choice.count",
}


def operation_name(rec: CallRecord) -> str:
    return OPERATIONS.get(rec.kind, rec.kind)


def _chat_finish(resp: dict) -> list[str]:
    return [
        str(c.get("finish_reason")) for c in resp.get("choices") or [] if isinstance(c, dict) and c.get("finish_reason")
    ]


def _responses_finish(resp: dict) -> list[str]:
    status = resp.get("status")
    reason = (
        (resp.get("incomplete_details") or {}).get("reason")
        if isinstance(resp.get("incomplete_details"), dict)
        else None
    )
    return [str(reason or status)] if (reason or status) else []


def _messages_finish(resp: dict) -> list[str]:
    return [str(resp["stop_reason"])] if resp.get("stop_reason") else []


def _tokens(usage: dict, inp: str, out: str) -> tuple[Any, Any]:
    return usage.get(inp), usage.get(out)


# kind -> (finish reasons of the answer, (input, output) usage keys)
_SHAPES: dict[str, tuple[Callable[[dict], list[str]], tuple[str, str]]] = {
    "chat": (_chat_finish, ("prompt_tokens", "completion_tokens")),
    "completion": (_chat_finish, ("prompt_tokens", "completion_tokens")),
    "responses": (_responses_finish, ("input_tokens", "output_tokens")),
    "messages": (_messages_finish, ("input_tokens", "output_tokens")),
}


def _put(attrs: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, bool) or value is None:
        if value is not None:
            attrs[key] = value
    elif isinstance(value, (int, float, str)):
        attrs[key] = value
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        attrs[key] = value


def call_attributes(rec: CallRecord, *, content: bool) -> dict[str, Any]:
    policy = rec.route == "policy"
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation_name(rec),
        # gen_ai.provider.name replaced gen_ai.system in semconv 1.37; backends still read either.
        "gen_ai.provider.name": "vllm" if policy else rec.route,
        "gen_ai.system": "vllm" if policy else rec.route,
        "openinference.span.kind": "LLM",  # how Phoenix and other OpenInference backends sort spans
        "trainwire.call_id": rec.id,
        "trainwire.session_id": rec.session_id,
        "session.id": rec.session_id,  # OpenInference's and Langfuse's session attribute
        "trainwire.seq": rec.seq,
        "trainwire.api": rec.kind,
        "trainwire.route": rec.route,
        "trainwire.trainable": bool(rec.trainable and rec.untrainable_reason is None),
        "http.response.status_code": rec.status_code,
    }
    _put(attrs, "gen_ai.request.model", rec.model_requested)
    _put(attrs, "trainwire.task_id", rec.task_id)
    _put(attrs, "trainwire.agent_name", rec.agent_name)
    _put(attrs, "gen_ai.agent.name", rec.agent_name)
    _put(attrs, "trainwire.policy_version", rec.policy_version)
    if not rec.trainable:
        attrs["trainwire.untrainable_reason"] = (
            "evaluation call (X-Trainwire-Train: false)" if policy else f"{rec.route} route: not the policy"
        )
    _put(attrs, "trainwire.untrainable_reason", rec.untrainable_reason)
    _put(attrs, "trainwire.upstream_ms", rec.upstream_ms)
    _put(attrs, "trainwire.ttft_ms", rec.ttft_ms)
    _put(attrs, "trainwire.overhead_ms", rec.overhead_ms)
    if rec.aborted:
        attrs["trainwire.aborted"] = True
    if rec.status_code != 200 or rec.error:
        attrs["error.type"] = str(rec.status_code) if rec.status_code != 200 else "error"
    enforced = (rec.sampling or {}).get("enforced") if isinstance(rec.sampling, dict) else None
    if isinstance(enforced, list) and enforced:
        attrs["trainwire.sampling.enforced"] = [str(e) for e in enforced]
    request = rec.request if isinstance(rec.request, dict) else {}
    for field, key in _REQUEST.items():
        if key not in attrs:
            _put(attrs, key, request.get(field))
    stop = request.get("stop") or request.get("stop_sequences")
    _put(attrs, "gen_ai.request.stop_sequences", [stop] if isinstance(stop, str) else stop)
    resp = rec.response if isinstance(rec.response, dict) else {}
    _put(attrs, "gen_ai.response.id", resp.get("id"))
    _put(attrs, "gen_ai.response.model", rec.model_served or resp.get("model"))  # what really served it
    finish_of, (inp, out) = _SHAPES.get(rec.kind, (_chat_finish, ("prompt_tokens", "completion_tokens")))
    reasons = finish_of(resp) or ([rec.finish_reason] if rec.finish_reason else [])
    _put(attrs, "gen_ai.response.finish_reasons", reasons)
    usage = rec.usage or (resp.get("usage") if isinstance(resp.get("usage"), dict) else None) or {}
    n_in, n_out = _tokens(usage, inp, out)
    if n_in is None and rec.prompt_token_ids:
        n_in = len(rec.prompt_token_ids)
    if n_out is None and rec.completion_token_ids:
        n_out = len(rec.completion_token_ids)
    _put(attrs, "gen_ai.usage.input_tokens", n_in)
    _put(attrs, "gen_ai.usage.output_tokens", n_out)
    if content:
        _content(attrs, rec.kind, request, resp)
    return attrs


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _content(attrs: dict[str, Any], kind: str, request: dict, resp: dict) -> None:
    """Message content, only with --otlp-content (the conventions advise it off by default: it may hold
    personal data). JSON strings, as gen_ai.input.messages / gen_ai.output.messages are specified."""
    inputs = request.get("messages") if kind in ("chat", "messages") else request.get("input", request.get("prompt"))
    if kind == "messages" and request.get("system"):
        attrs["gen_ai.system_instructions"] = _json(request["system"])
    if kind == "responses" and request.get("instructions"):
        attrs["gen_ai.system_instructions"] = _json(request["instructions"])
    if inputs is not None:
        attrs["gen_ai.input.messages"] = _json(inputs)
    if kind in ("chat", "completion"):
        outputs: Any = [
            c.get("message") or {"text": c.get("text")} for c in resp.get("choices") or [] if isinstance(c, dict)
        ]
    elif kind == "responses":
        outputs = resp.get("output")
    else:
        outputs = resp.get("content")
    if outputs is not None:
        attrs["gen_ai.output.messages"] = _json(outputs)

"""The OpenAPI document (/openapi.json) as the API is, not as FastAPI guesses it:

- FastAPI declares a 422 with its own validation-error schema on every route with parameters; this app answers
  parameter errors with a 400 in OpenAI's format (proxy/errors.py), so that 422 becomes a 400 with the error
  schema (a route that really answers 422, e.g. a reused idempotency key, declares it itself).
- The generation routes are served by the hot path (proxy/hot_path.py), in front of FastAPI, so FastAPI knows
  nothing of them. They are documented here from documentation-only routes, which are never added to the app's
  router: no request can reach them.
- The pass-through of the rest of vLLM's API relays whatever vLLM answers: documented as such (`default`).
- Operation ids are unique (FastAPI gives every method of a multi-method route the same one).
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from fastapi import APIRouter
from fastapi.openapi.utils import get_openapi

from trainwire.proxy.errors import responses
from trainwire.proxy.reward_routes import NO_NUL, STORABLE_JSON

GENERATION = {
    "/v1/chat/completions": "Chat Completions, as vLLM serves them (token ids and logprobs recorded, and removed "
    "from the answer unless asked for)",
    "/v1/completions": "Completions, as vLLM serves them",
    "/v1/responses": "OpenAI's Responses API, translated to chat completions (no server-side state)",
    "/v1/messages": "Anthropic's Messages API, translated to chat completions (errors in Anthropic's format)",
}
_HEADERS = (
    "`X-Session-Id`, `X-Task-Id`, `X-Agent-Name`, `X-Trainwire-Train` (or `/sessions/{session_id}/v1/...`, or "
    "a `/tw/session=.../v1` base URL); every answer carries `X-Session-Id`, `X-Call-Id` and "
    "`X-Policy-Version`; a Responses or Messages answer also `X-Trainwire-Ignored` naming the request fields "
    "that were accepted and changed nothing."
)
_PASSTHROUGH = {
    "default": {
        "description": "vLLM's answer, relayed as it is (its status and body); 401 without the "
        "API key, 502 when vLLM is unreachable"
    }
}
# Routes of proxy/openai_routes.py that answer themselves, with the errors they answer.
_OWN_ERRORS = {("/v1/models", "get"): (401,), ("/sessions/{session_id}/v1/models", "get"): (401, 404)}


async def _documentation_only() -> None:  # pragma: no cover - never routed
    raise RuntimeError("documentation-only route")


def generation_routes() -> list[Any]:
    router = APIRouter(tags=["generation"])
    body = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["model"],
                        "properties": {
                            "model": {
                                "type": "string",
                                "description": "The policy's name (--policy-model) or a --model-route name",
                            },
                            "stream": {"type": "boolean"},
                        },
                        "additionalProperties": True,
                    }
                }
            },
        }
    }
    errors = responses(
        400,
        401,
        404,
        413,
        429,
        501,
        502,
        504,
        s404="Unknown model (or vLLM's 404 for a model it does not serve)",
        s501="/v1/messages without litellm installed",
    )
    ok: dict[int | str, dict[str, Any]] = {
        200: {
            "description": "The API's answer: JSON, or `text/event-stream` when `stream` is true",
            "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
        }
    }
    for path, what in GENERATION.items():
        for full in (path, "/sessions/{session_id}" + path):
            router.add_api_route(
                full,
                _documentation_only,
                methods=["POST"],
                summary=what,
                description=f"Served in front of the framework and recorded. {_HEADERS}",
                responses={**ok, **errors, "default": {"description": "vLLM's error status and body, relayed"}},
                openapi_extra=body,
                operation_id="generate" + re.sub(r"[^A-Za-z0-9]+", "_", full).rstrip("_"),
            )
    return list(router.routes)


def document(app) -> dict[str, Any]:
    with warnings.catch_warnings():  # the duplicate operation ids of multi-method routes, made unique below
        warnings.filterwarnings("ignore", message="Duplicate Operation ID", category=UserWarning)
        schema = get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            summary=app.summary,
            description=app.description,
            routes=[*app.routes, *generation_routes()],
            tags=app.openapi_tags,
            servers=app.servers,
            separate_input_output_schemas=app.separate_input_output_schemas,
        )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    seen: set[str] = set()
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            answers = op.setdefault("responses", {})
            fastapi_422 = answers.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if fastapi_422.get("$ref", "").endswith("/HTTPValidationError"):
                del answers["422"]
                answers.setdefault("400", _error_response(400))
            if "/{rest}" in path or path in ("/tokenize", "/detokenize"):
                answers.update(_PASSTHROUGH)
            for parameter in op.get("parameters", ()):
                _plain(parameter.get("schema", {}))
                if not path.startswith("/v1/") and "/v1/" not in path:  # the admin routes' check (plumbing.py)
                    _no_nul(parameter.get("schema", {}))
            for status in _OWN_ERRORS.get((path, method), ()):
                answers.setdefault(str(status), _error_response(status))
            if op.get("operationId") in seen:  # FastAPI named every method of the route after its first one
                op["operationId"] = re.sub(r"_[a-z]+$", "", op["operationId"]) + f"_{method}"
            seen.add(op.get("operationId", ""))
    if "/HTTPValidationError'" not in repr(schema.get("paths")):  # FastAPI's validation errors are never answered
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
    components.setdefault("ErrorBody", _error_schema(components))
    components.setdefault("StorableJson", STORABLE_JSON)
    return schema


def _plain(schema: dict[str, Any]) -> None:
    """A parameter's schema as the wire has it. FastAPI declares an optional parameter as `anyOf: [X, null]`, with
    the keywords of `Query(...)` beside it, and its bounds as pydantic's `ge`/`le`, which are no JSON Schema
    keywords (so the document said nothing of them); a query string holds no null: absent is how it is omitted."""
    branches = [b for b in schema.get("anyOf", ()) if b.get("type") != "null"]
    if len(branches) == 1:
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        schema.clear()
        schema.update({**branches[0], **rest})
    elif branches:
        schema["anyOf"] = branches
    for pydantic_name, name in _BOUNDS.items():
        if pydantic_name in schema:
            schema[name] = schema.pop(pydantic_name)


_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _no_nul(schema: dict[str, Any]) -> None:
    """Free text in a parameter may hold anything but NUL (proxy/plumbing.py refuses it: the database cannot store
    it), and the document says so, so that a client or fuzzer knows it is not a valid value."""
    for sub in schema.get("anyOf", ()):
        _no_nul(sub)
    if "items" in schema:
        _no_nul(schema["items"])
    if schema.get("type") == "string" and not {"pattern", "enum", "format", "const"} & schema.keys():
        schema["pattern"] = NO_NUL


def _error_response(status: int) -> dict[str, Any]:
    (entry,) = responses(status).values()
    out = {
        "description": entry["description"],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    if "headers" in entry:
        out["headers"] = entry["headers"]
    return out


def _error_schema(components: dict[str, Any]) -> dict[str, Any]:
    from trainwire.proxy.errors import ErrorBody

    schema = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        components.setdefault(name, sub)
    return schema

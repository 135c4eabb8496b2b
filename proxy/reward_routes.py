"""Rewards by curl.

    POST /reward                       {"session_id": "abc", "reward": 1.0}
    POST /sessions/{session_id}/reward {"reward": 1.0}
    POST /sessions/{session_id}/finish {}                       (closes the episode without a reward)

Body: `session_id` (required unless in the path), `reward` (finite number, |reward| <= 1e12, required), `call_id` (optional: the
`X-Call-Id` of one call of the session; the reward is then intermediate unless `final` says otherwise), `final`
(default: true without `call_id`, false with it), `idempotency_key` (or the `Idempotency-Key` header) and
`metadata` (a JSON object). Bodies are parsed as strictly as on the generation routes (orjson: no NaN or Infinity,
no lone surrogates), and no text that the database cannot store (NUL) is accepted. Every refusal is a 4xx in
OpenAI's error format and stores nothing; a database that is away is a 503 with Retry-After (proxy/errors.py).
`GET` on the two session paths is a 405 (they are not session ids).

The answer is the stored reward: `{"object": "reward", "id", "session_id", "call_id", "final", "value",
"source", "idempotency_key", "metadata", "created_at", "orphaned", "duplicate"}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, ValidationError, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError
from starlette.responses import Response

from trainwire.proxy.air import KEY_PREFIX as AIR_KEY_PREFIX
from trainwire.proxy.errors import ApiError, responses
from trainwire.proxy.plumbing import admin, json_response, state_of
from trainwire.proxy.session_headers import (
    ID_PATTERN,  # importing it also registers the `twsession` path convertor
)
from trainwire.records import text_problem
from trainwire.store.read_models import RewardOut
from trainwire.store.rewards import (
    MAX_JSON_DEPTH,
    NewReward,
    RewardError,
    call_session,
    check_storable_json,
    session_exists,
    store_reward,
)

log = logging.getLogger("trainwire.rewards")


# No router-wide dependency: the 405 answers below come before the key, as the framework's own 405s do.
router = APIRouter()
ADMIN = [Depends(admin)]

MAX_METADATA_BYTES = 64 * 1024
# Sums and squares of rewards must stay finite: in the database's averages (/stats) and in the trainer's float32
# advantages. A reward beyond this is a bug in the reward function, not a signal.
MAX_ABS_REWARD = 1e12
FIELDS = ("session_id", "reward", "call_id", "final", "idempotency_key", "metadata")
# ID_PATTERN as a JSON Schema pattern (which, unlike fullmatch, needs the anchors).
_ID_DOC = f"^{ID_PATTERN.pattern}$"
NO_NUL = "^[^\\u0000]*$"
_INT64_BOUND = 2**63
# A JSON value the database stores and gives back the same (check_storable_json), for the OpenAPI document
# (proxy/openapi_doc.py adds it to the components). Its depth limit has no JSON Schema keyword.
STORABLE_JSON = {
    "description": "A JSON value the database keeps as it is: no NaN or Infinity, numbers of magnitude below "
    "2**63, no NUL character",
    "anyOf": [
        {"type": "null"},
        {"type": "boolean"},
        {"type": "number", "exclusiveMinimum": -_INT64_BOUND, "exclusiveMaximum": _INT64_BOUND},
        {"type": "string", "pattern": NO_NUL},
        {"type": "array", "items": {"$ref": "#/components/schemas/StorableJson"}},
        {
            "type": "object",
            "additionalProperties": {"$ref": "#/components/schemas/StorableJson"},
            "propertyNames": {"pattern": NO_NUL},
        },
    ],
}


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, str):
        return f"a string ({v[:40]!r})"
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    if isinstance(v, float) and math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    if isinstance(v, (dict, list)):
        return "an object" if isinstance(v, dict) else "an array"
    return repr(v)


def _fail(msg: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", msg)


def _id(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise _fail(f"must be a string; got {_describe(v)}")
    if not ID_PATTERN.fullmatch(v):
        raise _fail(
            f"must be 1-128 characters of letters, digits and ._:@/+=- (starting with a letter or "
            f"digit); got {v[:64]!r}"
        )
    return v


class RewardBody(BaseModel):
    """What `POST /reward` accepts. Types are checked strictly: "1.0" is not a number, 1 is not a boolean."""

    model_config = ConfigDict(extra="forbid")

    # The field types are loose so that the validators below can say exactly what is wrong with a value; the
    # schemas say what to send (the OpenAPI document shows them).
    session_id: Annotated[
        str | None,
        WithJsonSchema(
            {
                "type": "string",
                "pattern": _ID_DOC,
                "maxLength": 128,
                "description": "The episode: the X-Session-Id of its calls",
            }
        ),
    ] = None
    reward: Annotated[
        float | None,
        WithJsonSchema(
            {"type": "number", "minimum": -MAX_ABS_REWARD, "maximum": MAX_ABS_REWARD, "description": "A finite number"}
        ),
    ] = None
    call_id: Annotated[
        str | None,
        WithJsonSchema(
            {
                "type": ["string", "null"],
                "pattern": _ID_DOC,
                "maxLength": 128,
                "description": "The X-Call-Id of one call of the session: the reward is then intermediate unless `final` "
                "says otherwise",
            }
        ),
    ] = None
    final: Annotated[
        bool | None,
        WithJsonSchema(
            {"type": ["boolean", "null"], "description": "Default (or null): true without call_id, false with it"}
        ),
    ] = None
    idempotency_key: Annotated[
        str | None,
        WithJsonSchema(
            {
                "type": ["string", "null"],
                "minLength": 1,
                "maxLength": 256,
                "pattern": NO_NUL,
                "description": "Posting the same key again answers the stored reward (or the Idempotency-Key header)",
            }
        ),
    ] = None
    metadata: Annotated[
        dict[str, Any] | None,
        WithJsonSchema(
            {
                "type": ["object", "null"],
                "propertyNames": {"pattern": NO_NUL},
                "description": f"Any JSON object, at most {MAX_METADATA_BYTES} bytes, nested at most "
                f"{MAX_JSON_DEPTH} levels, with what the database stores: finite numbers of magnitude below "
                "2**63 (send larger ones as strings), no NUL character",
            }
        ),
    ] = None

    @field_validator("session_id", mode="before")
    @classmethod
    def _session(cls, v):
        return None if v is None else _id(v, "session_id")

    @field_validator("call_id", mode="before")
    @classmethod
    def _call(cls, v):
        return None if v is None else _id(v, "call_id")

    @field_validator("reward", mode="before")
    @classmethod
    def _reward(cls, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _fail(f"must be a finite number; got {_describe(v)}")
        try:
            f = float(v)
        except OverflowError:
            raise _fail("must be a finite number; got an integer too large for a float") from None
        if not math.isfinite(f):
            raise _fail(f"must be a finite number; got {_describe(f)}")
        if abs(f) > MAX_ABS_REWARD:
            raise _fail(f"must be a finite number of magnitude at most {MAX_ABS_REWARD:g}; got {f:g}")
        return f

    @field_validator("final", mode="before")
    @classmethod
    def _final(cls, v):
        if v is not None and not isinstance(v, bool):
            raise _fail(f"must be true or false; got {_describe(v)}")
        return v

    @field_validator("idempotency_key", mode="before")
    @classmethod
    def _key(cls, v):
        if v is None:
            return None
        if not isinstance(v, str):
            raise _fail(f"must be a string; got {_describe(v)}")
        if not 1 <= len(v) <= 256:
            raise _fail(f"must be 1-256 characters; got {len(v)}")
        problem = text_problem(v)
        if problem:
            raise _fail(problem)
        return v

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, v):
        if v is None:
            return None
        if not isinstance(v, dict):
            raise _fail(f"must be a JSON object; got {_describe(v)}")
        try:
            check_storable_json(v, "metadata")
        except ValueError as exc:
            raise _fail(str(exc)) from None
        if len(orjson.dumps(v)) > MAX_METADATA_BYTES:
            raise _fail(f"must be at most {MAX_METADATA_BYTES} bytes of JSON")
        return v


def _message(exc: ValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or None
        first = first or loc
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field {loc!r}; the fields are {', '.join(FIELDS)}")
        elif err["type"] == "missing":
            parts.append(f"missing required field {loc!r}")
        else:
            parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts), first


async def _body(request: Request, *, required: bool) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        if required:
            raise ApiError(
                400,
                'request body is empty; expected a JSON object like {"session_id": "abc", "reward": 1.0}',
                code="invalid_json",
            )
        return {}
    try:
        # orjson, as on the generation routes: it refuses NaN/Infinity literals, numbers that overflow a double
        # and lone surrogates, none of which the database can store.
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _unparsable(raw, exc) from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object; got {_describe(body)}", code="invalid_json")
    return body


def _unparsable(raw: bytes, exc: orjson.JSONDecodeError) -> ApiError:
    """Why orjson refused a body. The stdlib parser reads what orjson refuses by design (NaN and Infinity
    literals, numbers beyond a double, lone surrogates): when it can read the body, the error names the field and
    the value, as "reward: must be a finite number; got NaN" does. Nothing read this way is ever stored."""
    try:
        lenient = json.loads(raw)
    except (ValueError, RecursionError):
        lenient = None
    if isinstance(lenient, dict):
        where = _surrogate_in(lenient, "")
        if where is not None:
            return ApiError(
                400,
                f"{where or 'a field name'} contains a lone surrogate, which is not valid Unicode",
                param=where.split(".")[0].split("[")[0] or None,
                code="invalid_json",
            )
        try:
            _validate(lenient)
        except ApiError as found:
            return found
    return ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json")


def _surrogate_in(value: Any, where: str) -> str | None:
    """The place of the first string (or key) holding a lone surrogate, or None."""
    if isinstance(value, str):
        return where if text_problem(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            if text_problem(k):
                return where
            found = _surrogate_in(v, f"{where}.{k}" if where else k)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _surrogate_in(v, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def _validate(body: dict[str, Any]) -> RewardBody:
    try:
        return RewardBody.model_validate(body)
    except ValidationError as exc:
        message, param = _message(exc)
        raise ApiError(400, message, param=param, code="invalid_value") from None


def _idempotency_key(request: Request, body: RewardBody) -> str | None:
    key = _raw_idempotency_key(request, body)
    if key is not None and key.startswith(AIR_KEY_PREFIX):
        raise ApiError(
            400,
            f"idempotency keys starting with {AIR_KEY_PREFIX!r} are reserved for automatic rewards; got {key[:64]!r}",
            param="idempotency_key",
            code="invalid_value",
        )
    return key


def _raw_idempotency_key(request: Request, body: RewardBody) -> str | None:
    header = request.headers.get("idempotency-key")
    if header is not None:
        if not 1 <= len(header) <= 256:
            raise ApiError(
                400, "Idempotency-Key header must be 1-256 characters", param="Idempotency-Key", code="invalid_header"
            )
        problem = text_problem(header)
        if problem:
            raise ApiError(400, f"Idempotency-Key header {problem}", param="Idempotency-Key", code="invalid_header")
        if body.idempotency_key is not None and body.idempotency_key != header:
            raise ApiError(
                400,
                f"idempotency_key in the body ({body.idempotency_key!r}) differs from the "
                f"Idempotency-Key header ({header!r}); send one",
                param="idempotency_key",
                code="invalid_value",
            )
        return header
    return body.idempotency_key


def _session_id(path_session: str | None, body: RewardBody) -> str:
    if path_session is not None:
        if body.session_id is not None and body.session_id != path_session:
            raise ApiError(
                400,
                f"session_id in the body ({body.session_id!r}) differs from the one in the path ({path_session!r})",
                param="session_id",
                code="invalid_value",
            )
        return path_session
    if body.session_id is None:
        raise ApiError(
            400,
            "missing required field 'session_id' (the X-Session-Id of the episode)",
            param="session_id",
            code="invalid_value",
        )
    return body.session_id


async def _visible(tw, check, grace_s: float) -> Any:
    """Poll `check` for up to `grace_s`: with several workers, another worker's queue may still hold it."""
    deadline = time.monotonic() + grace_s
    while True:
        found = await check()
        if found or time.monotonic() >= deadline:
            return found
        await asyncio.sleep(0.05)


def _not_written(session_id: str) -> ApiError:
    return ApiError(
        503,
        f"calls of session {session_id!r} are still being served or written; retry shortly",
        code="session_not_written",
        headers={"Retry-After": "1"},
    )


async def _store(request: Request, new: NewReward) -> Response:
    tw = state_of(request)
    flushed = await tw.writer.flush_session(new.session_id)
    # Other workers' write queues are invisible to this one: give them a few write intervals.
    grace = (4 * tw.settings.write_interval_ms / 1000 + 1.0) if tw.settings.workers > 1 else 0.0
    if new.call_id is not None:
        owner = tw.writer.pending_session_of(new.call_id)
        if owner is None:
            owner = await _visible(tw, lambda: call_session(tw.engine, new.call_id), grace)
        if owner is None:
            if not flushed:
                raise _not_written(new.session_id)
            raise ApiError(
                404,
                f"call_id {new.call_id!r} is not a recorded call (use the X-Call-Id response "
                f"header of a call of session {new.session_id!r})",
                param="call_id",
                code="call_not_found",
            )
        if owner != new.session_id:
            raise ApiError(
                400,
                f"call_id {new.call_id!r} belongs to session {owner!r}, not {new.session_id!r}",
                param="call_id",
                code="call_session_mismatch",
            )
    elif not await session_exists(tw.engine, new.session_id):
        if not flushed:
            raise _not_written(new.session_id)
        if grace:
            await _visible(tw, lambda: session_exists(tw.engine, new.session_id), grace)
    try:
        stored = await store_reward(tw.engine, new)
    except RewardError as exc:
        raise ApiError(exc.status, exc.message, param=exc.param, code=exc.code) from None
    if stored.orphaned and not stored.duplicate:
        log.warning(
            "reward #%s for session %r, which has no recorded calls: kept as orphaned",
            stored.reward["id"],
            new.session_id,
        )
    if not stored.duplicate:
        tw.observe_reward(new)
    body = {**stored.reward, "orphaned": stored.orphaned, "duplicate": stored.duplicate}
    return json_response(body)


async def _reward(request: Request, path_session: str | None) -> Response:
    body = _validate(await _body(request, required=True))
    session_id = _session_id(path_session, body)
    if body.reward is None:
        raise ApiError(
            400,
            "missing required field 'reward' (a finite number; to close a session without a "
            "reward use POST /sessions/{session_id}/finish)",
            param="reward",
            code="invalid_value",
        )
    final = body.final if body.final is not None else body.call_id is None
    new = NewReward(
        session_id=session_id,
        value=body.reward,
        final=final,
        call_id=body.call_id,
        idempotency_key=_idempotency_key(request, body),
        metadata=body.metadata,
    )
    return await _store(request, new)


class StoredReward(RewardOut):
    """The stored reward: `orphaned` when its session has no recorded calls (yet), `duplicate` when an earlier
    post with the same idempotency key stored it."""

    orphaned: bool
    duplicate: bool


def _request_body(*, required: list[str], without: tuple[str, ...] = (), body_required: bool = True) -> dict:
    """The route's request body in the OpenAPI document: RewardBody's schema, with what the route requires. The
    routes read the body themselves (strict JSON, exact messages), so FastAPI does not parse it."""
    schema = RewardBody.model_json_schema()
    schema["properties"] = {k: v for k, v in schema["properties"].items() if k not in without}
    # Its values are StorableJson, a component of the document (pydantic resolves every $ref it is given).
    schema["properties"]["metadata"]["additionalProperties"] = {"$ref": "#/components/schemas/StorableJson"}
    schema["required"] = required
    return {"requestBody": {"required": body_required, "content": {"application/json": {"schema": schema}}}}


REWARD_ERRORS = responses(
    400,
    401,
    404,
    409,
    413,
    422,
    503,
    s404="call_id is not a recorded call, or no route has this path",
    s503="The database is unavailable, or calls of the session are still being served or "
    "written: retry after Retry-After seconds",
)


FINISH_ERRORS = {**REWARD_ERRORS, **responses(404, s404="No route has this path (a session id it cannot be)")}


@router.post(
    "/reward",
    dependencies=ADMIN,
    response_model=StoredReward,
    responses=REWARD_ERRORS,
    openapi_extra=_request_body(required=["session_id", "reward"]),
)
async def post_reward(request: Request) -> Response:
    """Store a reward of an episode (final by default) or, with `call_id`, of one of its calls."""
    return await _reward(request, None)


@router.post(
    "/sessions/{session_id:twsession}/reward",
    dependencies=ADMIN,
    response_model=StoredReward,
    responses=REWARD_ERRORS,
    openapi_extra=_request_body(required=["reward"], without=("session_id",)),
)
async def post_session_reward(request: Request, session_id: str) -> Response:
    """`POST /reward` with the session in the path."""
    return await _reward(request, session_id)


@router.post(
    "/sessions/{session_id:twsession}/finish",
    dependencies=ADMIN,
    response_model=StoredReward,
    responses=FINISH_ERRORS,
    openapi_extra=_request_body(required=[], without=("session_id", "reward", "call_id", "final"), body_required=False),
)
async def finish_session(request: Request, session_id: str) -> Response:
    """Close the episode without a reward: a final row with a null value (the trainer uses its default)."""
    body = _validate(await _body(request, required=False))
    session_id = _session_id(session_id, body)
    for name in ("reward", "call_id", "final"):
        if getattr(body, name) is not None:
            raise ApiError(
                400,
                f"/finish closes a session without a reward and takes no {name!r}; to post a "
                f"reward use POST /sessions/{{session_id}}/reward",
                param=name,
                code="invalid_value",
            )
    new = NewReward(
        session_id=session_id,
        value=None,
        final=True,
        idempotency_key=_idempotency_key(request, body),
        metadata=body.metadata,
    )
    return await _store(request, new)


# GET /sessions/{session_id} reads a session, and session ids may hold '/': without these, GET
# /sessions/abc/finish would read a session "abc/finish". Registered before the read API's routes.
@router.get("/sessions/{session_id:twsession}/reward", include_in_schema=False)
@router.get("/sessions/{session_id:twsession}/finish", include_in_schema=False)
async def post_only(request: Request, session_id: str) -> Response:
    action = request.url.path.rsplit("/", 1)[-1]
    raise ApiError(
        405,
        f"/sessions/{{session_id}}/{action} takes POST only (to read a session use GET /sessions/{{session_id}})",
        code="method_not_allowed",
        headers={"Allow": "POST"},
    )

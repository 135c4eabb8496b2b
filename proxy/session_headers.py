"""Session headers: who made a call and how it is to be used for training."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from starlette.convertors import Convertor, register_url_convertor

from trainwire.proxy.errors import ApiError
from trainwire.proxy.ids import random_hex

# Ids go into URLs, logs and SQL: keep them to a safe, printable set.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}")  # whole value: used with fullmatch
# A session id in a URL path: ids may contain '/', but never `/v1/`, so `/sessions/{id}/v1/...` stays unambiguous.
SESSION_IN_PATH = r"[A-Za-z0-9](?:(?!/v1(?:/|$))[A-Za-z0-9._:@/+=-]){0,127}"
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
# W3C Trace Context, version 00 (and later versions' first four fields, as the spec asks of a reader).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


@dataclass(slots=True)
class CallContext:
    session_id: str
    session_generated: bool
    task_id: str | None
    agent_name: str | None
    trainable: bool
    trace_id: str | None = None  # from a valid W3C `traceparent`
    parent_span_id: str | None = None


def check_id(value: str, what: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise ApiError(
            400,
            f"{what} must be 1-128 characters of letters, digits and ._:@/+=- "
            f"(starting with a letter or digit); got {value[:64]!r}",
            param=what,
            code="invalid_header",
        )
    return value


def parse_traceparent(value: str | None) -> tuple[str | None, str | None]:
    """(trace id, parent span id) of a W3C `traceparent`, or (None, None). An invalid one is ignored, never a
    400: Trace Context tells a receiver to start afresh rather than fail the request."""
    if not value:
        return None, None
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None or m.group(1) == "ff" or (m.group(1) == "00" and m.group(5)):
        return None, None
    trace_id, span_id = m.group(2), m.group(3)
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None, None
    return trace_id, span_id


def new_session_id() -> str:
    return "sess_" + random_hex()


def context_from(headers, path_session: str | None = None, path_values: Mapping[str, str] | None = None) -> CallContext:
    """The call's context from its headers; what the URL says (`/sessions/{id}/v1`, or `path_values` from a
    `/tw/.../v1` base URL) wins over a header, as the more specific of the two."""
    if path_values:
        headers = {**headers, **path_values}
    session = path_session or headers.get("x-session-id")
    generated = session is None
    session = check_id(session, "X-Session-Id") if session is not None else new_session_id()
    task = headers.get("x-task-id")
    agent = headers.get("x-agent-name")
    train_raw = headers.get("x-trainwire-train")
    trainable = True
    if train_raw is not None:
        low = train_raw.strip().lower()
        if low not in _TRUE | _FALSE:
            raise ApiError(
                400,
                f"X-Trainwire-Train must be true or false; got {train_raw[:32]!r}",
                param="X-Trainwire-Train",
                code="invalid_header",
            )
        trainable = low in _TRUE
    trace_id, parent_span_id = parse_traceparent(headers.get("traceparent"))
    return CallContext(
        trace_id=trace_id,
        parent_span_id=parent_span_id,
        session_id=session,
        session_generated=generated,
        task_id=check_id(task, "X-Task-Id") if task is not None else None,
        agent_name=check_id(agent, "X-Agent-Name") if agent is not None else None,
        trainable=trainable,
    )


# A base URL that says everything the headers say, for agents that can set only OPENAI_BASE_URL:
#   http://proxy:8100/tw/session=ep-7/task=calc-17/agent=solver/train=false/v1
# Each segment between /tw/ and /v1 is KEY=VALUE, in any order, each key at most once; a '/' inside a value is
# written %2F. Segments are split before they are decoded, so no id can make the path ambiguous.
CONTEXT_PREFIX = "/tw/"
PATH_KEYS = {"session": "x-session-id", "task": "x-task-id", "agent": "x-agent-name", "train": "x-trainwire-train"}


def split_context_path(raw_path: str) -> tuple[dict[str, str], str]:
    """`/tw/session=a/task=b/v1/chat/completions` -> ({"x-session-id": "a", "x-task-id": "b"},
    "/v1/chat/completions"). `raw_path` is the path as sent (percent-encoded)."""
    segments = raw_path[len(CONTEXT_PREFIX) :].split("/")
    values: dict[str, str] = {}
    for i, segment in enumerate(segments):
        if segment == "v1":
            rest = "/" + "/".join(segments[i:])
            return values, unquote(rest)
        key, sep, value = segment.partition("=")
        key = unquote(key)
        if not sep or key not in PATH_KEYS:
            raise ApiError(
                404,
                f"{CONTEXT_PREFIX}...: each part before /v1 must be KEY=VALUE with KEY one of "
                f"{', '.join(PATH_KEYS)}; got {unquote(segment)[:64]!r}",
                code="invalid_path",
            )
        if PATH_KEYS[key] in values:
            raise ApiError(400, f"{CONTEXT_PREFIX}...: {key} is given twice", param=key, code="invalid_path")
        values[PATH_KEYS[key]] = unquote(value)
    raise ApiError(
        404,
        f"a {CONTEXT_PREFIX} base URL must end in /v1, e.g. {CONTEXT_PREFIX}session=ep-7/task=t1/v1",
        code="invalid_path",
    )


class SessionIdConvertor(Convertor):
    """`{session_id:twsession}` in a route: the id with its slashes (see SESSION_IN_PATH)."""

    regex = SESSION_IN_PATH

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("twsession", SessionIdConvertor())

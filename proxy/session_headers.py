"""Session headers: who made a call and how it is to be used for training."""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.convertors import Convertor, register_url_convertor
from trainwire.proxy.errors import ApiError
from trainwire.proxy.ids import random_hex

# Ids go into URLs, logs and SQL: keep them to a safe, printable set.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}$")
# A session id in a URL path: ids may contain '/', but never `/v1/`, so `/sessions/{id}/v1/...` stays unambiguous.
SESSION_IN_PATH = r"[A-Za-z0-9](?:(?!/v1(?:/|$))[A-Za-z0-9._:@/+=-]){0,127}"
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(slots=True)
class CallContext:
    session_id: str
    session_generated: bool
    task_id: str | None
    agent_name: str | None
    trainable: bool


def check_id(value: str, what: str) -> str:
    if not _ID.match(value):
        raise ApiError(400, f"{what} must be 1-128 characters of letters, digits and ._:@/+=- "
                            f"(starting with a letter or digit); got {value[:64]!r}", param=what,
                       code="invalid_header")
    return value


def new_session_id() -> str:
    return "sess_" + random_hex()


def context_from(headers, path_session: str | None = None) -> CallContext:
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
            raise ApiError(400, f"X-Trainwire-Train must be true or false; got {train_raw[:32]!r}",
                           param="X-Trainwire-Train", code="invalid_header")
        trainable = low in _TRUE
    return CallContext(session_id=session, session_generated=generated,
                       task_id=check_id(task, "X-Task-Id") if task is not None else None,
                       agent_name=check_id(agent, "X-Agent-Name") if agent is not None else None,
                       trainable=trainable)


class SessionIdConvertor(Convertor):
    """`{session_id:twsession}` in a route: the id with its slashes (see SESSION_IN_PATH)."""

    regex = SESSION_IN_PATH

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("twsession", SessionIdConvertor())

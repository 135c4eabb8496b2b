"""A base URL that says what the headers say: /tw/KEY=VALUE/.../v1 (proxy/session_headers.py)."""

from __future__ import annotations

import pytest

from trainwire.proxy.errors import ApiError as _ApiError
from trainwire.proxy.session_headers import context_from, split_context_path


def test_context_path_carries_every_header():
    values, rest = split_context_path("/tw/session=ep%2F7/task=calc-17/agent=solver/train=false/v1/chat/completions")
    assert rest == "/v1/chat/completions"
    assert values == {
        "x-session-id": "ep/7",
        "x-task-id": "calc-17",
        "x-agent-name": "solver",
        "x-trainwire-train": "false",
    }
    ctx = context_from({"x-task-id": "from-header", "x-agent-name": "h"}, None, values)
    assert (ctx.session_id, ctx.task_id, ctx.agent_name, ctx.trainable) == ("ep/7", "calc-17", "solver", False)


def test_context_path_any_order_and_values_with_equals():
    values, rest = split_context_path("/tw/task=a=b/v1/models")
    assert values == {"x-task-id": "a=b"} and rest == "/v1/models"


@pytest.mark.parametrize(
    "path, status",
    [
        ("/tw/colour=red/v1/models", 404),
        ("/tw/session=a/session=b/v1/x", 400),
        ("/tw/session=a/chat/completions", 404),
        ("/tw/v1x/v1/models", 404),
    ],
)
def test_bad_context_paths(path, status):
    with pytest.raises(_ApiError) as exc:
        split_context_path(path)
    assert exc.value.status == status

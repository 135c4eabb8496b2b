"""proxy/hot_path.py: which paths the plain-ASGI hot path takes (`route_of`), with the session id out of
`/sessions/{id}/v1/...` (slashes included), and that everything else goes on to FastAPI untouched."""

from __future__ import annotations

import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainwire.proxy.hot_path import ROUTE_KEY, HotPath, route_of


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_plain_api_paths(path):
    assert route_of(path) == (path, None, path)


@pytest.mark.parametrize(
    "path, expected",
    [
        (
            "/sessions/s1/v1/chat/completions",
            ("/v1/chat/completions", "s1", "/sessions/{session_id}/v1/chat/completions"),
        ),
        ("/sessions/s1/v1/completions", ("/v1/completions", "s1", "/sessions/{session_id}/v1/completions")),
        (
            "/sessions/org/team/run-7/v1/chat/completions",
            ("/v1/chat/completions", "org/team/run-7", "/sessions/{session_id}/v1/chat/completions"),
        ),
        ("/sessions/a/v2/b/v1/completions", ("/v1/completions", "a/v2/b", "/sessions/{session_id}/v1/completions")),
        (
            "/sessions/a:b@c+d=e.f_g/v1/completions",
            ("/v1/completions", "a:b@c+d=e.f_g", "/sessions/{session_id}/v1/completions"),
        ),
        ("/sessions/v1/v1/completions", ("/v1/completions", "v1", "/sessions/{session_id}/v1/completions")),
        (
            "/sessions/" + "a" * 128 + "/v1/completions",
            ("/v1/completions", "a" * 128, "/sessions/{session_id}/v1/completions"),
        ),
    ],
)
def test_session_paths(path, expected):
    assert route_of(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions/",
        "/v1/completions/",
        "/v1/models",
        "/v1/embeddings",
        "/v1/tokenize",
        "/chat/completions",
        "/v1/chat/completion",
        "/V1/chat/completions",
        "/v1//chat/completions",
        "",
        "/",
        "/sessions/",
        "/sessions//v1/chat/completions",
        "/sessions/s1/v1/models",
        "/sessions/s1/chat/completions",
        "/sessions/s1/v1/chat/completions/extra",
        "/sessions/s1/v1/chat/completionsx",
        "/sessions/s1/v1/chat/completions/",
        "/sessions/s1/v1/completions/",
        "/sessions/s1/v1/chat",
        "/sessions/a/v1/b/v1/chat/completions",  # an id holding `/v1/` would make the path ambiguous
        "/sessions/a/v1/v1/completions",
        "/sessions/a b/v1/completions",
        "/sessions/-a/v1/completions",
        "/sessions/" + "a" * 129 + "/v1/completions",
        "/api/sessions/a/v1/completions",
        "/v1/sessions/a/v1/completions",
        "/sessions/a/v1/chat/completions?x=1",
    ],
)
def test_paths_that_are_not_generation(path):
    assert route_of(path) is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(alphabet="abcXYZ019._:@+=-v", min_size=1, max_size=6), min_size=1, max_size=5),
    st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
)
def test_session_ids_with_slashes_come_back_whole(segments, api):
    sid = "/".join(segments)
    route = route_of(f"/sessions/{sid}{api}")
    valid = sid[0].isalnum() and len(sid) <= 128 and "/v1/" not in sid + "/"
    if valid:
        assert route == (api, sid, "/sessions/{session_id}" + api)
    else:
        assert route is None


class _Inner:
    def __init__(self):
        self.scopes = []

    async def __call__(self, scope, receive, send):
        self.scopes.append(scope)


@pytest.mark.parametrize(
    "scope",
    [
        {"type": "http", "method": "GET", "path": "/v1/chat/completions", "headers": []},
        {"type": "http", "method": "POST", "path": "/v1/models", "headers": []},
        {"type": "http", "method": "POST", "path": "/reward", "headers": []},
        {"type": "websocket", "path": "/v1/chat/completions", "headers": []},
        {"type": "lifespan"},
    ],
)
async def test_other_requests_go_to_the_inner_app_untouched(scope):
    inner = _Inner()

    async def receive():  # pragma: no cover - must not be read
        raise AssertionError("the hot path read a request it does not serve")

    async def send(message):  # pragma: no cover
        raise AssertionError("the hot path answered a request it does not serve")

    state = types.SimpleNamespace(settings=types.SimpleNamespace(max_request_bytes=1024))
    await HotPath(inner, state=state)(scope, receive, send)
    assert inner.scopes == [scope]
    assert ROUTE_KEY not in scope

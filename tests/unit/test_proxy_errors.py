"""proxy/errors.py: OpenAI-format error bodies `{"error": {"message", "type", "param", "code"}}`, the status → type
mapping, and the responses made from an ApiError."""

from __future__ import annotations

import orjson
import pytest

from trainwire.proxy.errors import TYPES, ApiError, api_error_response, error_body, error_response


@pytest.mark.parametrize(
    "status, type_",
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (409, "conflict_error"),
        (413, "invalid_request_error"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (502, "upstream_error"),
        (503, "service_unavailable"),
        (504, "upstream_timeout"),
    ],
)
def test_status_to_type(status, type_):
    assert TYPES[status] == type_
    assert orjson.loads(error_body(status, "m")) == {
        "error": {"message": "m", "type": type_, "param": None, "code": None}
    }


def test_the_mapping_has_exactly_these_statuses():
    assert sorted(TYPES) == [400, 401, 403, 404, 405, 409, 413, 422, 429, 502, 503, 504]


@pytest.mark.parametrize("status", [500, 418, 200, 501, 599])
def test_unmapped_status_is_api_error(status):
    assert orjson.loads(error_body(status, "x"))["error"]["type"] == "api_error"


def test_body_shape_with_param_and_code():
    body = error_body(400, "X-Session-Id must be ...", "X-Session-Id", "invalid_header")
    assert isinstance(body, bytes)
    parsed = orjson.loads(body)
    assert list(parsed) == ["error"]
    assert list(parsed["error"]) == ["message", "type", "param", "code"]
    assert parsed == {
        "error": {
            "message": "X-Session-Id must be ...",
            "type": "invalid_request_error",
            "param": "X-Session-Id",
            "code": "invalid_header",
        }
    }


def test_non_ascii_message_round_trips():
    assert orjson.loads(error_body(404, "no session 'é/ü'"))["error"]["message"] == "no session 'é/ü'"


def test_error_response():
    r = error_response(429, "slow down", code="queue_full", headers={"Retry-After": "2"})
    assert r.status_code == 429
    assert r.media_type == "application/json"
    assert r.headers["retry-after"] == "2"
    assert r.headers["content-type"] == "application/json"
    assert orjson.loads(r.body) == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "queue_full"}
    }


def test_api_error_carries_everything_to_the_response():
    exc = ApiError(413, "body too large", param="body", code="too_large", headers={"X-A": "1"})
    assert (exc.status, exc.message, exc.param, exc.code, exc.headers) == (
        413,
        "body too large",
        "body",
        "too_large",
        {"X-A": "1"},
    )
    assert str(exc) == "body too large"
    r = api_error_response(exc)
    assert r.status_code == 413 and r.headers["x-a"] == "1"
    assert orjson.loads(r.body) == {
        "error": {"message": "body too large", "type": "invalid_request_error", "param": "body", "code": "too_large"}
    }


def test_api_error_defaults():
    exc = ApiError(404, "gone")
    assert (exc.param, exc.code, exc.headers) == (None, None, None)
    assert orjson.loads(api_error_response(exc).body)["error"] == {
        "message": "gone",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }

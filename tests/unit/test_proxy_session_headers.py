"""proxy/session_headers.py: the call context out of the session headers (or the session id in the URL), the id
check with its exact 400 answer, and SESSION_IN_PATH, the id pattern in `/sessions/{id}/v1/...` paths."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.routing import compile_path

from trainwire.proxy.errors import ApiError
from trainwire.proxy.session_headers import SESSION_IN_PATH, CallContext, check_id, context_from, new_session_id

ID_CHARS = "ABCZabcz0189._:@/+=-"
MSG = "{what} must be 1-128 characters of letters, digits and ._:@/+=- (starting with a letter or digit); got {v!r}"


def raises_api_error(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    return info.value


# --- context_from ----------------------------------------------------------------------------------------


def test_no_headers_generates_a_session():
    ctx = context_from({})
    assert re.fullmatch(r"sess_[0-9a-f]{32}", ctx.session_id)
    assert ctx == CallContext(
        session_id=ctx.session_id, session_generated=True, task_id=None, agent_name=None, trainable=True
    )
    assert context_from({}).session_id != ctx.session_id
    assert new_session_id() != new_session_id()


def test_all_headers_accepted():
    ctx = context_from(
        {
            "x-session-id": "team-a/run:7@host+x=y.z_1",
            "x-task-id": "task.42",
            "x-agent-name": "solver",
            "x-trainwire-train": "false",
        }
    )
    assert ctx == CallContext(
        session_id="team-a/run:7@host+x=y.z_1",
        session_generated=False,
        task_id="task.42",
        agent_name="solver",
        trainable=False,
    )


def test_path_session_wins_over_the_header():
    ctx = context_from({"x-session-id": "from-header"}, "from/path")
    assert (ctx.session_id, ctx.session_generated) == ("from/path", False)
    # an empty path id is no id: the header is used
    assert context_from({"x-session-id": "h"}, "").session_id == "h"


def test_path_session_is_checked_too():
    err = raises_api_error(context_from, {}, "bad id")
    assert (err.status, err.param, err.code) == (400, "X-Session-Id", "invalid_header")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        " ",
        "-lead",
        ".lead",
        "/lead",
        "has space",
        "tab\there",
        "semi;colon",
        "quote'",
        'dq"',
        "é",
        "a" * 129,
        "back\\slash",
        "a?b",
        "a#b",
        "a%20b",
        "a,b",
    ],
)
@pytest.mark.parametrize(
    "header, what", [("x-session-id", "X-Session-Id"), ("x-task-id", "X-Task-Id"), ("x-agent-name", "X-Agent-Name")]
)
def test_bad_ids_are_400_with_the_header_as_param(bad, header, what):
    err = raises_api_error(context_from, {header: bad})
    assert err.status == 400
    assert err.param == what
    assert err.code == "invalid_header"
    assert err.message == MSG.format(what=what, v=bad[:64])
    assert err.headers is None


def test_long_bad_id_is_cut_to_64_characters_in_the_message():
    bad = "é" + "a" * 200
    err = raises_api_error(check_id, bad, "X-Task-Id")
    assert err.message.endswith("got " + repr(bad[:64]))


@pytest.mark.parametrize("good", ["a", "Z", "0", "a" * 128, "0.1:2@3/4+5=6-7_8", "a//b", "a/v1/b", "sess_" + "f" * 32])
def test_good_ids(good):
    assert check_id(good, "X-Session-Id") == good


@pytest.mark.parametrize("value", ["abc\n", "a" * 128 + "\n"])
def test_trailing_newline_is_rejected(value):
    raises_api_error(check_id, value, "X-Session-Id")


@pytest.mark.parametrize("raw", ["true", "TRUE", " True ", "1", "yes", "on", "ON"])
def test_train_true(raw):
    assert context_from({"x-trainwire-train": raw}).trainable is True


@pytest.mark.parametrize("raw", ["false", "False", " FALSE", "0", "no", "off", "Off\t"])
def test_train_false(raw):
    assert context_from({"x-trainwire-train": raw}).trainable is False


@pytest.mark.parametrize("raw", ["maybe", "", " ", "2", "y", "n", "truee", "t", "null"])
def test_train_bad_values(raw):
    err = raises_api_error(context_from, {"x-trainwire-train": raw})
    assert (err.status, err.param, err.code) == (400, "X-Trainwire-Train", "invalid_header")
    assert err.message == f"X-Trainwire-Train must be true or false; got {raw!r}"


def test_train_bad_value_is_cut_to_32_characters():
    raw = "x" * 100
    err = raises_api_error(context_from, {"x-trainwire-train": raw})
    assert err.message == f"X-Trainwire-Train must be true or false; got {'x' * 32!r}"


# --- SESSION_IN_PATH -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sid",
    [
        "a",
        "a/b",
        "a/b/c",
        "team/x/run-1",
        "a/v1x",
        "a/v10/b",
        "a/v2/b",
        "v1",
        "v1/a",
        "a/xv1/b",
        "a/V1/b",
        "a" * 128,
        "a//b",
    ],
)
def test_session_in_path_accepts(sid):
    assert re.fullmatch(SESSION_IN_PATH, sid)


@pytest.mark.parametrize("sid", ["", "/a", "-a", "a/v1", "a/v1/", "a/v1/b", "x/y/v1/z", "a" * 129, "a b", "a?b", "a\n"])
def test_session_in_path_rejects(sid):
    assert re.fullmatch(SESSION_IN_PATH, sid) is None


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ID_CHARS + "v1", min_size=1, max_size=140))
def test_session_in_path_never_holds_v1_segment(sid):
    if re.fullmatch(SESSION_IN_PATH, sid):
        assert "/v1/" not in sid and not sid.endswith("/v1")
        assert check_id(sid, "X-Session-Id") == sid  # every id the path takes is a valid id
    elif re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}", sid):
        assert "/v1/" in sid or sid.endswith("/v1")  # the only valid ids a path refuses


def test_twsession_convertor_in_a_route():
    regex, fmt, convertors = compile_path("/sessions/{session_id:twsession}/v1/models")
    m = regex.match("/sessions/org/a/run-3/v1/models")
    assert m and convertors["session_id"].convert(m.group("session_id")) == "org/a/run-3"
    assert regex.match("/sessions/a/v1/b/v1/models") is None
    assert fmt == "/sessions/{session_id}/v1/models"


def test_traceparent_is_parsed_as_w3c_says_and_an_invalid_one_ignored():
    from trainwire.proxy.session_headers import context_from, parse_traceparent

    tid, sid = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    assert parse_traceparent(f"00-{tid}-{sid}-01") == (tid, sid)
    assert parse_traceparent(f" 00-{tid}-{sid}-00 ") == (tid, sid)  # not sampled: still the agent's trace
    assert parse_traceparent(f"01-{tid}-{sid}-01-future") == (tid, sid)  # a later version's extra fields
    for bad in (
        None,
        "",
        f"00-{tid}-{sid}-01-extra",  # version 00 has exactly four fields
        f"ff-{tid}-{sid}-01",  # version ff is invalid
        f"00-{'0' * 32}-{sid}-01",
        f"00-{tid}-{'0' * 16}-01",
        f"00-{tid.upper()}-{sid}-01",  # upper case is not allowed
        f"00-{tid[:-1]}-{sid}-01",
        "garbage",
    ):
        assert parse_traceparent(bad) == (None, None), bad
    ctx = context_from({"traceparent": f"00-{tid}-{sid}-01"})
    assert (ctx.trace_id, ctx.parent_span_id) == (tid, sid)
    assert context_from({"traceparent": "nope"}).trace_id is None  # never a 400

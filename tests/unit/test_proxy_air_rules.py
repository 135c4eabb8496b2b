"""proxy/air_rules.py and the engine of proxy/air.py without a store: the registered rules (names, defaults,
flags), configured values, `invalid_tool_call` and `truncated` judged on hand-built CallRecords, and `tool_error`
through `Air.observe` on a two-call session, down to the RewardRecord it queues."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from trainwire.proxy.air import Air
from trainwire.proxy.air_rules import RULES, Finding, Rule, invalid_tool_call, offered_tools, parse_value, truncated
from trainwire.records import CallRecord, RewardRecord

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PATTERNS = [r"^\s*Error", r'^\s*\{\s*"error"\s*:']
TOOLS = [
    {"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "calc"}},
]


def rec(
    *,
    id="call_1",
    session="sess-1",
    kind="chat",
    request=None,
    response=None,
    status=200,
    aborted=False,
    finish_reason=None,
    usage=None,
    seq=0,
) -> CallRecord:
    return CallRecord(
        id=id,
        session_id=session,
        seq=seq,
        kind=kind,
        path="/v1/chat/completions",
        status_code=status,
        started_at=T0,
        finished_at=T0,
        request=request,
        response=response,
        aborted=aborted,
        finish_reason=finish_reason,
        usage=usage,
    )


def answer(content=None, tool_calls=None, finish_reason="stop") -> dict:
    msg: dict = {"role": "assistant", "content": content}
    if tool_calls is not None:
        msg["tool_calls"] = tool_calls
    return {"choices": [{"index": 0, "message": msg, "finish_reason": finish_reason}]}


def tool_call(name="read_file", args='{"path": "a.txt"}', id="tc_1") -> dict:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": args}}


class FakeWriter:
    def __init__(self):
        self.rewards: list[RewardRecord] = []

    def submit_reward(self, r: RewardRecord) -> None:
        self.rewards.append(r)


# --- the registry ----------------------------------------------------------------------------------------------


def test_registered_rules():
    assert list(RULES) == ["invalid_tool_call", "tool_error", "truncated", "tool_span_error"]
    assert {n: r.default for n, r in RULES.items()} == {
        "invalid_tool_call": -0.5,
        "tool_error": -0.2,
        "truncated": -0.2,
        "tool_span_error": -0.2,
    }
    assert {n: r.flag for n, r in RULES.items()} == {
        "invalid_tool_call": "--air-invalid-tool-call",
        "tool_error": "--air-tool-error",
        "truncated": "--air-truncated",
        "tool_span_error": "--air-tool-span-error",
    }
    assert {n: r.on for n, r in RULES.items()} == {
        "invalid_tool_call": "call",
        "tool_error": "call",
        "truncated": "call",
        "tool_span_error": "tool_span",
    }
    assert all(r.name == n and r.help.endswith("or 'off'") for n, r in RULES.items())
    assert RULES["invalid_tool_call"].judge is invalid_tool_call and RULES["truncated"].judge is truncated


def test_a_rule_registered_twice_is_refused():
    from trainwire.proxy.air_rules import rule

    with pytest.raises(ValueError, match="automatic reward rule 'truncated' is registered twice"):
        rule("truncated", default=0.0, help="x")(lambda air, r: [])
    assert RULES["truncated"].judge is truncated


@pytest.mark.parametrize(
    "raw, value",
    [
        ("off", None),
        ("OFF", None),
        (" off ", None),
        ("none", None),
        ("false", None),
        ("", None),
        (None, None),
        ("-0.3", -0.3),
        (" 1.5 ", 1.5),
        ("1e-1", 0.1),
        ("0", 0.0),
        (2, 2.0),
        (-0.25, -0.25),
        (0, 0.0),
    ],
)
def test_parse_value(raw, value):
    got = parse_value(RULES["truncated"], raw)
    assert got == value
    assert got is None or type(got) is float


@pytest.mark.parametrize(
    "name, raw, message",
    [
        ("truncated", "minus one", "--air-truncated must be a number or 'off'; got 'minus one'"),
        ("invalid_tool_call", "1,5", "--air-invalid-tool-call must be a number or 'off'; got '1,5'"),
        ("tool_error", True, "--air-tool-error must be a number or 'off'; got True"),
        ("tool_error", [1], "--air-tool-error must be a number or 'off'; got [1]"),
    ],
)
def test_parse_value_bad(name, raw, message):
    with pytest.raises(ValueError) as info:
        parse_value(RULES[name], raw)
    assert str(info.value) == message


def test_rule_flag_of_any_name():
    assert Rule("a_b_c", None, "", lambda air, r: []).flag == "--air-a-b-c"


def test_offered_tools():
    assert offered_tools({"tools": TOOLS}) == {"read_file", "calc"}
    assert offered_tools({"tools": [{"name": "bare"}], "functions": [{"name": "legacy"}, "junk"]}) == {"bare", "legacy"}
    assert offered_tools(None) == set() and offered_tools({"tools": None}) == set()


# --- invalid_tool_call ------------------------------------------------------------------------------------------


def test_valid_tool_calls_are_not_rewarded():
    r = rec(request={"tools": TOOLS}, response=answer(tool_calls=[tool_call(), tool_call("calc", "{}", "tc_2")]))
    assert invalid_tool_call(None, r) == []


def test_unknown_tool():
    r = rec(request={"tools": TOOLS}, response=answer(tool_calls=[tool_call("rm_rf", '{"x": 1}')]))
    assert invalid_tool_call(None, r) == [
        Finding(
            key="0",
            call_id="call_1",
            metadata={
                "tool_call_id": "tc_1",
                "name": "rm_rf",
                "problems": ["tool 'rm_rf' is not among the request's tools (calc, read_file)"],
            },
        )
    ]


def test_no_tools_offered():
    [f] = invalid_tool_call(None, rec(request={"messages": []}, response=answer(tool_calls=[tool_call()])))
    assert f.metadata["problems"] == ["tool 'read_file' is not among the request's tools (none offered)"]


def test_bad_json_arguments_with_the_parser_message():
    bad = '{"path": '
    try:
        json.loads(bad)
    except ValueError as exc:
        why = str(exc)
    [f] = invalid_tool_call(
        None,
        rec(
            request={"tools": TOOLS},
            response=answer(tool_calls=[tool_call("calc", "{}", "ok"), tool_call(args=bad, id="tc_bad")]),
        ),
    )
    assert f.key == "1" and f.call_id == "call_1"
    assert f.metadata == {
        "tool_call_id": "tc_bad",
        "name": "read_file",
        "problems": [f"arguments are not valid JSON ({why}): {bad!r}"],
    }


@pytest.mark.parametrize(
    "args, shown", [("[1, 2]", "'[1, 2]'"), ('"s"', "'\"s\"'"), ("3", "'3'"), (None, "'None'"), ([1], "'[1]'")]
)
def test_arguments_that_are_not_an_object(args, shown):
    [f] = invalid_tool_call(None, rec(request={"tools": TOOLS}, response=answer(tool_calls=[tool_call(args=args)])))
    assert f.metadata["problems"] == [f"arguments are not a JSON object: {shown}"]


def test_arguments_already_an_object_and_legacy_functions():
    r = rec(request={"functions": [{"name": "read_file"}]}, response=answer(tool_calls=[tool_call(args={"path": "x"})]))
    assert invalid_tool_call(None, r) == []


def test_both_problems_on_one_call_and_the_argument_text_is_cut():
    args = "x" * 300
    [f] = invalid_tool_call(None, rec(request={}, response=answer(tool_calls=[tool_call("nope", args)])))
    assert len(f.metadata["problems"]) == 2
    assert f.metadata["problems"][0].startswith("tool 'nope' is not among")
    assert f.metadata["problems"][1].endswith(": " + repr("x" * 200))


@pytest.mark.parametrize("kw", [dict(status=500), dict(status=400), dict(aborted=True), dict(kind="completion")])
def test_invalid_tool_call_skips_failed_aborted_and_non_chat(kw):
    assert invalid_tool_call(None, rec(request={}, response=answer(tool_calls=[tool_call("nope")]), **kw)) == []


def test_invalid_tool_call_without_tool_calls():
    assert invalid_tool_call(None, rec(request={"tools": TOOLS}, response=answer("hi"))) == []
    assert invalid_tool_call(None, rec(request={"tools": TOOLS}, response=answer("hi", tool_calls=[]))) == []
    assert invalid_tool_call(None, rec(request={"tools": TOOLS}, response=None)) == []


# --- truncated ----------------------------------------------------------------------------------------------------


def test_truncated_from_the_record():
    r = rec(
        request={"max_tokens": 64},
        response=answer("cut"),
        finish_reason="length",
        usage={"completion_tokens": 64, "prompt_tokens": 10},
    )
    assert truncated(None, r) == [
        Finding(
            key="", call_id="call_1", metadata={"finish_reason": "length", "completion_tokens": 64, "max_tokens": 64}
        )
    ]


def test_truncated_from_the_response_and_max_completion_tokens_first():
    r = rec(
        kind="completion",
        request={"max_completion_tokens": 32, "max_tokens": 99},
        response={"choices": [{"text": "cut", "finish_reason": "length"}]},
    )
    assert truncated(None, r) == [
        Finding(
            key="", call_id="call_1", metadata={"finish_reason": "length", "completion_tokens": None, "max_tokens": 32}
        )
    ]


@pytest.mark.parametrize(
    "kw",
    [
        dict(finish_reason="stop"),
        dict(finish_reason="tool_calls"),
        dict(finish_reason=None),
        dict(finish_reason="length", status=500),
        dict(finish_reason="length", aborted=True),
        dict(finish_reason="length", kind="responses"),
    ],
)
def test_not_truncated(kw):
    assert truncated(None, rec(request={}, response=answer("x", finish_reason="stop"), **kw)) == []


def test_record_finish_reason_wins_over_the_response():
    r = rec(request={}, response=answer("x", finish_reason="length"), finish_reason="stop")
    assert truncated(None, r) == []


# --- Air: configuration -----------------------------------------------------------------------------------------


def test_air_defaults_and_configured_values():
    assert Air({}, PATTERNS, writer=FakeWriter(), engine=None).values == {
        "invalid_tool_call": -0.5,
        "tool_error": -0.2,
        "truncated": -0.2,
        "tool_span_error": -0.2,
    }
    air = Air({"truncated": "off", "tool_error": "-1", "invalid_tool_call": 0.5}, PATTERNS, writer=None, engine=None)
    assert air.values == {"invalid_tool_call": 0.5, "tool_error": -1.0, "tool_span_error": -0.2}


def test_air_unknown_rule_and_bad_pattern():
    with pytest.raises(ValueError) as info:
        Air({"bogus": "1", "also": "off"}, PATTERNS, writer=None, engine=None)
    assert str(info.value) == (
        "unknown automatic reward rule(s) also, bogus; the rules are invalid_tool_call, tool_error, truncated, "
        "tool_span_error"
    )
    with pytest.raises(ValueError, match=r"^--air-tool-error-pattern: not a valid regex: "):
        Air({}, ["(unclosed"], writer=None, engine=None)
    with pytest.raises(ValueError, match=r"^--air-truncated must be a number or 'off'; got 'minus one'$"):
        Air({"truncated": "minus one"}, PATTERNS, writer=None, engine=None)


@pytest.mark.parametrize(
    "text, is_error",
    [
        ("Error: no such file", True),
        ("  Error", True),
        ("\nError 42", True),
        ("error: lower case", False),
        ("The Error was", False),
        ("ok", False),
        ("", False),
        (None, False),
        ('{"error": "boom"}', True),
        ('  {"error": {"code": 1}}', True),
        ('{"error": true}', True),
        ('{"error": null}', False),
        ('{"error": ""}', False),
        ('{"error": false}', False),
        ('{"error": {}}', False),
        ('{"error": []}', False),
        ('{"result": 1}', False),
        ('{"error": "cut off', True),
        ('{"res', False),
        ('[{"error": 1}]', False),
    ],
)
def test_is_error(text, is_error):
    assert Air({}, PATTERNS, writer=None, engine=None).is_error(text) is is_error


def test_is_error_without_the_json_pattern():
    air = Air({}, [r"^\s*Error"], writer=None, engine=None)
    assert air.json_error is False
    assert air.is_error('{"error": "boom"}') is False
    assert air.is_error("Error") is True


# --- Air: tool_error on a session -----------------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You may read files."}
USER = {"role": "user", "content": "What is in a.txt?"}


def first_call() -> CallRecord:
    return rec(
        id="call_first",
        seq=0,
        request={"model": "policy", "messages": [SYSTEM, USER], "tools": TOOLS},
        response=answer(None, [tool_call(id="tc_read")], finish_reason="tool_calls"),
        finish_reason="tool_calls",
    )


def later_call(id: str, seq: int, tool_content, extra=()) -> CallRecord:
    assistant = {"role": "assistant", "content": None, "tool_calls": [tool_call(id="tc_read")]}
    tool = {"role": "tool", "tool_call_id": "tc_read", "content": tool_content}
    return rec(
        id=id,
        seq=seq,
        request={"model": "policy", "messages": [SYSTEM, USER, assistant, tool, *extra], "tools": TOOLS},
        response=answer("It failed.", finish_reason="stop"),
        finish_reason="stop",
    )


def test_tool_error_rewards_the_call_that_made_the_tool_call():
    writer = FakeWriter()
    air = Air({}, PATTERNS, writer=writer, engine=None)
    air.observe(first_call())
    assert writer.rewards == []  # a valid tool call, not truncated
    air.observe(later_call("call_second", 1, "Error: file not found"))
    [r] = writer.rewards
    assert r.source == "tool_error"
    assert r.call_id == "call_first"
    assert r.value == -0.2
    assert r.final is False
    assert r.session_id == "sess-1"
    assert r.idempotency_key == "air:tool_error:call_first:tc_read"
    assert r.metadata == {
        "tool_call_id": "tc_read",
        "answered_in": "call_second",
        "tool_message": "Error: file not found",
    }
    assert r.created_at.tzinfo is not None
    assert air.submitted == 1


def test_tool_error_is_judged_once_per_tool_message():
    writer = FakeWriter()
    air = Air({}, PATTERNS, writer=writer, engine=None)
    air.observe(first_call())
    air.observe(later_call("call_second", 1, "Error: file not found"))
    # the next request of the session resends the same history: no second reward
    air.observe(
        later_call(
            "call_third",
            2,
            "Error: file not found",
            extra=[{"role": "assistant", "content": "It failed."}, {"role": "user", "content": "ok"}],
        )
    )
    assert [r.idempotency_key for r in writer.rewards] == ["air:tool_error:call_first:tc_read"]


def test_json_error_content_parts_count_and_a_good_answer_does_not():
    writer = FakeWriter()
    air = Air({}, PATTERNS, writer=writer, engine=None)
    air.observe(first_call())
    air.observe(later_call("call_ok", 1, "hello world"))
    assert writer.rewards == []
    writer2 = FakeWriter()
    air2 = Air({}, PATTERNS, writer=writer2, engine=None)
    air2.observe(first_call())
    air2.observe(
        later_call("call_second", 1, [{"type": "text", "text": '{"error": '}, {"type": "text", "text": '"denied"}'}])
    )
    [r] = writer2.rewards
    assert (r.call_id, r.metadata["tool_message"]) == ("call_first", '{"error": "denied"}')


def test_tool_error_value_is_the_configured_one_and_off_means_none():
    writer = FakeWriter()
    air = Air({"tool_error": "-1.5"}, PATTERNS, writer=writer, engine=None)
    air.observe(first_call())
    air.observe(later_call("call_second", 1, "Error"))
    assert [r.value for r in writer.rewards] == [-1.5]
    writer = FakeWriter()
    air = Air({"tool_error": "off"}, PATTERNS, writer=writer, engine=None)
    air.observe(first_call())
    air.observe(later_call("call_second", 1, "Error"))
    assert writer.rewards == []


def test_tool_error_is_kept_per_session():
    writer = FakeWriter()
    air = Air({}, PATTERNS, writer=writer, engine=None)
    air.observe(first_call())
    other_first = first_call()
    other_first.id, other_first.session_id = "call_first_s2", "sess-2"  # the same tool call id, another session
    air.observe(other_first)
    other = later_call("call_second_s2", 1, "Error")
    other.session_id = "sess-2"
    air.observe(other)
    [r] = writer.rewards
    assert (r.session_id, r.call_id, r.idempotency_key) == (
        "sess-2",
        "call_first_s2",
        "air:tool_error:call_first_s2:tc_read",
    )
    assert air.memo("sess-1").produced == {(2, "tc_read"): "call_first"}
    assert air.memo("sess-2").produced == {(2, "tc_read"): "call_first_s2"}


def test_tool_error_without_the_assistant_message_uses_the_latest_producer():
    writer = FakeWriter()
    air = Air({}, PATTERNS, writer=writer, engine=None)
    air.observe(first_call())
    trimmed = rec(
        id="call_trimmed",
        seq=1,
        request={"messages": [{"role": "tool", "tool_call_id": "tc_read", "content": "Error: denied"}]},
        response=answer("ok"),
    )
    air.observe(trimmed)
    [r] = writer.rewards
    assert (r.call_id, r.idempotency_key) == ("call_first", "air:tool_error:call_first:tc_read")


def test_other_rules_through_observe_have_their_keys():
    writer = FakeWriter()
    air = Air({}, PATTERNS, writer=writer, engine=None)
    air.observe(
        rec(
            id="call_bad",
            request={"tools": TOOLS},
            response=answer(
                None, [tool_call("nope", "{}", "tc_x"), tool_call(args="{", id="tc_y")], finish_reason="length"
            ),
            finish_reason="length",
            usage={"completion_tokens": 16},
        )
    )
    assert [(r.source, r.idempotency_key, r.value, r.call_id) for r in writer.rewards] == [
        ("invalid_tool_call", "air:invalid_tool_call:call_bad:0", -0.5, "call_bad"),
        ("invalid_tool_call", "air:invalid_tool_call:call_bad:1", -0.5, "call_bad"),
        ("truncated", "air:truncated:call_bad", -0.2, "call_bad"),
    ]
    assert writer.rewards[-1].metadata == {"finish_reason": "length", "completion_tokens": 16, "max_tokens": None}


def test_tool_span_error_rewards_the_linked_call_once_per_failed_span():
    from trainwire.proxy.otlp_ingest import ToolSpan
    from trainwire.proxy.tool_spans import LinkedToolSpan

    def linked(error: bool, call_id: str | None, span_id: str = "ab" * 8) -> LinkedToolSpan:
        span = ToolSpan("12" * 16, span_id, None, "calc", error, "boom", 10_000_000, 12_500_000, "tc_1", None)
        return LinkedToolSpan(span, "s", call_id, "tool_call_id")

    writer = FakeWriter()
    air = Air({"tool_span_error": "-0.7"}, PATTERNS, writer=writer, engine=None)
    assert air.observe_tool_span(linked(False, "c1")) == 0  # the tool worked
    assert air.observe_tool_span(linked(True, None)) == 0  # no call requested it
    assert air.observe_tool_span(linked(True, "c1")) == 1
    (r,) = writer.rewards
    assert (r.session_id, r.call_id, r.value, r.final, r.source) == ("s", "c1", -0.7, False, "tool_span_error")
    assert r.idempotency_key == "air:tool_span_error:c1:" + "ab" * 8
    assert r.metadata == {
        "tool": "calc",
        "status": "ERROR",
        "message": "boom",
        "duration_ms": 2.5,
        "tool_call_id": "tc_1",
        "trace_id": "12" * 16,
        "span_id": "ab" * 8,
        "matched_by": "tool_call_id",
    }
    air.observe(_plain_call())  # call rules never see tool-span rules, and vice versa
    assert (
        Air({"tool_span_error": "off"}, PATTERNS, writer=writer, engine=None).observe_tool_span(linked(True, "c")) == 0
    )


def _plain_call() -> CallRecord:
    now = datetime.now(UTC)
    return CallRecord(
        id="c9",
        session_id="s",
        seq=0,
        kind="chat",
        path="/v1/chat/completions",
        status_code=200,
        started_at=now,
        finished_at=now,
        request={"messages": []},
        response={"choices": []},
    )

"""The read records serialize to exactly the JSON the API has always answered: key order, keys present only
when given, datetimes as orjson renders them (Z, microseconds only when not zero), naive datetimes taken as UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest
from pydantic import ValidationError

from trainwire.store.read_models import (
    CallDetail,
    CallInput,
    CallOutput,
    CallSummary,
    FinalReward,
    OrphanedSession,
    Page,
    PolicyVersionRow,
    RewardListItem,
    RewardOut,
    SessionDetail,
    SessionSummary,
    Stats,
    TrainStepRow,
)

T = datetime(2026, 3, 1, 12, 0, 1, 123456, tzinfo=UTC)


def render(record) -> bytes:
    """What proxy.plumbing.json_response does with a record's dump."""
    return orjson.dumps(record.model_dump(), option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC)


def reward(**kw) -> RewardOut:
    base = dict(
        id=3,
        session_id="s1",
        call_id=None,
        final=True,
        value=1.0,
        source="user",
        idempotency_key="k",
        metadata={"m": [1, 2.5]},
        created_at=T,
    )
    return RewardOut(**{**base, **kw})


def call_fields(**kw) -> dict:
    base = dict(
        id="c1",
        session_id="s1",
        seq=0,
        task_id=None,
        agent_name="alice",
        trainable=True,
        kind="chat",
        path="/v1/chat/completions",
        stream=False,
        model_requested="policy",
        model_served="v1",
        route="policy",
        policy_version=1,
        status_code=200,
        error=None,
        aborted=False,
        finish_reason="stop",
        usage={"prompt_tokens": 3},
        started_at=T,
        finished_at=T.replace(microsecond=0),
        upstream_ms=12.5,
        ttft_ms=None,
        overhead_ms=0.125,
        input={"role": "user", "content": "hi"},
        output={"content": "hello"},
        rewards=[],
        api="chat",
        prompt_tokens=3,
        completion_tokens=None,
        tools=["calc"],
        input_messages=[{"role": "user", "content": "hi"}],
        sampling=None,
        train={"trainable": False, "reason": "no token ids recorded"},
    )
    return {**base, **kw}


def test_reward_json_and_datetimes():
    assert render(reward()) == (
        b'{"object":"reward","id":3,"session_id":"s1","call_id":null,"final":true,"value":1.0,"source":"user",'
        b'"idempotency_key":"k","metadata":{"m":[1,2.5]},"created_at":"2026-03-01T12:00:01.123456Z"}'
    )
    # SQLite's naive datetimes are UTC; whole seconds have no fraction; other zones are converted by orjson.
    assert reward(created_at=T.replace(tzinfo=None)).created_at == T
    assert b'"2026-03-01T12:00:01Z"' in render(reward(created_at=T.replace(microsecond=0)))
    assert b'"2026-03-01T12:00:01.500000Z"' in render(reward(created_at=T.replace(microsecond=500000)))
    listed = RewardListItem(**dict(reward()), orphaned=False)
    assert render(listed).endswith(b',"created_at":"2026-03-01T12:00:01.123456Z","orphaned":false}')


def test_reward_values_are_floats_and_records_are_immutable():
    assert render(reward(value=3)).count(b'"value":3.0') == 1
    with pytest.raises(ValidationError):
        reward().value = 2.0  # type: ignore[misc]
    with pytest.raises(ValidationError):
        reward(created_at="not a time")


def test_page_body():
    page = Page[RewardOut].of([reward()], "WzNd")
    body = orjson.loads(render(page))
    assert list(body) == ["object", "data", "has_more", "next_cursor"]
    assert body["object"] == "list" and body["has_more"] is True and body["next_cursor"] == "WzNd"
    assert body["data"][0]["id"] == 3
    empty = Page[RewardOut].of([], None)
    assert render(empty) == b'{"object":"list","data":[],"has_more":false,"next_cursor":null}'
    assert empty.body() == {"object": "list", "data": [], "has_more": False, "next_cursor": None}


def test_call_summary_keys_and_tokens_only_when_given():
    plain = orjson.loads(render(CallSummary(**call_fields())))
    assert list(plain) == [
        "object",
        "id",
        "session_id",
        "seq",
        "task_id",
        "agent_name",
        "trainable",
        "kind",
        "path",
        "stream",
        "model_requested",
        "model_served",
        "route",
        "policy_version",
        "status_code",
        "error",
        "aborted",
        "finish_reason",
        "usage",
        "started_at",
        "finished_at",
        "upstream_ms",
        "ttft_ms",
        "overhead_ms",
        "input",
        "output",
        "rewards",
        "api",
        "prompt_tokens",
        "completion_tokens",
        "tools",
        "input_messages",
        "sampling",
        "train",
    ]
    assert plain["finished_at"] == "2026-03-01T12:00:01Z" and plain["input"] == {"role": "user", "content": "hi"}
    with_tokens = orjson.loads(
        render(CallSummary(**call_fields(), prompt_token_ids=[1, 2], completion_token_ids=None, logprobs=[-0.25, 0.0]))
    )
    assert list(with_tokens)[-4:] == ["train", "prompt_token_ids", "completion_token_ids", "logprobs"]
    assert plain["input_messages"] == [{"role": "user", "content": "hi"}]  # tool keys only when given
    assert plain["train"] == {"trainable": False, "reason": "no token ids recorded"}
    assert with_tokens["completion_token_ids"] is None and with_tokens["logprobs"] == [-0.25, 0.0]


def test_call_input_and_output_keep_optional_keys_out():
    assert render(CallInput(role="user", content="q")) == b'{"role":"user","content":"q"}'
    assert (
        render(CallInput(role="tool", content="4", tool_call_id="tc"))
        == b'{"role":"tool","content":"4","tool_call_id":"tc"}'
    )
    assert render(CallOutput(content=None)) == b'{"content":null}'
    out = CallOutput(content="x", reasoning_content="r", tool_calls=[{"id": "t", "name": "f", "arguments": {"a": 1}}])
    assert (
        render(out)
        == b'{"content":"x","reasoning_content":"r","tool_calls":[{"id":"t","name":"f","arguments":{"a":1}}]}'
    )


def test_call_detail_key_order():
    detail = CallDetail(
        **call_fields(rewards=[reward(final=False, call_id="c1")]),
        upstream="http://up",
        request={"z": 1, "a": 2},
        response=[1],
        session_final=reward(),
    )
    keys = list(orjson.loads(render(detail)))
    assert keys[-5:] == ["train", "upstream", "request", "response", "session_final"]
    detail = CallDetail(
        **call_fields(),
        upstream=None,
        request=None,
        response=None,
        prompt_token_ids=[1],
        completion_token_ids=[2],
        logprobs=[-1.0],
        session_final=None,
    )
    body = orjson.loads(render(detail))
    assert list(body)[-5:] == ["response", "prompt_token_ids", "completion_token_ids", "logprobs", "session_final"]
    assert body["request"] is None and body["session_final"] is None
    assert b'"request":{"z":1,"a":2}' in render(
        CallDetail(**call_fields(), upstream=None, request={"z": 1, "a": 2}, response=None, session_final=None)
    )  # JSON as stored


def session_fields(**kw) -> dict:
    final = FinalReward(id=3, value=None, source="user", created_at=T + timedelta(seconds=1))
    base = dict(
        id="s1",
        task_id="t",
        status="finished",
        n_calls=1,
        first_call_at=T,
        last_call_at=T,
        finished_at=final.created_at,
        final_reward=None,
        final=final,
        claimed_by=None,
        claimed_at=None,
        train_step=None,
        skip_reason=None,
        agents=["alice"],
        n_failed=1,
        n_untrainable=2,
    )
    return {**base, **kw}


def test_session_summary_and_detail():
    summary = orjson.loads(render(SessionSummary(**session_fields())))
    assert list(summary) == [
        "object",
        "id",
        "task_id",
        "status",
        "n_calls",
        "first_call_at",
        "last_call_at",
        "finished_at",
        "final_reward",
        "final",
        "claimed_by",
        "claimed_at",
        "train_step",
        "skip_reason",
        "agents",
        "n_failed",
        "n_untrainable",
        "pruned_at",
    ]
    assert summary["final"] == {"id": 3, "value": None, "source": "user", "created_at": "2026-03-01T12:00:02.123456Z"}
    detail = SessionDetail(**session_fields(), calls=[CallSummary(**call_fields())], rewards=[reward()])
    assert list(orjson.loads(render(detail)))[-4:] == ["n_untrainable", "pruned_at", "calls", "rewards"]


def test_orphaned_session_shape():
    r = reward(session_id="orph")
    body = orjson.loads(
        render(OrphanedSession(id="orph", finished_at=r.created_at, final_reward=r.value, final=r, rewards=[r]))
    )
    assert list(body) == [
        "object",
        "id",
        "task_id",
        "status",
        "n_calls",
        "finished_at",
        "final_reward",
        "final",
        "agents",
        "n_failed",
        "n_untrainable",
        "calls",
        "rewards",
    ]
    assert body["n_failed"] == body["n_untrainable"] == 0
    assert body["status"] == "orphaned" and body["n_calls"] == 0 and body["task_id"] is None
    assert body["final"]["object"] == "reward" and body["agents"] == [] and body["calls"] == []


def test_stats_and_trainer_rows():
    stats = Stats(
        sessions={"open": 1, "finished": 0, "claimed": 0, "trained": 0, "skipped": 0, "odd": 2, "total": 3},
        calls={"total": 1, "trainable": 1, "failed": 0, "untrainable": 0, "by_api": {"chat": 1}},
        rewards={
            "total": 1,
            "final": 1,
            "intermediate": 0,
            "finished_without_reward": 0,
            "orphaned": 0,
            "orphaned_sessions": 0,
            "by_source": {"user": {"final": 1, "intermediate": 0, "mean_final": 0.5, "mean_intermediate": None}},
        },
        orphaned_rewards=0,
        reward_by_policy_version=[{"policy_version": None, "sessions": 1, "rewarded": 1, "mean": 0.5}],
    )
    body = orjson.loads(render(stats))
    assert list(body) == ["object", "sessions", "calls", "rewards", "orphaned_rewards", "reward_by_policy_version"]
    assert list(body["sessions"]) == ["open", "finished", "claimed", "trained", "skipped", "odd", "total"]
    assert body["rewards"]["by_source"]["user"]["mean_final"] == 0.5
    step = TrainStepRow(
        step=1, policy_version=None, n_sessions=2, n_samples=3, metrics={"loss": 1, "x/y": 0.5}, created_at=T
    )
    assert render(step) == (
        b'{"object":"train_step","step":1,"policy_version":null,"n_sessions":2,"n_samples":3,'
        b'"metrics":{"loss":1,"x/y":0.5},"created_at":"2026-03-01T12:00:01.123456Z"}'
    )
    version = PolicyVersionRow(
        version=2,
        kind="lora",
        served_model="policy-v2",
        path="/ckpt/v2",
        train_step=2,
        status="published",
        created_at=T,
        serving_upstreams=["http://a", "http://b"],
    )
    assert list(orjson.loads(render(version)))[-2:] == ["created_at", "serving_upstreams"]


def test_schemas_document_every_key_and_which_are_optional():
    schema = CallSummary.model_json_schema(mode="serialization")
    assert {"id", "input", "output", "prompt_token_ids", "logprobs"} <= set(schema["properties"])
    assert "object" in schema["required"] and "prompt_token_ids" not in schema["required"]
    assert "tool_call_id" not in CallInput.model_json_schema(mode="serialization")["required"]

"""The typed records crossing from the proxy to the store name exactly the store's columns."""

from __future__ import annotations

from datetime import UTC, datetime

from trainwire.records import CALL_FIELDS, REWARD_FIELDS, CallRecord, RewardRecord, as_row
from trainwire.store.models import Call, Reward


def test_call_record_fields_are_the_calls_columns():
    assert set(CALL_FIELDS) == {c.name for c in Call.__table__.columns}


def test_reward_record_fields_are_rewards_columns():
    columns = {c.name for c in Reward.__table__.columns}
    assert set(REWARD_FIELDS) <= columns
    assert columns - set(REWARD_FIELDS) == {"id"}  # the database numbers rewards


def test_as_row_is_a_shallow_dict_of_every_field():
    now = datetime.now(UTC)
    request = {"messages": [{"role": "user", "content": "hi"}]}
    rec = CallRecord(
        id="c1",
        session_id="s",
        seq=3,
        kind="chat",
        path="/v1/chat/completions",
        status_code=200,
        started_at=now,
        finished_at=now,
        request=request,
    )
    row = as_row(rec)
    assert list(row) == list(CALL_FIELDS)
    assert row["request"] is request and row["seq"] == 3 and row["trainable"] is True
    reward = RewardRecord(
        session_id="s", value=-0.5, final=False, source="truncated", idempotency_key="k", created_at=now
    )
    assert as_row(reward)["metadata"] is None and as_row(reward)["source"] == "truncated"

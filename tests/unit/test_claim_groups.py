"""Which task groups a claim takes (store/claims.py, pick_groups) from hand-built candidate rows: whole groups
only, complete or timed out, oldest first, never overtaken by a later smaller group, the first group cut to
fit. No database: the rows are what the locked SELECT returns (ordered by when the final reward came)."""

from __future__ import annotations

from collections import namedtuple
from datetime import UTC, datetime, timedelta

import pytest

from trainwire.store.claims import pick_groups

Row = namedtuple("Row", "id task_id finished_at")
CUTOFF = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)  # groups whose oldest member is older have timed out


def rows(*spec, naive=False):
    """spec: (id, task_id, seconds after CUTOFF); returned ordered by finished_at like the query's rows."""
    out = []
    for sid, task, after in spec:
        at = CUTOFF + timedelta(seconds=after)
        out.append(Row(sid, task, at.replace(tzinfo=None) if naive else at))
    return sorted(out, key=lambda r: (r.finished_at, r.id))


def ids(picked):
    return [r.id for r in picked]


def test_complete_groups_and_loners_are_taken_young_incomplete_groups_wait():
    candidates = rows(("a1", "A", 1), ("b1", "B", 2), ("a2", "A", 3), ("l1", None, 4), ("b2", "B", 5), ("a3", "A", 6))
    picked = pick_groups(candidates, batch_size=8, group_size=3, timeout_cutoff=CUTOFF)
    # A has 3 of 3; B has 2 of 3 and its oldest is younger than the timeout; a session without a task is a
    # group of its own
    assert ids(picked) == ["a1", "a2", "a3", "l1"]


def test_incomplete_group_is_taken_once_its_oldest_member_timed_out():
    candidates = rows(("b1", "B", -1), ("b2", "B", 5), ("c1", "C", 0), ("d1", "D", 1))
    picked = pick_groups(candidates, batch_size=8, group_size=3, timeout_cutoff=CUTOFF)
    # B's oldest is past the cutoff, C's is exactly at it (<=), D's is after it; a group's members stay together
    assert ids(picked) == ["b1", "b2", "c1"]


def test_naive_sqlite_timestamps_count_as_utc():
    old = rows(("b1", "B", -10), ("b2", "B", -5), naive=True)
    young = rows(("c1", "C", 10), naive=True)
    assert ids(pick_groups(old + young, batch_size=8, group_size=3, timeout_cutoff=CUTOFF)) == ["b1", "b2"]


def test_groups_keep_oldest_first_order_a_later_smaller_group_does_not_overtake():
    candidates = rows(
        ("a1", "A", 1), ("a2", "A", 2), ("b1", "B", 3), ("b2", "B", 4), ("b3", "B", 5), ("c1", "C", 6), ("c2", "C", 7)
    )
    picked = pick_groups(candidates, batch_size=4, group_size=2, timeout_cutoff=CUTOFF)
    # A fits (2); B (3 more) would overflow 4, so the claim stops there: C fits but is younger than B
    assert ids(picked) == ["a1", "a2"]


def test_stops_when_the_batch_is_full():
    candidates = rows(("a1", "A", 1), ("a2", "A", 2), ("b1", "B", 3), ("b2", "B", 4), ("c1", "C", 5), ("c2", "C", 6))
    picked = pick_groups(candidates, batch_size=4, group_size=2, timeout_cutoff=CUTOFF)
    assert ids(picked) == ["a1", "a2", "b1", "b2"]


@pytest.mark.parametrize(
    "batch_size, group_size, want",
    [
        (2, 3, ["a1", "a2", "a3"]),  # bigger than the batch: cut to the group size, so a group still fits
        (4, 2, ["a1", "a2", "a3", "a4"]),  # cut to the batch size
    ],
)
def test_first_group_always_goes_in_cut_to_the_larger_of_batch_and_group_size(batch_size, group_size, want):
    candidates = rows(*[(f"a{i}", "A", i) for i in range(1, 7)], ("l1", None, 10))
    assert ids(pick_groups(candidates, batch_size=batch_size, group_size=group_size, timeout_cutoff=CUTOFF)) == want


def test_sessions_without_task_are_separate_groups():
    candidates = rows(("l1", None, 1), ("l2", None, 2), ("l3", None, 3))
    assert ids(pick_groups(candidates, batch_size=2, group_size=4, timeout_cutoff=CUTOFF)) == ["l1", "l2"]


def test_nothing_eligible():
    assert pick_groups([], batch_size=4, group_size=2, timeout_cutoff=CUTOFF) == []
    young = rows(("a1", "A", 1), ("b1", "B", 2))
    assert pick_groups(young, batch_size=4, group_size=2, timeout_cutoff=CUTOFF) == []

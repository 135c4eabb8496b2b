"""The calls a writer committed that later calls of their sessions may be stored against (store/call_deltas.py),
and for how long: a bounded LRU cache, and the age past which a cached call is no base.

The writer (store/writer.py) encodes against it while it builds a batch; `trainwire compact-calls`
(store/compact.py) uses one per session, with no age limit, inside its own transaction."""

from __future__ import annotations

import collections
import time

from trainwire.store.call_deltas import BaseCall

# How old (since it started) a cached call may be for the writer to store a delta against it. Far below the
# smallest `trainwire prune --older-than-days` (store/retention.MIN_OLDER_THAN_DAYS, one day), so no delta is
# written against a call of a session prune may have pruned (see DeltaCache).
MAX_BASE_AGE_S = 3600.0


class DeltaCache:
    """The calls a writer committed that later calls of their sessions may be stored against: the last
    `per_session` calls of each of the `max_sessions` sessions written most recently, within about `max_bytes` of
    token ids and message digests, least recently written evicted first. A call that its successor extends (its
    tokens and messages are a prefix of the successor's) is dropped: the successor serves every later call at
    least as well. So a session that only grows holds one call, and a retried turn or interleaved agents keep
    the calls they branch from.

    A call is offered as a base only while it started less than `max_age_s` ago (None: always, for
    compact-calls, which reads a session's calls in its own transaction). `trainwire prune` only prunes a
    session whose last call started `MIN_OLDER_THAN_DAYS` (a day) or more ago, and a cached call started no
    later than that last call; so by the time prune may have dropped a cached call's body, that call has long
    expired here, and the session's next call is stored whole. The writer checks the age again before each
    attempt to write a batch (a batch retried while the database is away could otherwise outlive it)."""

    def __init__(
        self,
        max_sessions: int = 10_000,
        max_bytes: int = 512 << 20,
        per_session: int = 4,
        max_age_s: float | None = MAX_BASE_AGE_S,
    ) -> None:
        self.max_sessions, self.max_bytes, self.per_session = max_sessions, max_bytes, per_session
        self.max_age_s = max_age_s
        self._sessions: collections.OrderedDict[str, list[BaseCall]] = collections.OrderedDict()
        self.bytes = 0

    @staticmethod
    def _size(base: BaseCall) -> int:
        return base.size

    @staticmethod
    def _extends(new: BaseCall, old: BaseCall) -> bool:
        def prefix(a, b) -> bool:
            return b is None or (a is not None and a[: len(b)] == b)

        return new.kind == old.kind and prefix(new.tokens, old.tokens) and prefix(new.messages, old.messages)

    def bases(self, session_id: str, now: float | None = None) -> list[BaseCall]:
        """The session's cached calls that have not expired (`now`: epoch seconds, the current time by
        default)."""
        calls = self._sessions.get(session_id)
        if not calls:
            return []
        if self.max_age_s is None:
            return list(calls)
        oldest = (time.time() if now is None else now) - self.max_age_s
        fresh = [c for c in calls if c.started >= oldest]
        if len(fresh) < len(calls):  # expired calls never come back: drop them
            self.bytes -= sum(self._size(c) for c in calls if c.started < oldest)
            if fresh:
                self._sessions[session_id] = fresh
            else:
                del self._sessions[session_id]
        return fresh

    def add(self, session_id: str, base: BaseCall) -> None:
        calls = self._sessions.pop(session_id, None)
        if calls:
            kept = [c for c in calls if not self._extends(base, c)]
            kept = kept[max(0, len(kept) - (self.per_session - 1)) :]
            self.bytes += sum(self._size(c) for c in kept) - sum(self._size(c) for c in calls)
            kept.append(base)
        else:  # most sessions are new to the cache: no list to filter
            kept = [base]
        self.bytes += self._size(base)
        self._sessions[session_id] = kept
        while self._sessions and (len(self._sessions) > self.max_sessions or self.bytes > self.max_bytes):
            _, evicted = self._sessions.popitem(last=False)
            self.bytes -= sum(self._size(b) for b in evicted)

    def __len__(self) -> int:
        return len(self._sessions)

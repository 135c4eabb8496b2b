"""A call stored as what it adds to its session, and the full call rebuilt from it. Pure functions, no database.

Every call of an agent session resends the whole conversation, so storing each call's prompt token ids and
request messages whole costs the square of the session's length. When a call's prompt starts with the tokens
of an earlier call of the same session (its prompt, then its completion: the usual next turn), the row keeps a
reference to that call (`base_call_id`), how many of its tokens are shared (`prompt_prefix_len`) and only the
tokens after them. The request's message list (its kind's `list_key` in trainwire.call_shapes: `messages` of chat and
Messages requests, the `input` list of a Responses request) is stored the same way: the base request's first `messages_prefix_len` messages, then the
stored ones. Everything else of the row is stored as it is. A call that shares nothing is stored whole.

The shared part is the longest common prefix, not only an exact extension, so a branched, compacted or
re-rendered context still shares what it can (a system prompt, the turns before a retry), and is always right.
Messages are compared by a digest of their JSON with sorted keys, the value the database keeps (Postgres jsonb
reorders keys; `True` and `1`, equal in Python, are different JSON).

- `encode_call(bases, record)`: the record to store (the record itself, or a copy with the delta fields set), and
  what the write path keeps of the call (a `BaseCall`: its full prompt + completion ids as JSON text, its
  messages' digests) to encode later calls against; `remember(record)` is the latter alone.
- Reading them back whole is store/delta_expand.py (`expand`): a delta whose bases do not hold what it shares
  raises `MissingBase` (defined here), never returns a shorter value.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from trainwire.call_shapes import shape_of
from trainwire.records import CallRecord

__all__ = [
    "BaseCall",
    "MissingBase",
    "encode",
    "encode_call",
    "list_key",
    "message_list",
    "remember",
]


_DUMPS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


class MissingBase(LookupError):
    """A stored delta that cannot be rebuilt: its base call is not in the database, or holds fewer tokens or
    messages than the delta shares with it (a base whose body was dropped). Neither is ever written by
    trainwire: rows deleted by hand, or a delta against a pruned call, which the writer's cache expiry rules
    out (store/writer.py). A reader raises rather than return a shorter prompt."""


def list_key(kind: str | None) -> str | None:
    """The request key holding the conversation of a call of this kind (its shape's `list_key`); None: the
    request is stored whole (a completion's `prompt`)."""
    return shape_of(kind).list_key


def message_list(kind: str | None, request: Any) -> list[Any] | None:
    """The request's message list of a call of this kind, or None when it has none."""
    key = list_key(kind)
    if key is None or not isinstance(request, dict):
        return None
    value = request.get(key)
    return value if isinstance(value, list) else None


@dataclass(frozen=True, slots=True)
class BaseCall:
    """What the write path remembers of a call it wrote: enough to encode later calls against it, compactly.
    Token ids as their JSON text, each followed by a comma (`b"12,345,"`; comparing prefixes of it is a memcmp,
    and orjson writes it faster than an int32 array can be filled); messages as a digest each."""

    id: str
    kind: str
    tokens: bytes | None  # its full prompt + completion token ids, "a,b,c,"
    messages: tuple[bytes, ...] | None  # a digest of each message of its full request's list
    message_sizes: tuple[int, ...] = ()  # each message's JSON size (what sharing it saves)
    messages_digest: bytes | None = None  # a digest of the whole list's JSON (the fast check of an extension)
    n_tokens: int = 0  # how many token ids `tokens` holds
    started: float = 0.0  # when the call started (epoch seconds): the writer's cache expires it

    @property
    def size(self) -> int:
        """About how many bytes it holds."""
        return len(self.tokens or b"") + 24 * len(self.messages or ()) + 200


def _ids_text(ids: Sequence[int] | None) -> bytes | None:
    if ids is None:
        return None
    try:
        raw = orjson.dumps(ids)
    except (TypeError, orjson.JSONEncodeError):
        return None  # not token ids (the database refuses the row anyway)
    return raw[1:-1] + b"," if len(raw) > 2 else b""


def _tokens_in(text: bytes, n_bytes: int) -> int:
    """How many whole token ids the first n_bytes of an "a,b,c," text hold."""
    return text.count(b",", 0, n_bytes)


def _digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


def _dumps(value: Any) -> bytes | None:
    try:
        return orjson.dumps(value, option=_DUMPS)
    except (TypeError, orjson.JSONEncodeError):
        return None  # a value JSON cannot hold (the database will refuse the row anyway)


def _per_message(messages: list[Any]) -> tuple[list[bytes], list[int], list[bytes]] | None:
    raws = []
    for m in messages:
        raw = _dumps(m)
        if raw is None:
            return None
        raws.append(raw)
    return [_digest(r) for r in raws], [len(r) for r in raws], raws


def _list_digest(raws: list[bytes]) -> bytes:
    """The digest of a list's JSON from the JSON of its items."""
    return _digest(b"[" + b",".join(raws) + b"]")


def _started(record: CallRecord) -> float:
    return record.started_at.timestamp() if record.started_at is not None else 0.0


def remember(record: CallRecord) -> BaseCall:
    """A written call (with its full values) as a base for the session's later calls."""
    tokens, n_tokens = _seq(record)
    messages = message_list(record.kind, record.request)
    found = _per_message(messages) if messages is not None else None
    if found is None:
        return BaseCall(
            id=record.id, kind=record.kind, tokens=tokens, messages=None, n_tokens=n_tokens, started=_started(record)
        )
    digests, sizes, raws = found
    return BaseCall(
        id=record.id,
        kind=record.kind,
        tokens=tokens,
        messages=tuple(digests),
        message_sizes=tuple(sizes),
        messages_digest=_list_digest(raws),
        n_tokens=n_tokens,
        started=_started(record),
    )


def _seq(record: CallRecord, prompt: bytes | None = None) -> tuple[bytes | None, int]:
    """A call's full prompt + completion ids as "a,b,c," text, and how many there are."""
    prompt = prompt if prompt is not None else _ids_text(record.prompt_token_ids)
    completion = _ids_text(record.completion_token_ids or []) if prompt is not None else None
    if prompt is None or completion is None:
        return None, 0
    return prompt + completion, len(record.prompt_token_ids or ()) + len(record.completion_token_ids or ())


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items a and b share: slices compared in C, binary search when they differ."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1  # a[:lo] == b[:lo] holds; a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _extension(base: BaseCall, kind: str, messages: list[Any] | None) -> tuple[int, Any] | None:
    """(n, a hash of the JSON of the first n messages as a list without its closing bracket) when `messages`
    starts with all n of the base's: one serialization of that prefix, no per-message work. None when it does
    not (or there is nothing to share)."""
    if (
        messages is None
        or base.kind != kind
        or base.messages is None
        or base.messages_digest is None
        or not 0 < len(base.messages) <= len(messages)
    ):
        return None
    n = len(base.messages)
    raw = _dumps(messages[:n])
    if raw is None:
        return None
    head = hashlib.blake2b(memoryview(raw)[:-1], digest_size=16)
    whole = head.copy()
    whole.update(b"]")
    return (n, head) if whole.digest() == base.messages_digest else None


def encode_call(bases: Iterable[BaseCall], record: CallRecord) -> tuple[CallRecord, BaseCall]:
    """The row to store for `record` against the best of `bases` (calls of its session already stored), and
    what to remember of `record` itself. The row is a copy holding only what the call adds, or the record
    itself when no base shares anything with it. A call that extends its base (the usual next turn) costs one
    serialization of its messages and of its prompt's ids, in C; only a branch or a compaction compares
    message by message."""
    bases = [b for b in bases if b.id != record.id]
    if not bases:  # a session's first call (or the first this writer sees): nothing to compare, only remember
        return record, remember(record)
    kind = record.kind
    messages = message_list(kind, record.request)
    prompt = _ids_text(record.prompt_token_ids)
    seq, n_seq = _seq(record, prompt)

    # Messages: an exact extension of one base first; else per message, against every base.
    shared: dict[str, int] = {}
    mine: BaseCall | None = None
    for base in bases:
        ext = _extension(base, kind, messages)
        if ext is None:
            continue
        n, head = ext
        assert messages is not None and base.messages is not None
        found = _per_message(messages[n:])
        if found is None:
            break
        digests, sizes, raws = found
        head.update(b"".join(b"," + r for r in raws) + b"]")
        mine = BaseCall(
            id=record.id,
            kind=kind,
            tokens=seq,
            messages=base.messages + tuple(digests),
            message_sizes=base.message_sizes + tuple(sizes),
            messages_digest=head.digest(),
            n_tokens=n_seq,
            started=_started(record),
        )
        shared[base.id] = n
        break
    if mine is None:
        mine = dataclasses.replace(remember(record), tokens=seq, n_tokens=n_seq)
        for base in bases:
            if base.kind == kind and base.messages is not None and mine.messages is not None:
                shared[base.id] = _common_prefix(base.messages, mine.messages)
    elif any(b.id not in shared for b in bases):
        for base in bases:
            if base.id not in shared and base.kind == kind and base.messages is not None:
                assert mine.messages is not None
                shared[base.id] = _common_prefix(base.messages, mine.messages)

    best: tuple[int, BaseCall, int, int] | None = None
    for base in bases:
        n_tokens = 0
        if base.tokens is not None and prompt is not None:
            if prompt.startswith(base.tokens):  # the usual next turn: all of the base's tokens, no count
                n_tokens = base.n_tokens
            else:
                n_tokens = _tokens_in(base.tokens, _common_prefix(base.tokens, prompt))
        n_messages = shared.get(base.id, 0)
        saved = 4 * n_tokens + sum(mine.message_sizes[:n_messages])
        if saved and (best is None or saved > best[0]):
            best = (saved, base, n_tokens, n_messages)
    if best is None:
        return record, mine
    _, base, n_tokens, n_messages = best
    changes: dict[str, Any] = {"base_call_id": base.id}
    if n_tokens:
        changes["prompt_token_ids"] = (record.prompt_token_ids or [])[n_tokens:]
        changes["prompt_prefix_len"] = n_tokens
    if n_messages:
        key = list_key(kind)
        assert key is not None and isinstance(record.request, dict)
        changes["messages_prefix_len"] = n_messages
        changes["request"] = {**record.request, key: record.request[key][n_messages:]}
    return dataclasses.replace(record, **changes), mine


def encode(bases: Iterable[BaseCall], record: CallRecord, mine: BaseCall | None = None) -> CallRecord:
    """The row to store for `record` (see `encode_call`; `mine`, the caller's `remember(record)`, is not needed)."""
    return encode_call(bases, record)[0]

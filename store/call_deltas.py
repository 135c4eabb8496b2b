"""A call stored as what it adds to its session, and the full call rebuilt from it. Pure functions, no database.

Every call of an agent session resends the whole conversation, so storing each call's prompt token ids and
request messages whole costs the square of the session's length. When a call's prompt starts with the tokens
of an earlier call of the same session (its prompt, then its completion: the usual next turn), the row keeps a
reference to that call (`base_call_id`), how many of its tokens are shared (`prompt_prefix_len`) and only the
tokens after them. The request's message list (`messages` of chat and Messages requests, the `input` list of a
Responses request) is stored the same way: the base request's first `messages_prefix_len` messages, then the
stored ones. Everything else of the row is stored as it is. A call that shares nothing is stored whole.

The shared part is the longest common prefix, not only an exact extension, so a branched, compacted or
re-rendered context still shares what it can (a system prompt, the turns before a retry), and is always right.
Messages are compared by a digest of their JSON with sorted keys, the value the database keeps (Postgres jsonb
reorders keys; `True` and `1`, equal in Python, are different JSON).

- `remember(record)`: what the write path keeps of a call it wrote (a `BaseCall`: its full prompt + completion
  as int32 array, its messages' digests), to encode later calls against.
- `encode(bases, record)`: the record to store (the record itself, or a copy with the delta fields set).
- `expand(rows, wanted)`: the full prompt token ids and request of stored rows, linear in the output size.
"""

from __future__ import annotations

import dataclasses
import hashlib
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from trainwire.records import CallRecord

__all__ = ["LIST_KEYS", "BaseCall", "MissingBase", "Stored", "encode", "expand", "list_key", "message_list",
           "remember"]

# The request key holding the conversation, by calls.kind. A completion's `prompt` is stored whole.
LIST_KEYS = {"chat": "messages", "messages": "messages", "responses": "input"}

_DUMPS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


class MissingBase(LookupError):
    """A stored delta whose base call is not in the database (it never is, unless rows were deleted by hand)."""


def list_key(kind: str | None) -> str | None:
    return LIST_KEYS.get(kind or "")


def message_list(kind: str | None, request: Any) -> list[Any] | None:
    """The request's message list of a call of this kind, or None when it has none."""
    key = list_key(kind)
    if key is None or not isinstance(request, dict):
        return None
    value = request.get(key)
    return value if isinstance(value, list) else None


@dataclass(frozen=True, slots=True)
class BaseCall:
    """What the write path remembers of a call it wrote: enough to encode later calls against it."""

    id: str
    kind: str
    tokens: array | None                    # its full prompt + completion token ids (int32)
    messages: tuple[bytes, ...] | None      # a digest of each message of its full request's list
    message_sizes: tuple[int, ...] = ()     # each message's JSON size (what sharing it saves)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) if self.tokens is not None else 0


def _int32(ids: Iterable[int] | None) -> array | None:
    if ids is None:
        return None
    try:
        return array("i", ids)
    except (OverflowError, TypeError):
        return None  # not token ids an int4[] can hold: stored whole, as the database decides


def _digests(messages: list[Any] | None) -> tuple[tuple[bytes, ...], tuple[int, ...]] | None:
    if messages is None:
        return None
    digests, sizes = [], []
    try:
        for m in messages:
            raw = orjson.dumps(m, option=_DUMPS)
            digests.append(hashlib.blake2b(raw, digest_size=16).digest())
            sizes.append(len(raw))
    except (TypeError, orjson.JSONEncodeError):
        return None  # a value JSON cannot hold (the database will refuse the row anyway)
    return tuple(digests), tuple(sizes)


def remember(record: CallRecord) -> BaseCall:
    """A written call (with its full values) as a base for the session's later calls."""
    tokens = None
    if record.prompt_token_ids is not None:
        tokens = _int32([*record.prompt_token_ids, *(record.completion_token_ids or ())])
    found = _digests(message_list(record.kind, record.request))
    return BaseCall(id=record.id, kind=record.kind, tokens=tokens, messages=found[0] if found else None,
                    message_sizes=found[1] if found else ())


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items a and b share: slices compared in C, binary search when they differ."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1          # a[:lo] == b[:lo] holds; a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def encode(bases: Iterable[BaseCall], record: CallRecord,
           mine: BaseCall | None = None) -> CallRecord:
    """The record to store for `record` (full values, delta fields unset), against the best of `bases` (calls of
    its session already stored): a copy holding only what it adds, or the record itself when no base shares
    anything with it. `mine` is `remember(record)` when the caller has it already."""
    mine = mine or remember(record)
    prompt = None
    if mine.tokens is not None and record.prompt_token_ids is not None:
        prompt = mine.tokens[:len(record.prompt_token_ids)]
    key = list_key(record.kind)
    best: tuple[int, BaseCall, int, int] | None = None
    for base in bases:
        if base.id == record.id:
            continue
        n_tokens = _common_prefix(base.tokens, prompt) if base.tokens is not None and prompt is not None else 0
        n_messages = 0
        if (key is not None and base.kind == record.kind and base.messages is not None
                and mine.messages is not None):
            n_messages = _common_prefix(base.messages, mine.messages)
        saved = 4 * n_tokens + sum(mine.message_sizes[:n_messages])
        if saved and (best is None or saved > best[0]):
            best = (saved, base, n_tokens, n_messages)
    if best is None:
        return record
    _, base, n_tokens, n_messages = best
    changes: dict[str, Any] = {"base_call_id": base.id}
    if n_tokens:
        changes["prompt_prefix_len"] = n_tokens
        changes["prompt_token_ids"] = list(record.prompt_token_ids or ())[n_tokens:]
    if n_messages:
        assert key is not None and isinstance(record.request, dict)
        changes["messages_prefix_len"] = n_messages
        changes["request"] = {**record.request, key: record.request[key][n_messages:]}
    return dataclasses.replace(record, **changes)


# --- reading -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Stored:
    """The columns of one stored row that expansion reads."""

    id: str
    kind: str | None
    base_call_id: str | None = None
    prompt_prefix_len: int | None = None
    messages_prefix_len: int | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    request: Any = None

    @classmethod
    def of(cls, m: Mapping[Any, Any]) -> Stored:
        return cls(id=m["id"], kind=m.get("kind"), base_call_id=m.get("base_call_id"),
                   prompt_prefix_len=m.get("prompt_prefix_len"), messages_prefix_len=m.get("messages_prefix_len"),
                   prompt_token_ids=m.get("prompt_token_ids"), completion_token_ids=m.get("completion_token_ids"),
                   request=m.get("request"))

    @property
    def is_delta(self) -> bool:
        return self.prompt_prefix_len is not None or self.messages_prefix_len is not None


@dataclass(slots=True)
class Full:
    """A row's full values, as they were recorded."""

    prompt_token_ids: list[int] | None
    request: Any


def _row(rows: Mapping[str, Stored], call_id: str | None) -> Stored:
    row = rows.get(call_id) if call_id is not None else None
    if row is None:
        raise MissingBase(f"call {call_id!r}, the base of a stored delta, is not in the store")
    return row


def expand(rows: Mapping[str, Stored], wanted: Iterable[str], *, tokens: bool = True,
           request: bool = True) -> dict[str, Full]:
    """The full prompt token ids and request of each `wanted` row (`rows` must hold every base they reach),
    each built once from the slices it is made of: linear in what is returned, also for a single call at the
    end of a long chain. With `tokens` or `request` false that value is returned as stored."""
    order = list(dict.fromkeys(wanted))
    depth: dict[str, int] = {}
    for cid in order:
        path = []
        at: str | None = cid
        while at is not None and at not in depth:
            path.append(at)
            row = _row(rows, at)
            at = row.base_call_id if row.is_delta else None
            if len(path) > len(rows) + 1:
                raise MissingBase(f"the bases of call {cid!r} form a cycle")
        d = depth[at] if at is not None else -1
        for p in reversed(path):
            d += 1
            depth[p] = d
    order.sort(key=depth.__getitem__)   # a base before the calls built on it, so theirs are one slice away
    prompts: dict[str, list[int] | None] = {}
    lists: dict[str, list[Any] | None] = {}
    out = {}
    for cid in order:
        row = rows[cid]
        prompt = row.prompt_token_ids
        if tokens and row.prompt_prefix_len is not None:
            prompt = _token_prefix(rows, prompts, row.base_call_id, row.prompt_prefix_len) + list(prompt or ())
        req = row.request
        if request and row.messages_prefix_len is not None:
            key = list_key(row.kind)
            tail = message_list(row.kind, req)
            if key is None or tail is None:
                raise MissingBase(f"call {cid!r} stores a message delta without a message list")
            full = _message_prefix(rows, lists, row.base_call_id, row.messages_prefix_len) + tail
            lists[cid] = full
            req = {**req, key: full}
        elif request:
            lists[cid] = message_list(row.kind, req)
        prompts[cid] = prompt
        out[cid] = Full(prompt_token_ids=prompt, request=req)
    return out


def _token_prefix(rows: Mapping[str, Stored], done: Mapping[str, list[int] | None], cid: str | None,
                  n: int) -> list[int]:
    """The first n tokens of call `cid`'s full prompt + completion, walking down its bases as far as needed."""
    levels: list[list[int]] = []   # the tail each level adds, top level first
    while n > 0:
        row = _row(rows, cid)
        completion = list(row.completion_token_ids or ())
        if row.id in done or row.prompt_prefix_len is None:
            prompt = list((done[row.id] if row.id in done else row.prompt_token_ids) or ())
            levels.append((prompt + completion)[:n])
            break
        prefix = row.prompt_prefix_len
        if n > prefix:
            levels.append((list(row.prompt_token_ids or ()) + completion)[:n - prefix])
        n = min(n, prefix)
        cid = row.base_call_id
    out: list[int] = []
    for part in reversed(levels):
        out += part
    return out


def _message_prefix(rows: Mapping[str, Stored], done: Mapping[str, list[Any] | None], cid: str | None,
                    n: int) -> list[Any]:
    """The first n messages of call `cid`'s full request list."""
    levels: list[list[Any]] = []
    while n > 0:
        row = _row(rows, cid)
        if row.id in done:
            levels.append(list(done[row.id] or ())[:n])
            break
        stored = message_list(row.kind, row.request) or []
        if row.messages_prefix_len is None:
            levels.append(stored[:n])
            break
        prefix = row.messages_prefix_len
        if n > prefix:
            levels.append(stored[:n - prefix])
        n = min(n, prefix)
        cid = row.base_call_id
    out: list[Any] = []
    for part in reversed(levels):
        out += part
    return out

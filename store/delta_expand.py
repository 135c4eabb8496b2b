"""Stored calls rebuilt whole: `expand(rows, wanted)`, the full prompt token ids and request of rows stored as
deltas (store/call_deltas.py) from the chains of rows they refer to, linear in the output size. A delta whose bases
do not hold what it shares raises `MissingBase`, never returns a shorter value. Pure functions, no database:
store/delta_reads.py loads the rows."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from trainwire.store.call_deltas import MissingBase, list_key, message_list


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
        return cls(
            id=m["id"],
            kind=m.get("kind"),
            base_call_id=m.get("base_call_id"),
            prompt_prefix_len=m.get("prompt_prefix_len"),
            messages_prefix_len=m.get("messages_prefix_len"),
            prompt_token_ids=m.get("prompt_token_ids"),
            completion_token_ids=m.get("completion_token_ids"),
            request=m.get("request"),
        )

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


def expand(
    rows: Mapping[str, Stored], wanted: Iterable[str], *, tokens: bool = True, request: bool = True
) -> dict[str, Full]:
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
    order.sort(key=depth.__getitem__)  # a base before the calls built on it, so theirs are one slice away
    prompts: dict[str, list[int] | None] = {}
    lists: dict[str, list[Any] | None] = {}
    out = {}
    for cid in order:
        row = rows[cid]
        prompt = row.prompt_token_ids
        if tokens and row.prompt_prefix_len is not None:
            head = _token_prefix(rows, prompts, row.base_call_id, row.prompt_prefix_len)
            if len(head) != row.prompt_prefix_len:
                raise MissingBase(
                    f"call {cid!r} shares {row.prompt_prefix_len} tokens with its base "
                    f"{row.base_call_id!r}, whose stored values hold {len(head)} (a pruned body?)"
                )
            prompt = head + list(prompt or ())
        req = row.request
        if request and row.messages_prefix_len is not None:
            key = list_key(row.kind)
            tail = message_list(row.kind, req)
            if key is None or tail is None:
                raise MissingBase(f"call {cid!r} stores a message delta without a message list")
            head = _message_prefix(rows, lists, row.base_call_id, row.messages_prefix_len)
            if len(head) != row.messages_prefix_len:
                raise MissingBase(
                    f"call {cid!r} shares {row.messages_prefix_len} messages with its base "
                    f"{row.base_call_id!r}, whose stored values hold {len(head)} (a pruned body?)"
                )
            full = head + tail
            lists[cid] = full
            req = {**req, key: full}
        elif request:
            lists[cid] = message_list(row.kind, req)
        prompts[cid] = prompt
        out[cid] = Full(prompt_token_ids=prompt, request=req)
    return out


def _token_prefix(
    rows: Mapping[str, Stored], done: Mapping[str, list[int] | None], cid: str | None, n: int
) -> list[int]:
    """The first n tokens of call `cid`'s full prompt + completion, walking down its bases as far as needed."""
    levels: list[list[int]] = []  # the tail each level adds, top level first
    while n > 0:
        row = _row(rows, cid)
        completion = list(row.completion_token_ids or ())
        if row.id in done or row.prompt_prefix_len is None:
            prompt = list((done[row.id] if row.id in done else row.prompt_token_ids) or ())
            levels.append((prompt + completion)[:n])
            break
        prefix = row.prompt_prefix_len
        if n > prefix:
            levels.append((list(row.prompt_token_ids or ()) + completion)[: n - prefix])
        n = min(n, prefix)
        cid = row.base_call_id
    out: list[int] = []
    for part in reversed(levels):
        out += part
    return out


def _message_prefix(
    rows: Mapping[str, Stored], done: Mapping[str, list[Any] | None], cid: str | None, n: int
) -> list[Any]:
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
            levels.append(stored[: n - prefix])
        n = min(n, prefix)
        cid = row.base_call_id
    out: list[Any] = []
    for part in reversed(levels):
        out += part
    return out

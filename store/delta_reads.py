"""Readers' side of calls stored as deltas (store/call_deltas.py): rows as loaded, with their full values.

Every read of `calls.request` or `calls.prompt_token_ids` goes through `full_rows`, which loads the bases a
page of rows reaches but does not hold (within their sessions: first the small (id, base) graph, then the rows
of the chains in one query) and rebuilds each row once. Rows stored whole come back as they are, at no cost.
`prompt_tokens` and `prompt_missing` are the same facts in SQL, for counts and filters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Table, and_, func, select

from trainwire.store.delta_expand import Stored, expand
from trainwire.store.models import Call

__all__ = ["DELTA_COLS", "full_rows", "prompt_missing", "prompt_tokens"]

C: Table = Call.__table__  # type: ignore[assignment]

# The columns every query whose rows go through `full_rows` selects too.
DELTA_COLS = [C.c.base_call_id, C.c.prompt_prefix_len, C.c.messages_prefix_len]


def prompt_tokens(count):
    """The full prompt's length in SQL, from the stored tokens' count (`count`: a `_TokenCount` of the column)."""
    return func.coalesce(C.c.prompt_prefix_len, 0) + count


def prompt_missing(no_values):
    """True when the full prompt has no token ids (`no_values`: a `_NoValues` of the stored column); a delta always
    has its base's tokens."""
    return and_(C.c.prompt_prefix_len.is_(None), no_values)


async def full_rows(
    conn, rows: Sequence[Mapping[Any, Any]], *, tokens: bool = False, request: bool = True
) -> list[dict[str, Any]]:
    """`rows` (mappings holding `id`, `session_id`, `kind`, the `DELTA_COLS`, and `request` and/or
    `prompt_token_ids` + `completion_token_ids`) as dicts with the full `request` (with `request`) and full
    `prompt_token_ids` (with `tokens`)."""
    out = [dict(r) for r in rows]
    if not any(r.get("prompt_prefix_len") is not None or r.get("messages_prefix_len") is not None for r in out):
        return out
    stored = {r["id"]: Stored.of(r) for r in out}
    await _load_bases(conn, stored, tokens=tokens, request=request)
    full = expand(stored, [r["id"] for r in out if stored[r["id"]].is_delta], tokens=tokens, request=request)
    for r in out:
        f = full.get(r["id"])
        if f is None:
            continue
        if tokens:
            r["prompt_token_ids"] = f.prompt_token_ids
        if request:
            r["request"] = f.request
    return out


# How many times `_load_bases` goes back for bases a round's rows revealed. A round only finds some when a
# maintenance command rewrote rows between the round's queries; each round loads at least one new row.
LOAD_ROUNDS = 8


async def _load_bases(conn, stored: dict[str, Stored], *, tokens: bool, request: bool) -> None:
    """Add to `stored` every row the deltas in it are built on, transitively.

    The graph and the rows are separate queries, and on Postgres (READ COMMITTED) and SQLite alike each one can
    see a later commit than the one before: `trainwire compact-calls` may rewrite a row the graph saw whole into
    a delta of a call the graph did not lead to. Rather than require a snapshot (REPEATABLE READ on Postgres,
    one transaction on SQLite: the callers' connections are in whatever state their caller left them, and a
    long snapshot holds back vacuum), this goes back for the bases the loaded rows still lack, until there are
    none. That is correct whatever each query saw, because a row's full values never change: a row as stored
    before a rewrite and as stored after expand to the same values, each against its own base. It ends after
    `LOAD_ROUNDS` rounds or when a round finds nothing new; a base still missing then is `MissingBase` in
    `expand`, as it should be."""
    for _ in range(LOAD_ROUNDS):
        missing = {
            s.base_call_id
            for s in stored.values()
            if s.is_delta and s.base_call_id is not None and s.base_call_id not in stored
        }
        if not missing or not await _load_round(conn, stored, missing, tokens=tokens, request=request):
            return


async def _load_round(conn, stored: dict[str, Stored], missing: set[str], *, tokens: bool, request: bool) -> int:
    """Load the rows `missing` leads to (by the graph as this round reads it); how many new rows it added."""
    sessions = (await conn.execute(select(C.c.session_id).where(C.c.id.in_(missing)).distinct())).scalars().all()
    graph = dict(
        (
            await conn.execute(
                select(C.c.id, C.c.base_call_id).where(
                    C.c.session_id.in_(list(sessions)), C.c.base_call_id.is_not(None)
                )
            )
        ).all()
    )
    need: set[str] = set()
    todo = list(missing)
    while todo:
        cid = todo.pop()
        if cid in need or cid in stored:
            continue
        need.add(cid)
        base = graph.get(cid)
        if base is not None:
            todo.append(base)
    cols = [C.c.id, C.c.kind, *DELTA_COLS]
    if tokens:
        cols += [C.c.prompt_token_ids, C.c.completion_token_ids]
    if request:
        cols.append(C.c.request)
    added = 0
    for row in (await conn.execute(select(*cols).where(C.c.id.in_(list(need))))).all():
        if row.id not in stored:
            stored[row.id] = Stored.of(row._mapping)
            added += 1
    return added

"""Will a call be trained on, and why not: `train_status` for one call in Python, and the same rule in SQL
(`UNTRAINED`, with `FAILED`) for counts and filters over many, with the compiler extensions that read the size
of a token array without shipping it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, Integer, and_, case, func, or_
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from trainwire.store.delta_reads import prompt_missing
from trainwire.store.models import Call, Session

S, C = Session.__table__, Call.__table__


# The train reason of a call whose token ids `trainwire prune` dropped: recorded fine, never trained on again,
# and not counted as untrainable (`n_untrainable`, `has=untrainable`).
PRUNED_REASON = "pruned (its session's bodies were dropped by trainwire prune)"


def train_status(
    *,
    trainable: bool,
    route: str | None,
    kind: str,
    model: str | None,
    status_code: int,
    aborted: bool,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    n_logprobs: int | None,
    untrainable_reason: str | None,
    pruned: bool = False,
) -> dict[str, Any]:
    """`{"trainable": bool, "reason": str | None}`: whether the trainer will train on this call's tokens, and
    when it will not, why. `trainable` is the call's flag (false for evaluation, frozen and pass-through calls);
    a trainable call is still not trained on when it failed, has no token ids or logprobs (the trainer's
    skipped_no_tokens), or the proxy stored an `untrainable_reason` (sampling it cannot reproduce, token ids
    that disagree with the upstream's usage). A call of a pruned session (`pruned`) has no token ids left
    either: its reason is `PRUNED_REASON`, which the counts leave out. `UNTRAINED` below is the same rule in SQL."""
    reason: str | None
    if not trainable:
        if route == "passthrough" or kind == "other":
            reason = "pass-through call (no token ids)"
        elif route == "frozen":
            reason = f"frozen route (model {model or '?'})"
        else:
            reason = "evaluation call (X-Trainwire-Train: false)"
    elif status_code != 200:
        reason = f"failed upstream call (status {status_code})"
    elif pruned and not (prompt_tokens and completion_tokens and n_logprobs):
        reason = untrainable_reason or PRUNED_REASON
    elif not prompt_tokens or not completion_tokens:
        reason = "aborted without tokens" if aborted else "no token ids recorded"
    elif not n_logprobs:
        reason = "no logprobs recorded"
    else:
        reason = untrainable_reason or None
    return {"trainable": reason is None, "reason": reason}


class TokenCount(FunctionElement):
    """How many values a token-id or logprob array holds, NULL when there is none (without shipping the array):
    cardinality() of an int4[] / float4[] on Postgres, the JSON array's length on SQLite."""

    type = Integer()
    name = "tw_token_count"
    inherit_cache = True


@compiles(TokenCount, "postgresql")
def _token_count_pg(element, compiler, **kw):
    return f"cardinality({compiler.process(element.clauses, **kw)})"


@compiles(TokenCount)
def _token_count_sqlite(element, compiler, **kw):
    col = compiler.process(element.clauses, **kw)
    return f"(CASE WHEN json_type({col}) = 'array' THEN json_array_length({col}) END)"


class _NoValues(FunctionElement):
    """True when a token-id or logprob array is missing or empty. On Postgres this reads the stored size, not
    the array (pg_column_size never fetches or decompresses a TOASTed value, so /stats need not read every
    prompt): an empty int4[]/float4[] is 13 bytes stored (16 unpacked), one with a single value 25 (28)."""

    type = Boolean()
    name = "tw_no_values"
    inherit_cache = True


@compiles(_NoValues, "postgresql")
def _no_values_pg(element, compiler, **kw):
    col = compiler.process(element.clauses, **kw)
    return f"({col} IS NULL OR pg_column_size({col}) < 20)"


@compiles(_NoValues)
def _no_values_sqlite(element, compiler, **kw):
    col = compiler.process(element.clauses, **kw)  # SQLite keeps None as JSON 'null': its length is 0 too
    return f"({col} IS NULL OR json_array_length({col}) = 0)"


# A trainable call that will not be trained on (train_status's rule): evaluation, frozen and pass-through calls
# are not counted, they were never meant to be trained; nor are the missing token ids of a pruned session's
# calls (they were recorded; prune dropped them). It reads the call's session row (`S`): a query over calls
# joins or correlates `sessions`.
_NO_TOKENS = or_(
    prompt_missing(_NoValues(C.c.prompt_token_ids)), _NoValues(C.c.completion_token_ids), _NoValues(C.c.logprobs)
)
UNTRAINED = and_(
    C.c.trainable.is_(True),
    or_(C.c.status_code != 200, and_(S.c.pruned_at.is_(None), _NO_TOKENS), C.c.untrainable_reason.is_not(None)),
)
# A failed call: its status code, which prune keeps, so a pruned session's failed calls still count.
FAILED = C.c.status_code != 200


def count_of(cond):
    """How many rows of a group hold `cond` (0 for none)."""
    return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)

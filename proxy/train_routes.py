"""What the trainer did, for the dashboard and for scripts (admin key when one is set). Newest first, paginated
like the read API: `{"object": "list", "data": [...], "has_more": bool, "next_cursor": str | null}`.

    GET /train/steps?limit=&cursor=&offset=       one row per optimizer step: step, policy_version, n_sessions,
                                                  n_samples, metrics {loss, grad_norm, reward/mean, ...}, created_at
    GET /policy/versions?limit=&cursor=&offset=   published weights: version, kind, served_model, path,
                                                  train_step, status, created_at, serving_upstreams
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select
from starlette.responses import Response
from trainwire.proxy.errors import ApiError
from trainwire.proxy.plumbing import Limit, Offset, admin, json_response, state_of
from trainwire.store.models import PolicyVersion, TrainStep, UpstreamVersion
from trainwire.store.queries import BadQuery, Page, decode_cursor, encode_cursor
from trainwire.store.rewards import aware

router = APIRouter(dependencies=[Depends(admin)])

T, P, U = TrainStep.__table__, PolicyVersion.__table__, UpstreamVersion.__table__



def _int_cursor(cursor: str) -> int:
    (last,) = decode_cursor(cursor, 1)
    if not isinstance(last, int) or isinstance(last, bool):
        raise BadQuery("cursor is not a cursor this API returned (use next_cursor as given)", "cursor")
    return last


async def _page(request: Request, table, key, limit: int, cursor: str | None, offset: int | None) -> tuple[list, bool]:
    """Rows of `table` by `key` descending (a unique integer column): keyset after `cursor`, or `offset`."""
    q = select(table)
    if cursor:
        try:
            q = q.where(key < _int_cursor(cursor))
        except BadQuery as exc:
            raise ApiError(400, str(exc), param=exc.param, code="invalid_value") from None
    q = q.order_by(key.desc()).limit(limit + 1)
    if offset and not cursor:
        q = q.offset(offset)
    async with state_of(request).engine.connect() as conn:
        rows = [r._mapping for r in (await conn.execute(q)).all()]
    return rows[:limit], len(rows) > limit


def _step_dict(m) -> dict[str, Any]:
    return {"object": "train_step", "step": m["step"], "policy_version": m["policy_version"],
            "n_sessions": m["n_sessions"], "n_samples": m["n_samples"], "metrics": m["metrics"] or {},
            "created_at": aware(m["created_at"])}


@router.get("/train/steps")
async def train_steps(request: Request, limit: int = Limit, cursor: str | None = None,
                      offset: int | None = Offset) -> Response:
    rows, more = await _page(request, T, T.c.step, limit, cursor, offset)
    return json_response(Page([_step_dict(r) for r in rows], encode_cursor(rows[-1]["step"]) if more and rows else None)
                 .body())


@router.get("/policy/versions")
async def policy_versions(request: Request, limit: int = Limit, cursor: str | None = None,
                          offset: int | None = Offset) -> Response:
    rows, more = await _page(request, P, P.c.version, limit, cursor, offset)
    async with state_of(request).engine.connect() as conn:
        serving = (await conn.execute(select(U.c.upstream, U.c.version).order_by(U.c.upstream))).all()
    by_version: dict[int, list[str]] = {}
    for upstream, version in serving:
        by_version.setdefault(version, []).append(upstream)
    data = [{"object": "policy_version", "version": m["version"], "kind": m["kind"],
             "served_model": m["served_model"], "path": m["path"], "train_step": m["train_step"],
             "status": m["status"], "created_at": aware(m["created_at"]),
             "serving_upstreams": by_version.get(m["version"], [])} for m in rows]
    return json_response(Page(data, encode_cursor(rows[-1]["version"]) if more and rows else None).body())

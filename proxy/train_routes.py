"""What the trainer did, for the dashboard and for scripts (admin key when one is set). Newest first, paginated
like the read API: `{"object": "list", "data": [...], "has_more": bool, "next_cursor": str | null}`.

    GET /train/steps?limit=&cursor=&offset=       one row per optimizer step: step, policy_version, n_sessions,
                                                  n_samples, metrics {loss, grad_norm, reward/mean, ...}, created_at
    GET /policy/versions?limit=&cursor=&offset=   published weights: version, kind, served_model, path,
                                                  train_step, status, created_at, serving_upstreams

A cursor must be one these routes handed out: one that decodes to anything but an integer the step or version
column can hold is a 400, before any query (store/reads/cursors.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from trainwire.proxy.errors import responses
from trainwire.proxy.plumbing import Cursor, Limit, Offset, WireInt, admin, json_response, state_of
from trainwire.store.read_models import Page, PolicyVersionRow, TrainStepRow
from trainwire.store.reads import trainer

router = APIRouter(dependencies=[Depends(admin)])
ERRORS = responses(400, 401, 503)


@router.get("/train/steps", response_model=Page[TrainStepRow], responses=ERRORS)
async def train_steps(
    request: Request, limit: WireInt = Limit, cursor: str | None = Cursor, offset: WireInt | None = Offset
) -> Response:
    page = await trainer.list_train_steps(state_of(request).engine, limit=limit, cursor=cursor, offset=offset)
    return json_response(page.model_dump())


@router.get("/policy/versions", response_model=Page[PolicyVersionRow], responses=ERRORS)
async def policy_versions(
    request: Request, limit: WireInt = Limit, cursor: str | None = Cursor, offset: WireInt | None = Offset
) -> Response:
    page = await trainer.list_policy_versions(state_of(request).engine, limit=limit, cursor=cursor, offset=offset)
    return json_response(page.model_dump())

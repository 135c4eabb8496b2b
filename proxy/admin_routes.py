"""Admin routes (admin key when one is set): remove rewards, e.g. every reward of one AIR rule.

    DELETE /rewards/{reward_id}
    DELETE /rewards?source=RULE[&session_id=ID]     (at least one of source, session_id)

Answer: `{"object": "deleted", "deleted": N}`. Rewards of sessions the trainer has claimed stay (they are what
it trained on); removing a final reward reopens its session. A reward id outside the id column's range, or text
holding NUL, is a 400 (proxy/plumbing.py), never a query.
"""

from __future__ import annotations

from typing import Literal

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel
from starlette.responses import Response

from trainwire.proxy.errors import ApiError, responses
from trainwire.proxy.plumbing import INT64_MAX, WireInt, admin, state_of
from trainwire.store.rewards import delete_rewards

router = APIRouter(dependencies=[Depends(admin)])


class Deleted(BaseModel):
    """How many rewards were removed."""

    object: Literal["deleted"] = "deleted"
    deleted: int


def _answer(n: int) -> Response:
    return Response(orjson.dumps(Deleted(deleted=n).model_dump()), media_type="application/json")


@router.delete(
    "/rewards/{reward_id}",
    response_model=Deleted,
    responses=responses(
        400,
        401,
        404,
        503,
        s404="No reward with this id that can be removed (unknown, or its session is already claimed by the trainer)",
    ),
)
async def delete_one(
    request: Request, reward_id: WireInt = Path(ge=1, le=INT64_MAX, description="The reward's `id`")
) -> Response:
    n = await delete_rewards(state_of(request).engine, reward_id=reward_id)
    if not n:
        raise ApiError(
            404,
            f"no reward #{reward_id} that can be removed (unknown, or its session is already claimed by the trainer)",
            param="reward_id",
            code="reward_not_found",
        )
    return _answer(n)


@router.delete("/rewards", response_model=Deleted, responses=responses(400, 401, 503))
async def delete_many(
    request: Request,
    source: str | None = Query(None, max_length=64, description="Rule name, or `user`"),
    session_id: str | None = Query(None, max_length=128),
) -> Response:
    if not source and not session_id:
        raise ApiError(
            400,
            "give source (e.g. a rule name) and/or session_id: refusing to delete every reward",
            param="source",
            code="invalid_value",
        )
    return _answer(await delete_rewards(state_of(request).engine, source=source, session_id=session_id))

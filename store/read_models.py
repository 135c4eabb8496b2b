"""The typed records the store's read functions return, which are also the read API's answers.

They are pydantic models so that the proxy can declare them as response models (`/openapi.json` then documents
every answer) and serialize them without knowing the tables. Field order is the JSON key order. Serialize with
`record.model_dump()` then orjson with `OPT_UTC_Z | OPT_NAIVE_UTC` (what `proxy.plumbing.json_response` does):
datetimes stay `datetime` objects in the dump, so they render exactly as orjson renders them (ISO 8601, `Z`,
microseconds only when not zero). Every datetime is made timezone-aware (UTC) when a record is built: SQLite
hands datetimes back naive.

A few keys are present only in some answers (token ids only with `tokens=true`, `tool_call_id` only on tool
messages...): those fields are listed in `SPARSE` and are left out of the dump unless they were given when the
record was built.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

from trainwire.store.rewards import aware

UtcDatetime = Annotated[datetime, AfterValidator(aware)]


def _always_present(schema: dict[str, Any], cls: type["Record"]) -> None:
    # Records are answers, never input: every key but the sparse ones is always there (defaults included).
    schema["required"] = [name for name in schema.get("properties", {}) if name not in cls.SPARSE]


class Record(BaseModel):
    """Base of every read record: immutable, and fields in `SPARSE` are dropped from the dump when unset."""

    model_config = ConfigDict(frozen=True, json_schema_extra=_always_present)
    SPARSE: ClassVar[frozenset[str]] = frozenset()

    # No return annotation: with one, pydantic would document the answer as that type instead of the fields.
    @model_serializer(mode="wrap")
    def _drop_unset_sparse(self, handler: SerializerFunctionWrapHandler):
        out = handler(self)
        if self.SPARSE and isinstance(out, dict):
            for name in self.SPARSE - self.model_fields_set:
                out.pop(name, None)
        return out


T = TypeVar("T")


class Page(Record, Generic[T]):
    """One page of a list, newest first: pass `next_cursor` back as `cursor` for the next one."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    next_cursor: str | None

    @classmethod
    def of(cls, data: list[T], next_cursor: str | None) -> "Page[T]":
        return cls(data=data, has_more=next_cursor is not None, next_cursor=next_cursor)

    def body(self) -> dict[str, Any]:
        """The JSON answer as Python values (datetimes still datetimes)."""
        return self.model_dump()


# --- rewards ---------------------------------------------------------------------------------------------


class RewardOut(Record):
    """A stored reward, as the API shows it."""

    object: Literal["reward"] = "reward"
    id: int
    session_id: str
    call_id: str | None
    final: bool
    value: float | None
    source: str
    idempotency_key: str | None
    metadata: Any
    created_at: UtcDatetime


class RewardListItem(RewardOut):
    """A reward in `GET /rewards`: also whether its session is unknown (orphaned rewards are never trained)."""

    orphaned: bool


class FinalReward(Record):
    """The final reward of a session, as a session summary shows it."""

    id: int
    value: float | None
    source: str
    created_at: UtcDatetime


# --- calls -----------------------------------------------------------------------------------------------


class CallInput(Record):
    """What a call answered: the last user or tool message of a chat request, or a completion's prompt."""

    SPARSE: ClassVar[frozenset[str]] = frozenset({"tool_call_id"})
    role: str
    content: str | None
    tool_call_id: Any = None


class ToolCallOut(Record):
    id: Any
    name: Any
    arguments: Any


class CallOutput(Record):
    """The assistant's answer (choice 0): text, reasoning when there is some, tool calls when there are some."""

    SPARSE: ClassVar[frozenset[str]] = frozenset({"reasoning_content", "tool_calls"})
    content: Any
    reasoning_content: Any = None
    tool_calls: list[ToolCallOut] = []


class InputMessage(Record):
    """One message of a call's whole input, the same shape for every API: the system prompt (Responses'
    instructions, Anthropic's system) is a `system` message, tool calls are the assistant message's
    `tool_calls`, tool results are `tool` messages with the `tool_call_id` they answer; a completion's prompt
    is one `prompt` message. Non-text parts (images, files) appear in `content` as a `[type]` placeholder."""

    SPARSE: ClassVar[frozenset[str]] = frozenset({"tool_calls", "tool_call_id"})
    role: str
    content: str | None
    tool_calls: list[ToolCallOut] = []
    tool_call_id: Any = None


class TrainStatus(Record):
    """Whether the trainer will train on a call's tokens, and when not, why: an evaluation call
    (X-Trainwire-Train: false), a frozen route, a pass-through call, a failed upstream call, no token ids or
    logprobs recorded (or aborted without tokens), or the proxy's stored reason (sampling, token mismatch)."""

    trainable: bool
    reason: str | None


_TOKENS = frozenset({"prompt_token_ids", "completion_token_ids", "logprobs"})


class _CallBase(Record):
    object: Literal["call"] = "call"
    id: str
    session_id: str
    seq: int
    task_id: str | None
    agent_name: str | None
    trainable: bool
    kind: str
    path: str
    stream: bool
    model_requested: str | None
    model_served: str | None
    route: str
    policy_version: int | None
    status_code: int
    error: str | None
    aborted: bool
    finish_reason: str | None
    usage: Any
    started_at: UtcDatetime
    finished_at: UtcDatetime | None
    upstream_ms: float | None
    ttft_ms: float | None
    overhead_ms: float | None
    input: CallInput | None
    output: CallOutput | None
    rewards: list[RewardOut]
    api: str  # chat | completions | responses | messages | passthrough
    prompt_tokens: int | None  # how many token ids were recorded (null: none)
    completion_tokens: int | None
    tools: list[str]  # names of the tools the request offered
    input_messages: list[InputMessage]  # the whole input, system prompt first
    sampling: Any  # {"requested", "effective", "enforced"?} or null
    train: TrainStatus


class CallSummary(_CallBase):
    """A call inside a session: its text, timings and rewards; token ids only when asked for."""

    SPARSE: ClassVar[frozenset[str]] = _TOKENS
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    logprobs: list[float] | None = None


class CallDetail(_CallBase):
    """One call with its full request and response, and its session's final reward."""

    SPARSE: ClassVar[frozenset[str]] = _TOKENS
    upstream: str | None
    request: Any
    response: Any
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    session_final: RewardOut | None


# --- sessions --------------------------------------------------------------------------------------------


class SessionSummary(Record):
    """A session in `GET /sessions`. `status` is derived: the trainer's claimed / trained / skipped, else
    finished (a final reward row exists), else open."""

    object: Literal["session"] = "session"
    id: str
    task_id: str | None
    status: str
    n_calls: int
    first_call_at: UtcDatetime
    last_call_at: UtcDatetime
    finished_at: UtcDatetime | None
    final_reward: float | None
    final: FinalReward | None
    claimed_by: str | None
    claimed_at: UtcDatetime | None
    train_step: int | None
    skip_reason: str | None
    agents: list[str]
    n_failed: int  # calls whose status is not 200 (a pruned session's too: status codes are kept)
    n_untrainable: int  # trainable calls that will not be trained on (failed, no tokens, stored reason; not
    # the token ids a pruned session lost)
    # When `trainwire prune` dropped the bodies of its calls (store/retention.py), whose input, output and token
    # ids then read as null; null: never.
    pruned_at: UtcDatetime | None = None


class SessionDetail(SessionSummary):
    """One session with its calls in order and every reward (`pruned_at`: see SessionSummary)."""

    calls: list[CallSummary]
    rewards: list[RewardOut]


class OrphanedSession(Record):
    """A session known only from its rewards (no call recorded): `final` is the whole final reward."""

    object: Literal["session"] = "session"
    id: str
    task_id: None = None
    status: Literal["orphaned"] = "orphaned"
    n_calls: int = 0
    finished_at: UtcDatetime | None
    final_reward: float | None
    final: RewardOut | None
    agents: list[str] = []
    n_failed: int = 0
    n_untrainable: int = 0
    calls: list[CallSummary] = []
    rewards: list[RewardOut]


# --- stats -----------------------------------------------------------------------------------------------


class CallCounts(Record):
    """Calls recorded: `trainable` (not evaluation, frozen or pass-through), `failed` (status not 200),
    `untrainable` (trainable, yet not to be trained on: see TrainStatus), and how many each API served."""

    total: int
    trainable: int
    failed: int
    untrainable: int
    by_api: dict[str, int]


class SourceRewards(Record):
    final: int
    intermediate: int
    mean_final: float | None
    mean_intermediate: float | None


class RewardCounts(Record):
    total: int
    final: int
    intermediate: int
    finished_without_reward: int
    orphaned: int
    orphaned_sessions: int
    by_source: dict[str, SourceRewards]


class VersionRewards(Record):
    """Final rewards of the sessions a policy version served (a session's version: the newest of its calls)."""

    policy_version: int | None
    sessions: int
    rewarded: int
    mean: float | None


class Stats(Record):
    object: Literal["stats"] = "stats"
    sessions: dict[str, int]
    calls: CallCounts
    rewards: RewardCounts
    orphaned_rewards: int
    reward_by_policy_version: list[VersionRewards]


# --- trainer ---------------------------------------------------------------------------------------------


class TrainStepRow(Record):
    """One optimizer step of the trainer."""

    object: Literal["train_step"] = "train_step"
    step: int
    policy_version: int | None
    n_sessions: int
    n_samples: int
    metrics: dict[str, Any]
    created_at: UtcDatetime


class PolicyVersionRow(Record):
    """Weights the trainer published, and which upstreams serve them now."""

    object: Literal["policy_version"] = "policy_version"
    version: int
    kind: str
    served_model: str
    path: str
    train_step: int | None
    status: str
    created_at: UtcDatetime
    serving_upstreams: list[str]

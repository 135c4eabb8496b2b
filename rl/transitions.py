"""Training samples from claimed sessions, built from the token ids the proxy recorded (never re-tokenized).

Modes
-----
* ``transition`` (LightningRL's default): one sample per LLM call: prompt = the call's
  ``prompt_token_ids``, response = its ``completion_token_ids`` (all trained, ``response_mask`` 1),
  ``old_logprobs`` = the logprobs vLLM recorded. Score = the call's return (:mod:`rl.credit`).
* ``trajectory``: a call is appended to an earlier sample of the same episode when its prompt starts,
  token for token, with that sample's whole sequence (prompt + everything appended so far, i.e. the previous
  call's prompt + completion). The tokens between that sequence and the new call's completion (tool results,
  the next user turn, the chat template's turn markers) join the response with ``response_mask`` 0 and
  logprob 0.0 (they are context, not model output); the call's completion follows with mask 1 and its
  recorded logprobs. A call that extends no earlier sample (the chat template re-rendered history
  differently, the context was compacted, another agent's call) starts a new sample ("chain break").
  In a single-agent episode this merges consecutive calls; when several agents interleave, each call
  extends the sample whose sequence it continues (the longest such; the later sample of two equal ones).
  Score = the return of the sample's first call (the discounted sum of everything from there on).

  Merging uses how the store keeps a call (``ClaimedCall.base_call_id`` and ``prompt_prefix_len``,
  :mod:`trainwire.store.call_deltas`): a call whose prompt is stored as the whole of its base's prompt +
  completion, then a tail, continues the sample that base ended, and the tail is what it appends. Only the
  other samples at least as long are checked (their last token first: O(1) each unless one really continues
  the same sequence), so merging a session is linear in its tokens. Calls stored without that structure (whole
  rows, a base on another writer, a base that is not the end of a sample, SFT's re-rendered calls) are compared
  with every sample as before; both ways give the same samples.

Skipped calls
-------------
A call is not trained on when the proxy marked it so (an ``untrainable_reason``: sampling settings or a
constraint the trainer cannot reproduce, token ids that disagree with usage; ``skipped_untrainable``), when it
has no usable token data: non-200 status, no prompt or completion ids, no logprobs (``skipped_no_tokens``), or
logprobs that do not match the completion one for one or are not finite (``skipped_bad_logprobs``), or when
the sampling settings it was sent with (``sampling.effective``) are not the ones the trainer recomputes its
log-probs under (``skipped_sampling``): temperature ``--temperature``, top_p 1, top_k 0 or -1, min_p 0, presence
and frequency penalty 0, repetition penalty 1, every one recorded. Its tokens then came from another distribution
than the one the PPO ratio is taken against, so no sample is trained with log-probs computed under other
settings than those that produced its tokens; greedy calls (temperature 0) never enter training. Calls recorded
before the proxy kept ``sampling`` (no value at all) are trusted. An aborted stream that still produced tokens
is kept (a truncated sample of the policy, with matching logprobs). Only the call is skipped: the session's
other calls still make samples (in trajectory mode a skipped call's tokens become context, mask 0, of the next
call that continues it), and skipped calls still count in the credit assignment (their intermediate rewards
are part of "what follows").

Staleness
---------
A session is dropped (``skipped_stale``, its id in ``skipped_sessions``) when any call it would train
on was served by a policy version older than ``current_version - max_staleness`` (a missing version
counts as 0, the base model). ``max_staleness=None`` or negative disables the check.

Episode weighting
-----------------
Every sample of an episode gets ``weight = 1 / n`` where ``n`` is that episode's number of samples, so
each episode carries a total loss weight of 1 whatever its number of calls: a 20-call episode does not
count 20 times as much as a 1-call one in the policy loss (``Sample.weight`` multiplies a sample's
policy loss in :mod:`rl.engine`).

Groups
------
``group_ids[i]`` is ``"task:<task_id>"`` with ``group_by_task`` (``"session:<id>"`` for a session without
a task id: a group of its own), else ``"batch"`` for every sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from trainwire.rl.credit import call_returns
from trainwire.rl.samples import Sample
from trainwire.store.episodes import ClaimedCall, ClaimedSession

__all__ = [
    "BuildResult",
    "CallTokens",
    "Chain",
    "TRAINED_SAMPLING",
    "build_samples",
    "chain_calls",
    "sampling_mismatch",
    "usable_call",
]

# The settings under which vLLM samples from exactly softmax(logits / temperature), besides the temperature:
# what the trainer's log-probs assume. The proxy enforces the same table (proxy/sampling.py, which the trainer
# does not import).
TRAINED_SAMPLING: dict[str, float] = {
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}
_EPS = 1e-6


@dataclass
class BuildResult:
    samples: list[Sample] = field(default_factory=list)  # advantage 0.0: set it from the scores
    scores: list[float] = field(default_factory=list)  # per sample: its return (rl.credit)
    group_ids: list[str] = field(default_factory=list)  # per sample
    session_ids: list[str] = field(default_factory=list)  # per sample: its episode
    call_ids: list[tuple[str, ...]] = field(default_factory=list)  # per sample: the calls it covers
    versions: list[tuple[int, ...]] = field(default_factory=list)  # per sample: its calls' policy versions
    skipped_sessions: list[str] = field(default_factory=list)  # claimed sessions with no sample (stale/empty)
    counters: dict[str, int] = field(default_factory=dict)
    # skipped_sampling and skipped_untrainable calls by what was wrong (for the trainer's log)
    skip_reasons: dict[str, int] = field(default_factory=dict)
    staleness_mean: float = float("nan")  # mean of current_version - policy_version over the trained calls
    staleness_max: int = 0
    # trained sessions by their staleness: current_version minus the oldest version among their trained calls
    staleness_hist: dict[int, int] = field(default_factory=dict)

    @property
    def skipped_stale(self) -> int:
        return self.counters.get("skipped_stale", 0)

    @property
    def skipped_no_tokens(self) -> int:
        return self.counters.get("skipped_no_tokens", 0)

    @property
    def merged(self) -> int:
        return self.counters.get("merged", 0)

    def served_by(self, version: int) -> list[bool]:
        """Per sample: whether every call it covers was served by policy ``version``."""
        return [all(v == version for v in vs) for vs in self.versions]


def _same(key: str, got: object, want: float) -> bool:
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return False
    if key == "top_k":
        return got in (0, -1)  # both mean "off" to vLLM
    return math.isfinite(got) and abs(got - want) <= _EPS * max(1.0, abs(want))


def sampling_mismatch(sampling: object, temperature: float) -> str | None:
    """What makes a call's recorded sampling settings differ from the ones the trainer recomputes log-probs under
    (``temperature`` and :data:`TRAINED_SAMPLING`), or None when they agree. ``sampling`` None (a row from before
    the proxy recorded it) is trusted; a record without every effective setting is not."""
    if sampling is None:
        return None
    effective = sampling.get("effective") if isinstance(sampling, dict) else None
    if not isinstance(effective, dict):
        return "no effective sampling settings recorded"
    for key, want in {"temperature": temperature, **TRAINED_SAMPLING}.items():
        got = effective.get(key)
        if not _same(key, got, want):
            if key == "temperature" and isinstance(got, (int, float)) and not isinstance(got, bool) and got <= _EPS:
                return "greedy decoding (temperature 0)"
            return f"{key} {got!r}, the trainer's is {want!r}" if key in effective else f"{key} not recorded"
    return None


def usable_call(call: ClaimedCall, temperature: float = 1.0) -> str | None:
    """None when the call can be trained on, else the counter it is skipped under (see the module docstring)."""
    if call.untrainable_reason:
        return "skipped_untrainable"
    if call.status_code != 200 or not call.prompt_token_ids or not call.completion_token_ids or call.logprobs is None:
        return "skipped_no_tokens"
    if len(call.logprobs) != len(call.completion_token_ids) or not all(
        lp is not None and math.isfinite(lp) for lp in call.logprobs
    ):
        return "skipped_bad_logprobs"
    if sampling_mismatch(call.sampling, temperature) is not None:
        return "skipped_sampling"
    return None


def _tokens(index: int, call: ClaimedCall) -> CallTokens:
    """The tokens of a call :func:`usable_call` accepted (so none is missing), with how the store keeps them. The
    prompt is the claimed list itself, not a copy: chains copy the first call's and slice the others'."""
    assert call.prompt_token_ids is not None and call.completion_token_ids is not None and call.logprobs is not None
    return CallTokens(
        index,
        call.id,
        call.policy_version or 0,
        call.prompt_token_ids,
        list(call.completion_token_ids),
        [float(x) for x in call.logprobs],
        base=call.base_call_id,
        prefix_len=call.prompt_prefix_len,
    )


@dataclass(frozen=True)
class CallTokens:
    """One call's tokens as a sample is built from them: where the call sits in its session (``index``), its id and
    policy version, its prompt and completion ids, and the behaviour log-prob of each completion token (0.0 where
    there is none: calls another model served, :mod:`trainwire.rl.sft`)."""

    index: int
    call_id: str
    version: int
    prompt: list[int]
    completion: list[int]
    logprobs: list[float]
    # How the store keeps the call (ClaimedCall.base_call_id, prompt_prefix_len): the prompt's first `prefix_len`
    # tokens are the first ones of call `base`'s prompt + completion. None: no such structure (compared instead).
    base: str | None = None
    prefix_len: int | None = None
    # False for tokens that are not the ones the store holds (SFT's re-rendered frozen calls): a call stored on top
    # of such a call is compared, not merged by its structure.
    recorded: bool = True


class Chain:
    """A sample being built: a first call, extended (trajectory mode) by the calls whose prompt continues it."""

    __slots__ = ("first", "prompt", "tokens", "response", "mask", "logprobs", "calls", "versions")

    def __init__(self, t: CallTokens) -> None:
        self.first = t.index
        self.prompt = list(t.prompt)
        self.response = list(t.completion)
        self.mask = [1] * len(self.response)
        self.logprobs: list[float | None] = list(t.logprobs)
        self.tokens = self.prompt + self.response  # the whole sequence so far: the last call's prompt + completion
        self.calls = [t.call_id]
        self.versions = [t.version]

    def continued_by(self, prompt: Sequence[int], work: dict[str, int] | None = None) -> bool:
        """Whether ``prompt`` starts with this sample's whole sequence (``work`` counts the full comparisons and
        the tokens they compare)."""
        n = len(self.tokens)
        if len(prompt) < n or prompt[n - 1] != self.tokens[-1]:
            return False
        if work is not None:
            work["compared"] = work.get("compared", 0) + 1
            work["compared_tokens"] = work.get("compared_tokens", 0) + n
        return prompt[:n] == self.tokens

    def extend(self, t: CallTokens) -> None:
        """Append call ``t``, whose prompt continues this sample: what its prompt adds (mask 0), its completion."""
        extra = t.prompt[len(self.tokens) :]
        completion = t.completion
        # In place: the sequence only ever grows (the prompt starts with it), so nothing is copied whole.
        self.response += extra
        self.response += completion
        self.mask += [0] * len(extra)
        self.mask += [1] * len(completion)
        self.logprobs += [0.0] * len(extra)
        self.logprobs += t.logprobs
        self.tokens += extra
        self.tokens += completion
        self.calls.append(t.call_id)
        self.versions.append(t.version)

    def sample(self, weight: float) -> Sample:
        return Sample(
            prompt_ids=self.prompt,
            response_ids=self.response,
            response_mask=self.mask,
            old_logprobs=self.logprobs,
            advantage=0.0,
            weight=weight,
        )


def _by_structure(
    t: CallTokens, ends: dict[str, Chain], chains: list[Chain], work: dict[str, int] | None
) -> Chain | None:
    """The chain ``t`` continues by how it is stored, when that is the chain the comparison would pick: its base
    ended the chain, its prompt starts with all of the chain's sequence, and no other chain at least as long
    (equally long and later: ties go to the later one) is continued by the prompt. None: compare instead."""
    chain = ends.get(t.base) if t.base is not None else None
    if chain is None or t.prefix_len != len(chain.tokens) or len(t.prompt) < t.prefix_len:
        return None
    n, later = len(chain.tokens), False
    for other in chains:
        if other is chain:
            later = True
        elif (len(other.tokens) > n or (later and len(other.tokens) == n)) and other.continued_by(t.prompt, work):
            return None
    return chain


def chain_calls(
    calls: Sequence[CallTokens], mode: str, counters: dict[str, int], work: dict[str, int] | None = None
) -> list[Chain]:
    """One chain per call (transition mode), or calls merged into the longest chain their prompt continues
    (trajectory mode; later wins ties), counting ``merged`` and ``chain_breaks`` in ``counters``. A call with
    its stored structure (``CallTokens.base``, ``prefix_len``) continues the chain its base ended without being
    compared (see the module docstring). ``work``, when given, counts what merging did: ``by_structure`` and
    ``by_comparison`` calls, full prefix comparisons (``compared``), the tokens they compared
    (``compared_tokens``) and the tokens appended to chains (``appended_tokens``)."""
    if mode == "transition":
        return [Chain(t) for t in calls]
    chains: list[Chain] = []
    ends: dict[str, Chain] = {}  # each chain by the id of its last call
    for t in calls:
        best = _by_structure(t, ends, chains, work)
        how = "by_structure"
        if best is None:
            how = "by_comparison"
            for chain in chains:
                if chain.continued_by(t.prompt, work) and (best is None or len(chain.tokens) >= len(best.tokens)):
                    best = chain
        if best is not None:
            if work is not None:
                work[how] = work.get(how, 0) + 1
                work["appended_tokens"] = (
                    work.get("appended_tokens", 0) + len(t.prompt) - len(best.tokens) + len(t.completion)
                )
            ends.pop(best.calls[-1], None)
            best.extend(t)
            counters["merged"] = counters.get("merged", 0) + 1
        else:
            if chains:
                counters["chain_breaks"] = counters.get("chain_breaks", 0) + 1
            best = Chain(t)
            chains.append(best)
        if t.recorded:
            ends[t.call_id] = best
    return chains


def build_samples(
    sessions: Sequence[ClaimedSession],
    *,
    mode: Literal["transition", "trajectory"] = "transition",
    gamma: float = 1.0,
    default_reward: float = 0.0,
    group_by_task: bool = True,
    current_version: int = 0,
    max_staleness: int | None = None,
    temperature: float = 1.0,
) -> BuildResult:
    """Samples (advantage 0.0, weight 1/n per episode), their scores and group ids; ``temperature`` is the one
    the trainer computes log-probs at (``--temperature``). See the module docstring."""
    if mode not in ("transition", "trajectory"):
        raise ValueError(f"mode must be 'transition' or 'trajectory', got {mode!r}")
    out = BuildResult()
    counters = dict.fromkeys(
        (
            "sessions",
            "calls",
            "samples",
            "skipped_stale",
            "skipped_no_tokens",
            "skipped_bad_logprobs",
            "skipped_untrainable",
            "skipped_sampling",
            "skipped_empty",
            "merged",
            "chain_breaks",
        ),
        0,
    )
    staleness: list[int] = []
    oldest_fresh = current_version - max_staleness if max_staleness is not None and max_staleness >= 0 else None

    for sess in sessions:
        counters["sessions"] += 1
        counters["calls"] += len(sess.calls)
        returns = call_returns(
            [c.reward for c in sess.calls], sess.final_reward, gamma=gamma, default_reward=default_reward
        )
        usable: list[tuple[int, ClaimedCall]] = []
        for i, call in enumerate(sess.calls):
            why = usable_call(call, temperature)
            if why:
                counters[why] += 1
                detail = (
                    call.untrainable_reason
                    if why == "skipped_untrainable"
                    else sampling_mismatch(call.sampling, temperature)
                    if why == "skipped_sampling"
                    else None
                )
                if detail:
                    out.skip_reasons[detail] = out.skip_reasons.get(detail, 0) + 1
            else:
                usable.append((i, call))
        if not usable:
            counters["skipped_empty"] += 1
            out.skipped_sessions.append(sess.id)
            continue
        versions = [c.policy_version or 0 for _, c in usable]
        if oldest_fresh is not None and min(versions) < oldest_fresh:
            counters["skipped_stale"] += 1
            out.skipped_sessions.append(sess.id)
            continue

        tokens = [_tokens(i, c) for i, c in usable]
        chains = chain_calls(tokens, mode, counters)

        weight = 1.0 / len(chains)
        group = (
            "batch"
            if not group_by_task
            else f"task:{sess.task_id}"
            if sess.task_id is not None
            else f"session:{sess.id}"
        )
        for chain in chains:
            out.samples.append(chain.sample(weight))
            out.scores.append(returns[chain.first])
            out.group_ids.append(group)
            out.session_ids.append(sess.id)
            out.call_ids.append(tuple(chain.calls))
            out.versions.append(tuple(chain.versions))
        staleness.extend(current_version - v for v in versions)
        age = current_version - min(versions)
        out.staleness_hist[age] = out.staleness_hist.get(age, 0) + 1

    counters["samples"] = len(out.samples)
    out.counters = counters
    if staleness:
        out.staleness_mean = sum(staleness) / len(staleness)
        out.staleness_max = max(staleness)
    return out

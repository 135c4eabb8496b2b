"""Supervised fine-tuning samples from recorded sessions (``trainwire train --objective sft``).

What is trained on
------------------
The completions of the selected calls of each claimed session, as the policy would have generated them:

* the **policy's own calls** (trainable calls, loaded as for RL): their recorded prompt and completion token ids.
  Calls that failed, have no token ids, or that the proxy marked untrainable (``untrainable_reason``: token ids
  that disagree with the upstream's usage, a sampling setting the proxy could not enforce) are skipped; the
  sampling settings themselves do not matter here (there is no importance ratio in the SFT loss);
* the **calls of the frozen routes named with** ``--sft-from MODEL`` (a teacher agent that ran through the proxy,
  served by another model): they have no token ids of the policy's, so their recorded request and answer are
  rendered with the policy's tokenizer and chat template, tools included (:mod:`trainwire.rl.retokenize`). Calls
  that failed, cannot be rendered or carry an ``untrainable_reason`` are skipped, counted by reason: the proxy
  says ``evaluation call (X-Trainwire-Train: false)`` there on every route, so a teacher's evaluation calls are
  never fine-tuned on (``trainable`` is false for every frozen call and cannot tell them apart).

``min_reward`` keeps only the sessions whose final reward is at least that (rejection-sampling fine-tuning); a
session closed without a reward has none and is dropped too. Dropped sessions are reported in
``skipped_sessions`` (the trainer marks them skipped, with the reason).

Masks
-----
Only completion tokens are trained. In ``transition`` mode each call is one sample: prompt (mask 0, it is the
sample's prompt) and completion (mask 1). In ``trajectory`` mode a call whose prompt continues an earlier sample's
prompt + completion extends it (:func:`trainwire.rl.transitions.chain_calls`): what lies between (tool results, the
template's end-of-turn and role markers, the next user turn) has mask 0, the new completion mask 1. A completion
ends with the end-of-turn token the model generates (trained: it is how the model learns to stop), never with the
template's markers after it.

verl's SFT loss (``verl.workers.utils.losses.sft_loss``) is the mean negative log-likelihood over all mask-1 tokens
of a mini-batch, so every trained token counts the same and ``Sample.weight`` is 1. Behaviour log-probs are the
recorded ones where there are some, else 0.0; the SFT loss does not read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from trainwire.rl.transitions import BuildResult, CallTokens, chain_calls
from trainwire.store.episodes import ClaimedCall, ClaimedSession

if TYPE_CHECKING:
    from trainwire.rl.retokenize import ChatRenderer

__all__ = ["build_sft_samples", "own_call_problem"]


def own_call_problem(call: ClaimedCall) -> str | None:
    """Why one of the policy's own calls cannot be trained on by SFT (a counter name), or None."""
    if call.untrainable_reason:
        return "skipped_untrainable"
    if call.status_code != 200 or not call.prompt_token_ids or not call.completion_token_ids:
        return "skipped_no_tokens"
    return None


def build_sft_samples(
    sessions: Sequence[ClaimedSession],
    *,
    renderer: ChatRenderer | None = None,
    sft_from: Sequence[str] = (),
    min_reward: float | None = None,
    mode: Literal["transition", "trajectory"] = "transition",
) -> BuildResult:
    """SFT samples of ``sessions`` (see the module docstring). ``renderer`` is needed when ``sft_from`` names a
    frozen route. ``scores`` holds each sample's session final reward (0.0 when none); ``group_ids`` are the
    sessions."""
    if mode not in ("transition", "trajectory"):
        raise ValueError(f"mode must be 'transition' or 'trajectory', got {mode!r}")
    if sft_from and renderer is None:
        raise ValueError("sft_from needs a renderer (the policy's tokenizer and chat template)")
    from_routes = set(sft_from)
    out = BuildResult()
    counters = dict.fromkeys(
        (
            "sessions",
            "calls",
            "samples",
            "own_calls",
            "teacher_calls",
            "skipped_reward",
            "skipped_no_tokens",
            "skipped_untrainable",
            "skipped_failed",
            "skipped_render",
            "skipped_empty",
            "merged",
            "chain_breaks",
        ),
        0,
    )
    for sess in sessions:
        counters["sessions"] += 1
        counters["calls"] += len(sess.calls)
        if min_reward is not None and (sess.final_reward is None or sess.final_reward < min_reward):
            counters["skipped_reward"] += 1
            out.skipped_sessions.append(sess.id)
            continue
        tokens: list[CallTokens] = []
        for i, call in enumerate(sess.calls):
            if call.route == "frozen":
                if call.model_requested not in from_routes:
                    continue  # not selected (the claim loads only selected ones)
                picked = _teacher_tokens(call, i, renderer, counters, out.skip_reasons)
            else:
                why = own_call_problem(call)
                if why:
                    counters[why] += 1
                    if why == "skipped_untrainable" and call.untrainable_reason:
                        out.skip_reasons[call.untrainable_reason] = out.skip_reasons.get(call.untrainable_reason, 0) + 1
                    continue
                assert call.prompt_token_ids is not None and call.completion_token_ids is not None
                completion = list(call.completion_token_ids)
                logprobs = (
                    [float(x) for x in call.logprobs]
                    if call.logprobs and len(call.logprobs) == len(completion)
                    else [0.0] * len(completion)
                )
                picked = CallTokens(
                    i,
                    call.id,
                    call.policy_version or 0,
                    call.prompt_token_ids,
                    completion,
                    logprobs,
                    base=call.base_call_id,
                    prefix_len=call.prompt_prefix_len,
                )
                counters["own_calls"] += 1
            if picked is not None:
                tokens.append(picked)
        if not tokens:
            counters["skipped_empty"] += 1
            out.skipped_sessions.append(sess.id)
            continue
        for chain in chain_calls(tokens, mode, counters):
            out.samples.append(chain.sample(1.0))
            out.scores.append(sess.final_reward if sess.final_reward is not None else 0.0)
            out.group_ids.append(f"session:{sess.id}")
            out.session_ids.append(sess.id)
            out.call_ids.append(tuple(chain.calls))
            out.versions.append(tuple(chain.versions))
    counters["samples"] = len(out.samples)
    out.counters = counters
    return out


def _teacher_tokens(
    call: ClaimedCall, index: int, renderer: ChatRenderer | None, counters: dict[str, int], reasons: dict[str, int]
) -> CallTokens | None:
    from trainwire.rl.retokenize import RenderError

    if call.status_code != 200 or call.aborted:
        counters["skipped_failed"] += 1
        return None
    if call.untrainable_reason:  # an evaluation call (X-Trainwire-Train: false)
        counters["skipped_untrainable"] += 1
        reasons[call.untrainable_reason] = reasons.get(call.untrainable_reason, 0) + 1
        return None
    assert renderer is not None
    try:
        if call.kind != "chat":
            raise RenderError(f"a {call.kind} call (only chat calls are rendered)")
        prompt, completion = renderer.call_tokens(call.request, call.response)
    except RenderError as exc:
        counters["skipped_render"] += 1
        why = f"cannot render call of {call.model_requested}: {exc}"
        reasons[why] = reasons.get(why, 0) + 1
        return None
    counters["teacher_calls"] += 1
    return CallTokens(
        index, call.id, call.policy_version or 0, prompt, completion, [0.0] * len(completion), recorded=False
    )

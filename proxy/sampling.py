"""Sampling integrity: the tokens of a trainable call must come from the distribution the trainer recomputes.

The trainer computes each sample's log-probs at one temperature (`--temperature`) with nothing else changing the
distribution. A call sampled at another temperature, with top-p/top-k/min-p truncation, penalties, a logit bias,
a grammar (structured output, a forced tool choice), or greedily, has behaviour log-probs from another
distribution: its PPO ratio would be wrong, silently. So on every trainable policy call the proxy

- fills every sampling setting the client left out with the training value, explicitly, so a model's own
  `generation_config.json` defaults (vLLM applies them to omitted fields) never change the distribution;
- then applies the operator's `--sampling-policy` to settings the client set to something else:
  `enforce` (default) replaces them with the training values; `reject` answers 400 naming the setting; `record`
  sends them as asked and marks the call as not trainable, with the reason;
- records what the client asked and what was sent (`calls.sampling`).

What no policy can replace without changing the answer's meaning (a grammar, a forced tool, beam search) is sent as
asked and marks the call not trainable. Evaluation calls (`X-Trainwire-Train: false`) are never touched.

A function tool marked ``strict: true`` is a grammar too: vLLM (0.32, ``--tool-strict-level auto``) decodes its
arguments under the tool's JSON schema, even with ``tool_choice: auto``, and its processed log-probs are then those of
the masked distribution. The OpenAI Agents SDK marks every tool strict. Measured on SmolLM2-135M after SFT: a mean
|delta log p| of 1e-3 (max 1.4e-2) between vLLM and the trainer, against 7e-6 without. ``enforce`` sends such tools
without ``strict`` (the call stays trainable; a malformed call is the agent's to handle, and the reward's to
punish), ``reject`` answers 400, ``record`` sends them as asked and marks the call not trainable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainwire.call_shapes.chat import has_strict_tools, without_strict
from trainwire.proxy.errors import ApiError

POLICIES = ("enforce", "reject", "record")
_EPS = 1e-6


def neutral(temperature: float) -> dict[str, float | int]:
    """The settings under which vLLM samples from exactly softmax(logits / temperature)."""
    return {
        "temperature": temperature,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
    }


def _same(key: str, asked: Any, value: float | int) -> bool:
    if key == "top_k" and asked in (-1, 0):
        return True  # both mean "off" to vLLM
    try:
        return abs(float(asked) - float(value)) <= _EPS
    except (TypeError, ValueError):
        return False


def _constraint(body: dict[str, Any]) -> str | None:
    """A request setting that reshapes the distribution and cannot be replaced without changing the answer."""
    if body.get("logit_bias"):
        return "logit_bias"
    for key in ("allowed_token_ids", "bad_words"):
        if body.get(key):
            return key
    if isinstance(body.get("min_tokens"), int) and body["min_tokens"] > 0:
        return "min_tokens"
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema", "structural_tag", "grammar"):
        return f"response_format {fmt['type']}"
    for key in ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if body.get(key):
            return key
    choice = body.get("tool_choice")
    if choice == "required" or isinstance(choice, dict):
        return "tool_choice (a forced tool call is decoded under a grammar)"
    if body.get("use_beam_search"):
        return "use_beam_search"
    best_of = body.get("best_of")
    if isinstance(best_of, int) and best_of > 1:
        return "best_of"
    return None


@dataclass(slots=True)
class Outcome:
    """What the proxy did with a call's sampling settings."""

    requested: dict[str, Any]  # the settings the client sent (only those it set)
    effective: dict[str, Any]  # what went upstream, every setting explicit
    changed: list[str]  # settings enforce replaced
    untrainable: str | None  # why this call's tokens must not be trained on, or None

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"requested": self.requested, "effective": self.effective}
        if self.changed:
            out["enforced"] = self.changed
        return out


_CONSTRAINT_KEYS = frozenset(
    {
        "logit_bias",
        "allowed_token_ids",
        "bad_words",
        "min_tokens",
        "response_format",
        "structured_outputs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "tool_choice",
        "use_beam_search",
        "best_of",
    }
)
_NEUTRAL: dict[float, dict[str, float | int]] = {}
_STRICT = "tools.strict"


def apply(body: dict[str, Any], *, policy: str, temperature: float) -> Outcome:
    """Apply `policy` to the upstream request `body` of a trainable policy call, in place."""
    train = _NEUTRAL.get(temperature)
    if train is None:
        train = _NEUTRAL[temperature] = neutral(temperature)
    strict = has_strict_tools(body.get("tools"))
    if train.keys().isdisjoint(body) and _CONSTRAINT_KEYS.isdisjoint(body) and not strict:
        # Most agents set none of it: the training values go in as they are (the record shares the dict, which
        # nothing mutates).
        body.update(train)
        return Outcome({}, train, [], None)
    requested = {k: body[k] for k in train if body.get(k) is not None}
    changed: list[str] = []
    untrainable = None
    for key, value in train.items():
        asked = body.get(key)
        if asked is None or _same(key, asked, value):
            body[key] = value
            continue
        if policy == "reject":
            raise ApiError(400, _reject_message(key, asked, value), param=key, code="sampling_not_trainable")
        if policy == "enforce":
            body[key] = value
            changed.append(key)
        elif untrainable is None:
            untrainable = _why(key, asked, value)
    if strict:
        if policy == "reject":
            raise ApiError(
                400,
                "a tool with strict: true is decoded under its JSON schema (a grammar), so the tokens of this call "
                "could not be trained on (--sampling-policy reject); leave strict out, or send the call with "
                "X-Trainwire-Train: false",
                param="tools",
                code="sampling_not_trainable",
            )
        if policy == "enforce":
            body["tools"] = without_strict(body["tools"])
            changed.append(_STRICT)
        elif untrainable is None:
            untrainable = "sampling: a strict tool's arguments are decoded under a grammar"
    constraint = _constraint(body)
    if constraint is not None:
        if policy == "reject":
            raise ApiError(
                400,
                f"{constraint} changes the sampling distribution, so the tokens of this call could "
                f"not be trained on (--sampling-policy reject); leave it out, or send the call "
                f"with X-Trainwire-Train: false",
                param=constraint.split()[0],
                code="sampling_not_trainable",
            )
        untrainable = untrainable or f"sampling: {constraint} changes the distribution the trainer recomputes"
    effective = {k: body[k] for k in train}
    return Outcome(requested, effective, changed, untrainable)


def _why(key: str, asked: Any, value: Any) -> str:
    if key == "temperature" and _is_zero(asked):
        return "sampling: greedy decoding (temperature 0) has no sampling log-probs to train on"
    return f"sampling: {key} {asked!r} differs from the training value {value!r}"


def _reject_message(key: str, asked: Any, value: Any) -> str:
    what = "greedy decoding (temperature 0)" if key == "temperature" and _is_zero(asked) else f"{key} {asked!r}"
    return (
        f"{what} differs from the training setting {key}={value!r}, so the tokens of this call could not be "
        f"trained on (--sampling-policy reject); send {key}={value!r} or leave it out, or send the call with "
        f"X-Trainwire-Train: false"
    )


def _is_zero(value: Any) -> bool:
    try:
        return float(value) < _EPS
    except (TypeError, ValueError):
        return False

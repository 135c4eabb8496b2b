"""Ask the upstream for what training needs, and hide from the client what it did not ask for.

The proxy adds `return_token_ids`, `logprobs` and (on streams) `stream_options.include_usage` to requests,
then removes exactly those additions from responses, so the client sees what vLLM would have sent it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Injected:
    token_ids: bool = False
    logprobs: bool = False
    usage: bool = False

    @property
    def any(self) -> bool:
        return self.token_ids or self.logprobs or self.usage


def prepare(kind: str, body: dict[str, Any]) -> Injected:
    """Mutate the request body for the upstream; return what was added."""
    inj = Injected()
    if kind not in ("chat", "completion"):
        return inj
    if not body.get("return_token_ids"):
        body["return_token_ids"] = True
        inj.token_ids = True
    if kind == "chat":
        if not body.get("logprobs"):
            body["logprobs"] = True
            inj.logprobs = True
    elif body.get("logprobs") is None:
        body["logprobs"] = 0  # the sampled token's logprob, no alternatives
        inj.logprobs = True
    if body.get("stream"):
        opts = body.get("stream_options")
        if not isinstance(opts, dict) or not opts.get("include_usage"):
            body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
            inj.usage = True
    return inj


def strip(obj: dict[str, Any], inj: Injected) -> bool:
    """Remove injected fields from a response body or stream chunk in place.
    Returns False when the whole chunk existed only because of an injection (the usage-only chunk)."""
    if inj.token_ids:
        obj.pop("prompt_token_ids", None)
    choices = obj.get("choices")
    if inj.usage and "usage" in obj:
        if not choices:
            return False
        del obj["usage"]
    if choices:
        for choice in choices:
            if inj.token_ids:
                choice.pop("token_ids", None)
                choice.pop("prompt_token_ids", None)
            if inj.logprobs and "logprobs" in choice:
                choice["logprobs"] = None
    return True

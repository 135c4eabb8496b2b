"""Turn upstream responses into what is recorded: the assembled body and the training data in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(slots=True)
class Tokens:
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    finish_reason: str | None = None


def _sampled_logprobs(logprobs: Any) -> list[float] | None:
    if not isinstance(logprobs, dict):
        return None
    if isinstance(logprobs.get("content"), list):  # chat
        return [entry.get("logprob") for entry in logprobs["content"]]
    if isinstance(logprobs.get("token_logprobs"), list):  # completions
        return list(logprobs["token_logprobs"])
    return None


def tokens_of(body: dict[str, Any] | None) -> Tokens:
    """Training data from a complete (non-stream or assembled) response. With n>1 only choice 0 counts."""
    if not isinstance(body, dict):
        return Tokens()
    choices = body.get("choices") or [{}]
    first = choices[0] if isinstance(choices[0], dict) else {}
    return Tokens(
        prompt_token_ids=body.get("prompt_token_ids") or first.get("prompt_token_ids"),
        completion_token_ids=first.get("token_ids"),
        logprobs=_sampled_logprobs(first.get("logprobs")),
        finish_reason=first.get("finish_reason"),
    )


@dataclass
class _Choice:
    index: int
    role: str | None = None
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    logprob_entries: list[Any] = field(default_factory=list)  # chat: logprobs.content entries
    completion_logprobs: dict[str, list[Any]] = field(default_factory=dict)  # completions: its parallel lists
    finish_reason: str | None = None
    stop_reason: Any = None


class StreamAssembler:
    """Parses SSE events (a copy of what is forwarded) into one response shaped like the non-stream one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.choices: dict[int, _Choice] = {}
        self.meta: dict[str, Any] = {}
        self.prompt_token_ids: list[int] | None = None
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.done = False
        self.events = 0

    def feed(self, chunk: dict[str, Any]) -> None:
        self.events += 1
        if "error" in chunk and "choices" not in chunk:
            self.error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            return
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in chunk and key not in self.meta:
                self.meta[key] = chunk[key]
        if chunk.get("prompt_token_ids") is not None:
            self.prompt_token_ids = chunk["prompt_token_ids"]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for ch in chunk.get("choices") or ():
            c = self.choices.setdefault(ch.get("index", 0), _Choice(ch.get("index", 0)))
            if ch.get("prompt_token_ids") is not None and c.prompt_token_ids is None:
                c.prompt_token_ids = ch["prompt_token_ids"]
            if ch.get("token_ids"):
                c.token_ids.extend(ch["token_ids"])
            lp = ch.get("logprobs")
            if isinstance(lp, dict):
                if isinstance(lp.get("content"), list):
                    c.logprob_entries.extend(lp["content"])
                elif isinstance(lp.get("token_logprobs"), list):
                    # Completions logprobs are parallel lists; a stream sends each chunk's slice of them.
                    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                        if isinstance(lp.get(key), list):
                            c.completion_logprobs.setdefault(key, []).extend(lp[key])
            if ch.get("finish_reason") is not None:
                c.finish_reason = ch["finish_reason"]
            if ch.get("stop_reason") is not None:
                c.stop_reason = ch["stop_reason"]
            if self.kind == "completion":
                if ch.get("text"):
                    c.content.append(ch["text"])
                continue
            delta = ch.get("delta") or {}
            if delta.get("role"):
                c.role = delta["role"]
            if delta.get("content"):
                c.content.append(delta["content"])
            for key in ("reasoning_content", "reasoning"):
                if delta.get(key):
                    c.reasoning.append(delta[key])
            for tc in delta.get("tool_calls") or ():
                slot = c.tool_calls.setdefault(
                    tc.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
                )
                if tc.get("id"):
                    slot["id"] = tc["id"]
                if tc.get("type"):
                    slot["type"] = tc["type"]
                fn = tc.get("function") or {}
                if fn.get("name"):
                    slot["function"]["name"] += fn["name"]
                if fn.get("arguments"):
                    slot["function"]["arguments"] += fn["arguments"]

    def finished(self) -> bool:
        """Every choice has its finish_reason: the answer is whole, whatever follows (usage, [DONE])."""
        return bool(self.choices) and all(c.finish_reason is not None for c in self.choices.values())

    def feed_event(self, data: bytes) -> None:
        """One SSE `data:` payload; `[DONE]` ends the stream."""
        if data.strip() == b"[DONE]":
            self.done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(chunk, dict):
            self.feed(chunk)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.meta, "object": "chat.completion" if self.kind == "chat" else "text_completion"}
        choices = []
        for idx in sorted(self.choices):
            c = self.choices[idx]
            entry: dict[str, Any] = {"index": idx}
            if self.kind == "chat":
                msg: dict[str, Any] = {"role": c.role or "assistant", "content": "".join(c.content) or None}
                if c.reasoning:
                    msg["reasoning_content"] = "".join(c.reasoning)
                if c.tool_calls:
                    msg["tool_calls"] = [c.tool_calls[i] for i in sorted(c.tool_calls)]
                entry["message"] = msg
                entry["logprobs"] = {"content": c.logprob_entries} if c.logprob_entries else None
            else:
                entry["text"] = "".join(c.content)
                entry["logprobs"] = c.completion_logprobs or None
            entry["finish_reason"] = c.finish_reason
            if c.stop_reason is not None:
                entry["stop_reason"] = c.stop_reason
            entry["token_ids"] = c.token_ids or None
            if c.prompt_token_ids is not None:
                entry["prompt_token_ids"] = c.prompt_token_ids
            choices.append(entry)
        out["choices"] = choices
        if self.usage is not None:
            out["usage"] = self.usage
        if self.prompt_token_ids is not None:
            out["prompt_token_ids"] = self.prompt_token_ids
        if self.error is not None:
            out["error"] = self.error
        return out

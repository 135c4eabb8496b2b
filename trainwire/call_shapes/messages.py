"""Anthropic's Messages API (`/v1/messages`), which the proxy translates to chat (proxy/api_messages.py, litellm's
adapter): its messages and content blocks read the way the translation sends them to vLLM."""

from __future__ import annotations

from typing import Any

from trainwire.call_shapes.base import (
    CallShape,
    Messages,
    answer_dict,
    as_list,
    chat_export,
    last_user_or_tool,
    message_text,
    role,
    tool_input_text,
)


def messages(request: dict[str, Any]) -> Messages:
    """Anthropic Messages input as chat messages: `system` first; an assistant turn's text blocks are its
    content and its tool_use blocks its tool calls (arguments as JSON text); each tool_result block is a tool
    message, in the order of the blocks; thinking blocks are left out."""
    out: list[dict[str, Any]] = []
    system = request.get("system")
    if system:
        out.append({"role": "system", "content": message_text(system)})
    for m in as_list(request.get("messages")):
        if not isinstance(m, dict):
            continue
        who, content = role(m.get("role")), m.get("content")
        if not isinstance(content, list):
            out.append({"role": who, "content": message_text(content)})
            continue
        turn: list[dict[str, Any]] = []  # this message's text and tool calls, then its tool results
        blocks: list[Any] = []
        calls: list[dict[str, Any]] = []
        for b in content + [None]:  # None: the end, where the last text and tool calls are emitted
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "tool_use":
                calls.append({"id": b.get("id"), "name": b.get("name"), "arguments": tool_input_text(b.get("input"))})
                continue
            if kind in ("thinking", "redacted_thinking"):
                continue
            if kind != "tool_result" and b is not None:
                blocks.append(b)
                continue
            if blocks or calls:
                msg: dict[str, Any] = {"role": who, "content": message_text(blocks) if blocks else None}
                if calls:
                    msg["tool_calls"] = calls
                turn.append(msg)
                blocks, calls = [], []
            if b is not None:
                turn.append(
                    {"role": "tool", "content": message_text(b.get("content")), "tool_call_id": b.get("tool_use_id")}
                )
        out.extend(turn or [{"role": who, "content": ""}])
    return out


def answer(response: dict[str, Any]) -> dict[str, Any] | None:
    content: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for b in as_list(response.get("content")):
        if not isinstance(b, dict):
            continue
        kind = b.get("type")
        if kind == "text" and isinstance(b.get("text"), str):
            content.append(b["text"])
        elif kind == "tool_use":
            calls.append({"id": b.get("id"), "name": b.get("name"), "arguments": tool_input_text(b.get("input"))})
        elif kind == "thinking" and isinstance(b.get("thinking"), str):
            reasoning.append(b["thinking"])
    return answer_dict(content, reasoning, calls)


SHAPE = CallShape(
    kind="messages",
    api="messages",
    list_key="messages",
    messages=messages,
    last_input=last_user_or_tool(messages),
    answer=answer,
    export=chat_export(messages),
)

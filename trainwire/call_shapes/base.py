"""What every call shape is made of, and the pure readers of recorded JSON that several shapes share.

Every reader is a pure function of the JSON a call recorded and never raises, whatever the JSON holds: a failed
call records whatever the client sent."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

Messages = list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class ExportInput:
    """A call's input as `trainwire export` writes it: chat messages and tools in OpenAI's chat format (the
    format SFT tools read), or a completion's prompt."""

    messages: Any = None
    tools: Any = None
    prompt: str | None = None


@dataclass(frozen=True, slots=True)
class CallShape:
    """How to read one kind of call (`calls.kind`) wherever it is read: the call deltas, the read API, export and
    the automatic rewards. Every field is a pure function of the recorded request or response (a dict; callers
    pass anything else as `{}`)."""

    kind: str  # calls.kind, as the proxy records it
    api: str  # the name the read API gives it (`api` of a call, `calls.by_api` of /stats)
    # The request key holding the conversation: a call is stored as what it adds to an earlier call of its
    # session on this list (store/call_deltas.py); None: the request is stored whole.
    list_key: str | None
    # The whole input as chat-like messages `{role, content, tool_calls?, tool_call_id?}`: the system prompt
    # (instructions) first, then every message, tool call ({id, name, arguments}) and tool result, in order.
    messages: Callable[[dict[str, Any]], Messages]
    # The input this turn answered: the last user or tool message `{role, content, tool_call_id?}`, or a prompt.
    last_input: Callable[[dict[str, Any]], dict[str, Any] | None]
    # The assistant's answer: `{content, reasoning_content?, tool_calls?}` (tool calls as {id, name, arguments}).
    answer: Callable[[dict[str, Any]], dict[str, Any] | None]
    # How `trainwire export` writes the input; None: calls of this kind are not exported.
    export: Callable[[dict[str, Any]], ExportInput] | None


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def role(value: Any) -> str:
    return value if isinstance(value, str) else "unknown"


def json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # an integer beyond 64 bits, which Python's json reads back from JSON
        return str(value)


def tool_input_text(value: Any) -> str:
    # An Anthropic tool_use block's input as the chat arguments the model was shown: the translation to chat
    # (litellm's adapter) writes json.dumps(input), separators and escapes included.
    try:
        return json.dumps({} if value is None else value)
    except (TypeError, ValueError):
        return json_text(value)


def content_text(content: Any) -> str | None:
    """A message's content as text (string content, or the text parts of a content list)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p, str):
                parts.append(p)
        return "".join(parts)
    return json_text(content)


def message_text(content: Any) -> str | None:
    """Content of any API's message as text, for showing the whole input: string content; text (and refusal)
    parts joined; every other part (an image, a file, audio) as a `[type]` placeholder, so that nothing the
    model was shown goes missing without a trace."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        return json_text(content)
    parts = []
    for p in content:
        if isinstance(p, str):
            parts.append(p)
        elif isinstance(p, dict):
            for key in ("text", "refusal"):
                if isinstance(p.get(key), str):
                    parts.append(p[key])
                    break
            else:
                kind = p.get("type")
                parts.append(f"[{kind if isinstance(kind, str) else 'part'}]")
    return "".join(parts)


def tool_names(request: Any) -> list[str]:
    """Names of the tools a request offered, in order, for every API's shape: chat's
    `{"type": "function", "function": {"name"}}` (and legacy `functions`), Responses' `{"type": "function",
    "name"}`, Anthropic's `{"name", "input_schema"}`; a tool with no name (a hosted tool) by its type."""
    if not isinstance(request, dict):
        return []
    names = []
    for t in as_list(request.get("tools")):
        if not isinstance(t, dict):
            continue
        fn = t.get("function")
        name = fn.get("name") if isinstance(fn, dict) else t.get("name")
        if not isinstance(name, str):
            name = t.get("type")
        if isinstance(name, str):
            names.append(name)
    for f in as_list(request.get("functions")):
        if isinstance(f, dict) and isinstance(f.get("name"), str):
            names.append(f["name"])
    return names


def answer_dict(content: list[str], reasoning: list[str], calls: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"content": "".join(content) if content else None}
    if reasoning:
        out["reasoning_content"] = "".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return out


def last_user_or_tool(messages: Callable[[dict[str, Any]], Messages]) -> Callable[[dict[str, Any]], dict | None]:
    """`last_input` of a shape whose input is read as chat-like messages: the last user or tool message."""

    def last_input(request: dict[str, Any]) -> dict[str, Any] | None:
        for m in reversed(messages(request)):
            if m["role"] in ("user", "tool"):
                out = {"role": m["role"], "content": m["content"]}
                if m.get("tool_call_id"):
                    out["tool_call_id"] = m["tool_call_id"]
                return out
        return None

    return last_input


def chat_export(messages: Callable[[dict[str, Any]], Messages]) -> Callable[[dict[str, Any]], ExportInput]:
    """`export` of a translated API (Responses, Messages): its input read as chat-like messages, written in
    OpenAI's chat format (tool calls as `{id, type: function, function: {name, arguments}}`), and its function
    tools as chat tools; a tool that is not a function (a hosted tool) is written as it was sent."""

    def export(request: dict[str, Any]) -> ExportInput:
        out = []
        for m in messages(request):
            msg = dict(m)
            if "tool_calls" in m:
                msg["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in m["tool_calls"]
                ]
            out.append(msg)
        tools = request.get("tools")
        return ExportInput(messages=out, tools=[chat_tool(t) for t in tools] if isinstance(tools, list) else None)

    return export


def chat_tool(tool: Any) -> Any:
    """A Responses function tool (`{"type": "function", "name", "parameters"}`) or an Anthropic tool (`{"name",
    "input_schema"}`) as a chat tool; anything else as it is."""
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        return tool
    if tool.get("type", "function") != "function" and "input_schema" not in tool:
        return tool
    fn: dict[str, Any] = {"name": tool["name"]}
    if "description" in tool:
        fn["description"] = tool["description"]
    parameters = tool.get("parameters", tool.get("input_schema"))
    if parameters is not None:
        fn["parameters"] = parameters
    if "strict" in tool:
        fn["strict"] = tool["strict"]
    return {"type": "function", "function": fn}

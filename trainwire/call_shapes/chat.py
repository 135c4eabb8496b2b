"""Chat completions (`/v1/chat/completions`), as the client sent them and vLLM answered them."""

from __future__ import annotations

from typing import Any

from trainwire.call_shapes.base import (
    CallShape,
    ExportInput,
    Messages,
    as_dict,
    as_list,
    content_text,
    message_text,
    role,
)


def tool_call(tc: Any) -> dict[str, Any]:
    fn = as_dict(as_dict(tc).get("function"))
    return {"id": as_dict(tc).get("id"), "name": fn.get("name"), "arguments": fn.get("arguments")}


def has_strict_tools(tools: Any) -> bool:
    """Whether a chat request's tools mark any function ``strict`` (its arguments decoded under a grammar)."""
    return isinstance(tools, list) and any(as_dict(as_dict(t).get("function")).get("strict") for t in tools)


def without_strict(tools: Any) -> Any:
    """The tools as a trainable policy call is served them: ``strict`` left out (proxy/sampling.py says why), as new
    dicts. The trainer renders a recorded request's tools the same way (rl/retokenize.py), so a prompt it builds for
    SFT is the one vLLM is sent, whatever the template does with ``strict``."""
    if not isinstance(tools, list):
        return tools
    out = []
    for tool in tools:
        fn = as_dict(tool).get("function")
        if isinstance(fn, dict) and "strict" in fn:
            tool = {**tool, "function": {k: v for k, v in fn.items() if k != "strict"}}
        out.append(tool)
    return out


def answer_message(response: Any) -> dict[str, Any]:
    """The assistant message of choice 0 of a chat response ({} when there is none)."""
    if not isinstance(response, dict):
        return {}
    choices = response.get("choices") or []
    first = choices[0] if choices and isinstance(choices[0], dict) else {}
    msg = first.get("message")
    return msg if isinstance(msg, dict) else {}


def messages(request: dict[str, Any]) -> Messages:
    out = []
    for m in as_list(request.get("messages")):
        if not isinstance(m, dict):
            continue
        msg: dict[str, Any] = {"role": role(m.get("role")), "content": message_text(m.get("content"))}
        calls = [tool_call(tc) for tc in as_list(m.get("tool_calls")) if isinstance(tc, dict)]
        if isinstance(m.get("function_call"), dict):  # the legacy single function call
            fn = m["function_call"]
            calls.append({"id": None, "name": fn.get("name"), "arguments": fn.get("arguments")})
        if calls:
            msg["tool_calls"] = calls
        if m.get("tool_call_id") is not None:
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def last_input(request: dict[str, Any]) -> dict[str, Any] | None:
    # The content's text parts only (not message_text's placeholders): what the dashboard has always shown.
    for m in reversed(as_list(request.get("messages"))):
        if isinstance(m, dict) and m.get("role") in ("user", "tool"):
            out = {"role": m["role"], "content": content_text(m.get("content"))}
            if m.get("tool_call_id"):
                out["tool_call_id"] = m["tool_call_id"]
            return out
    return None


def answer(response: dict[str, Any]) -> dict[str, Any] | None:
    choices = response.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    msg = as_dict(first.get("message"))
    out: dict[str, Any] = {"content": content_text(msg.get("content"))}
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if reasoning:
        out["reasoning_content"] = reasoning
    calls = [tool_call(tc) for tc in as_list(msg.get("tool_calls"))]
    if calls:
        out["tool_calls"] = calls
    return out


def export(request: dict[str, Any]) -> ExportInput:
    return ExportInput(messages=request.get("messages"), tools=request.get("tools"))


SHAPE = CallShape(
    kind="chat",
    api="chat",
    list_key="messages",
    messages=messages,
    last_input=last_input,
    answer=answer,
    export=export,
)

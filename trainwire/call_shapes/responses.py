"""The Responses API (`/v1/responses`), which the proxy translates to chat (proxy/api_responses.py): its input
items and output items read the way the translation sends them to vLLM."""

from __future__ import annotations

from typing import Any

from trainwire.call_shapes.base import (
    CallShape,
    Messages,
    answer_dict,
    as_list,
    chat_export,
    json_text,
    last_user_or_tool,
    message_text,
    role,
)


def messages(request: dict[str, Any]) -> Messages:
    """Responses input as chat messages, the way the proxy sends it to vLLM: `instructions` first as the system
    message; a function_call joins the assistant message before it (one generated turn); reasoning items are
    dropped (chat templates drop them too); items of other types are shown whole, with their type as role."""
    out: list[dict[str, Any]] = []
    instructions = request.get("instructions")
    if isinstance(instructions, str) and instructions:
        out.append({"role": "system", "content": instructions})
    source = request.get("input")
    if isinstance(source, str):
        out.append({"role": "user", "content": source})
        return out
    for item in as_list(source):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message" or (kind is None and "role" in item):
            out.append({"role": role(item.get("role")), "content": message_text(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "name": item.get("name"), "arguments": item.get("arguments")}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append(
                {"role": "tool", "content": message_text(item.get("output")), "tool_call_id": item.get("call_id")}
            )
        elif kind == "reasoning":
            continue
        else:
            out.append({"role": kind if isinstance(kind, str) else "unknown", "content": json_text(item)})
    return out


def answer(response: dict[str, Any]) -> dict[str, Any] | None:
    content: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in as_list(response.get("output")):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            for p in as_list(item.get("content")):
                if isinstance(p, dict):
                    text = p.get("text") if isinstance(p.get("text"), str) else p.get("refusal")
                    if isinstance(text, str):
                        content.append(text)
        elif kind == "function_call":
            calls.append({"id": item.get("call_id"), "name": item.get("name"), "arguments": item.get("arguments")})
        elif kind == "reasoning":
            for p in as_list(item.get("content") or item.get("summary")):
                if isinstance(p, dict) and isinstance(p.get("text"), str):
                    reasoning.append(p["text"])
    return answer_dict(content, reasoning, calls)


SHAPE = CallShape(
    kind="responses",
    api="responses",
    list_key="input",
    messages=messages,
    last_input=last_user_or_tool(messages),
    answer=answer,
    export=chat_export(messages),
)

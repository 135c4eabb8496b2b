"""Completions (`/v1/completions`): a prompt and choice 0's text; the request is stored whole."""

from __future__ import annotations

from typing import Any

from trainwire.call_shapes.base import CallShape, ExportInput, Messages, json_text


def _prompt(request: dict[str, Any]) -> str:
    prompt = request.get("prompt")
    return prompt if isinstance(prompt, str) else json_text(prompt)


def messages(request: dict[str, Any]) -> Messages:
    """The prompt as one message of role `prompt`."""
    return [{"role": "prompt", "content": _prompt(request)}] if "prompt" in request else []


def last_input(request: dict[str, Any]) -> dict[str, Any] | None:
    return {"role": "prompt", "content": _prompt(request)}


def answer(response: dict[str, Any]) -> dict[str, Any] | None:
    choices = response.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    return {"content": first.get("text")}


def export(request: dict[str, Any]) -> ExportInput:
    prompt = request.get("prompt")
    return ExportInput(prompt=prompt if isinstance(prompt, str) or prompt is None else json_text(prompt))


SHAPE = CallShape(
    kind="completion",
    api="completions",
    list_key=None,
    messages=messages,
    last_input=last_input,
    answer=answer,
    export=export,
)

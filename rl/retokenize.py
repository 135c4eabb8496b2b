"""Token ids of a call the policy did not serve: its recorded request and answer, rendered with the policy's own
tokenizer and chat template, as vLLM would render them for the policy.

A frozen route (a teacher agent on another model, :mod:`trainwire.proxy.frozen`) records the messages, the tools
and the answer, but no token ids of the policy's. To train the policy on that answer (supervised fine-tuning,
:mod:`trainwire.rl.sft`) the call is turned into what the policy would have seen and generated:

* the **prompt** is ``apply_chat_template(messages, tools=tools, add_generation_prompt=True)``, encoded without
  special tokens added: what vLLM's chat route renders and encodes for the same request;
* the **completion** is the answer as an assistant turn: the template's rendering of the conversation with that
  turn appended, minus the prompt, encoded, up to and including the first end-of-turn token the model generates
  (the tokenizer's EOS and the generation config's EOS ids: where vLLM stops). Whatever the template writes after
  it (a newline, a closing marker) belongs to the next prompt and is never generated, so it is not trained on.

Before rendering, messages are normalized the way vLLM's chat parser does for templates that take string content
(``vllm/renderers/chat_utils.py``): content that is a list of text parts becomes those texts joined with newlines,
missing content becomes ``""``, and the arguments of assistant tool calls are parsed from their JSON string into an
object (``{}`` when they are not valid JSON or not an object), an empty ``tool_calls`` list is dropped. Tools are
passed as the request sent them. tests/test_sft_retokenize.py pins the result to vLLM's own ``/tokenize`` of the
same messages and tools.

Needs ``transformers`` (the trainer's environment has it); imported only by an SFT trainer with ``--sft-from``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainwire.call_shapes.chat import without_strict

__all__ = ["ChatRenderer", "RenderError", "normalize_message"]


class RenderError(ValueError):
    """The call cannot be rendered for the policy; the message says why (a skip reason)."""


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RenderError(f"message content part of type {kind!r} (only text is rendered)")
        return "\n".join(texts)
    raise RenderError(f"message content of type {type(content).__name__}")


def _arguments(value: Any) -> dict:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value:
        try:
            parsed = json.loads(value)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def normalize_message(message: Any) -> dict[str, Any]:
    """One OpenAI chat message as vLLM hands it to the chat template (see the module docstring)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RenderError("a message without a role")
    role = message["role"]
    out: dict[str, Any] = {"role": role, "content": _text(message.get("content"))}
    if role == "assistant" and isinstance(message.get("tool_calls"), list) and message["tool_calls"]:
        calls = []
        for tc in message["tool_calls"]:
            fn = tc.get("function") if isinstance(tc, dict) else None
            if not isinstance(fn, dict) or tc.get("type", "function") != "function":
                raise RenderError("a tool call that is not a function call")
            calls.append({**tc, "function": {**fn, "arguments": _arguments(fn.get("arguments"))}})
        out["tool_calls"] = calls
    if role == "tool" and "tool_call_id" in message:
        out["tool_call_id"] = message["tool_call_id"]
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def _answer(response: Any) -> dict[str, Any]:
    choices = response.get("choices") if isinstance(response, dict) else None
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    message = first.get("message") if first else None
    if not isinstance(message, dict):
        raise RenderError("the recorded answer has no message")
    if not (message.get("content") or message.get("tool_calls")):
        raise RenderError("the recorded answer is empty")
    return normalize_message({**message, "role": "assistant"})


class ChatRenderer:
    """The policy's tokenizer and chat template, turning a recorded chat call into (prompt ids, completion ids)."""

    def __init__(self, tokenizer, stop_ids: set[int] | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise RenderError("the policy's tokenizer has no chat template")
        self.tokenizer = tokenizer
        ids = set(stop_ids or ())
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        if not ids:
            raise RenderError("the policy's tokenizer has no EOS token")
        self.stop_ids = ids

    @classmethod
    def from_pretrained(cls, model: str) -> ChatRenderer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        stop: set[int] = set()
        config = Path(model) / "generation_config.json"
        if config.is_file():
            eos = json.loads(config.read_text()).get("eos_token_id")
            stop.update(int(x) for x in (eos if isinstance(eos, list) else [eos]) if isinstance(x, int))
        return cls(tokenizer, stop)

    def _render(self, messages: list[dict], tools: Any, generation_prompt: bool, kwargs: dict) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=without_strict(tools) or None,  # as the proxy serves a trainable call's tools
                tokenize=False,
                add_generation_prompt=generation_prompt,
                **kwargs,
            )
        except Exception as exc:  # jinja raises whatever the template raises
            raise RenderError(f"the chat template failed: {exc}") from None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: list, tools: Any = None, **template_kwargs: Any) -> list[int]:
        """What vLLM renders and encodes for a chat request with these messages and tools."""
        return self.encode(self._render([normalize_message(m) for m in messages], tools, True, template_kwargs))

    def call_tokens(self, request: Any, response: Any) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) of a recorded chat call: see the module docstring."""
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            raise RenderError("the recorded request has no messages")
        messages = [normalize_message(m) for m in request["messages"]]
        tools = request.get("tools")
        extra = request.get("chat_template_kwargs")
        kwargs: dict = extra if isinstance(extra, dict) else {}
        prompt_text = self._render(messages, tools, True, kwargs)
        full_text = self._render(messages + [_answer(response)], tools, False, kwargs)
        if not full_text.startswith(prompt_text):
            raise RenderError("the template does not render the answer as a continuation of the prompt")
        completion = self.encode(full_text[len(prompt_text) :])
        end = next((i for i, t in enumerate(completion) if t in self.stop_ids), None)
        if end is None:
            raise RenderError("the template's assistant turn has no end-of-turn token")
        return self.encode(prompt_text), completion[: end + 1]

"""Re-tokenized calls (rl/retokenize.py) equal what vLLM renders for the same messages and tools.

One real vLLM (CPU build) serves the calculator demo's model (demo/calc_model.py) with the hermes tool-call parser.
For teacher-shaped conversations (a question with the calculator tool; a tool call whose arguments come as a
compact, a spaced or an invalid JSON string, with content None or ""; the tool's result, content as text parts;
a second tool round; a plain chat without tools) the trainer's renderer, in the trainer's own environment
(transformers of the project venv), gives:

* the prompt: exactly vLLM's ``POST /tokenize`` with ``messages``, ``tools`` and ``add_generation_prompt``;
* the completion: vLLM's ``/tokenize`` of the conversation with the answer appended, minus the prompt, up to and
  including the end-of-turn token (the EOS vLLM stops generation on); the next token vLLM renders after it is the
  template's newline, which is not trained.

Skipped when the vLLM venv is missing; TRAINWIRE_REQUIRE_VLLM=1 makes that an error.
"""

from __future__ import annotations

import copy
import json

import httpx
import pytest

from demo import calc_task
from demo.calc_model import build_calc_model
from demo.vllm_server import start_vllm
from tests.support.ports import free_port
from tests.support.vllm_support import require_vllm_venv
from trainwire.call_shapes.chat import without_strict
from trainwire.rl.retokenize import ChatRenderer

pytestmark = pytest.mark.vllm

require_vllm_venv()

Q = calc_task.Question(expression="37*48+29", text="What is 37*48+29?", answer=1805)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_calc_model(tmp_path_factory.mktemp("calc") / "model")


@pytest.fixture(scope="module")
def vllm(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("calc-vllm") / "vllm.log"
    proc = start_vllm(model_dir, free_port(), served_model_name="calc", log_path=log)
    try:
        yield proc
    finally:
        proc.stop()


def call(args: str, cid: str = "call_1") -> dict:
    return {"id": cid, "type": "function", "function": {"name": "calculator", "arguments": args}}


def conversations() -> list[tuple[str, dict, dict]]:
    """(name, request, the recorded answer message)."""
    sys_user = Q.messages()
    tools = [calc_task.TOOL]
    compact = call('{"expression":"37*48+29"}')
    first = {"messages": sys_user, "tools": tools}
    after = {
        "tools": tools,
        "messages": sys_user
        + [
            {"role": "assistant", "content": None, "tool_calls": [compact]},
            {"role": "tool", "tool_call_id": "call_1", "content": "1805"},
        ],
    }
    parts = copy.deepcopy(after)
    parts["messages"][-1]["content"] = [{"type": "text", "text": "1805"}]
    parts["messages"][-2]["content"] = ""
    spaced = copy.deepcopy(after)
    spaced["messages"][-2]["tool_calls"] = [call(json.dumps({"expression": "37*48+29"}, indent=2))]
    invalid = copy.deepcopy(after)
    invalid["messages"][-2]["tool_calls"] = [call('{"expression": "37*48')]
    invalid["messages"][-1]["content"] = "Error: arguments are not JSON"
    twice = copy.deepcopy(after)
    twice["messages"] += [
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call('{"expression": "37*48"}', "call_2")]},
        {"role": "tool", "tool_call_id": "call_2", "content": "1776"},
    ]
    plain = {"messages": [{"role": "user", "content": "Hello!"}]}
    strict = {
        "messages": sys_user,
        "tools": [{**calc_task.TOOL, "function": {**calc_task.TOOL["function"], "strict": True}}],
    }
    return [
        ("strict tool, rendered as served", strict, {"role": "assistant", "content": None, "tool_calls": [compact]}),
        ("tool call", first, {"role": "assistant", "content": None, "tool_calls": [compact]}),
        ("answer after the result", after, {"role": "assistant", "content": "1805"}),
        ("text parts, empty content", parts, {"role": "assistant", "content": "1805"}),
        ("spaced arguments", spaced, {"role": "assistant", "content": "1805"}),
        ("invalid arguments", invalid, {"role": "assistant", "content": "I cannot compute that."}),
        (
            "second tool round",
            twice,
            {"role": "assistant", "content": None, "tool_calls": [call('{"expression": "1776+29"}', "call_3")]},
        ),
        ("no tools", plain, {"role": "assistant", "content": "Hi there."}),
    ]


def vllm_tokens(vllm, messages: list, tools, generation_prompt: bool) -> list[int]:
    body = {"model": "calc", "messages": messages, "add_generation_prompt": generation_prompt}
    if tools:
        body["tools"] = tools
    r = httpx.post(f"{vllm.url}/tokenize", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


@pytest.mark.parametrize("name", [c[0] for c in conversations()])
def test_renderer_equals_vllm(vllm, model_dir, name):
    renderer = ChatRenderer.from_pretrained(str(model_dir))
    ((_, request, message),) = [c for c in conversations() if c[0] == name]
    response = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    prompt, completion = renderer.call_tokens(request, response)
    tools = without_strict(request.get("tools"))  # what the proxy sends vLLM for a trainable call
    assert prompt == vllm_tokens(vllm, request["messages"], tools, True)
    full = vllm_tokens(vllm, request["messages"] + [message], tools, False)
    assert full[: len(prompt) + len(completion)] == prompt + completion
    assert completion[-1] == renderer.tokenizer.eos_token_id
    assert renderer.tokenizer.decode(full[len(prompt) + len(completion) :]) == "\n"  # the template's, not trained
    assert renderer.prompt_ids(request["messages"], request.get("tools")) == prompt

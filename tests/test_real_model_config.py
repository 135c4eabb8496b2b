"""The real model's folder (make real-model) is read the same way by both transformers versions: the trainer's
(project venv, < 5.11) and vLLM's (its venv, >= 5.16). RoPE parameters, tied embeddings, the shape, the special
tokens (the GGUF reader once made ``<|im_start|>`` the EOS), the rendering of a tool conversation with the shipped
template, and decoding; any difference would make the trainer's log-probs disagree with vLLM's or its re-rendered
prompts differ from the ones vLLM saw.

And with the real tokenizer and template: a tool call the model wrote in a form the template does not reproduce
splits the trajectory, and each sample is exactly what was sampled and seen (no vLLM needed: the template renders
the same in both environments, as the first test shows, and as vLLM, tests/test_real_model_vllm.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

from demo.vllm_server import vllm_env, vllm_python
from tests.support.vllm_support import real_model, require_vllm_venv
from trainwire.rl.engine.config import freezes_embeddings

pytestmark = pytest.mark.vllm

require_vllm_venv()

READOUT = Path(__file__).resolve().parent / "support" / "model_readout.py"


def _readout(python: str, model_dir: Path, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run(
        [python, str(READOUT), str(model_dir)], capture_output=True, text=True, timeout=300, env=env, check=True
    )
    return json.loads(out.stdout)


def test_both_transformers_read_the_real_model_alike():
    model_dir = real_model()
    ours = _readout(sys.executable, model_dir)
    theirs = _readout(str(vllm_python()), model_dir, env=vllm_env())
    assert Version(ours.pop("transformers")) < Version("5.11") < Version("5.16") <= Version(theirs.pop("transformers"))
    assert ours == theirs
    cfg = ours["config"]
    assert cfg["rope"] == {"rope_theta": 100000.0, "rope_type": "default"}
    assert cfg["tie_word_embeddings"] is True and cfg["quantization_config"] is None
    # so full fine-tuning keeps the embeddings frozen by default (--freeze-embeddings auto; see the full-publish
    # agreement test in tests/test_real_model_vllm.py)
    assert freezes_embeddings("auto", str(model_dir)) is True
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert ours["tokenizer"]["eos"] == ["<|im_end|>", 2] and ours["generation_eos"] == 2
    assert ours["tokenizer"]["adds_bos"] is False
    assert ours["decoded"] == "x = 1 , y ."  # no space clean-up: decoded text re-renders to the same tokens
    assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>' in ours["rendered"]


def test_a_re_rendered_tool_call_splits_the_trajectory_and_every_sample_is_what_was_sampled():
    """The model writes a tool call the template does not reproduce (compact JSON, no newlines): vLLM's parser reads
    it, the agent sends it back as a parsed call, and the real template re-renders it spaced and on its own lines.
    The next call's prompt then does not continue the sampled tokens: trajectory mode starts a new sample there, and
    both samples hold only tokens that were generated (with their log-probs) or seen."""
    from transformers import AutoTokenizer

    from tests.support.model_readout import TOOLS
    from tests.support.rerender import classify
    from trainwire.rl.transitions import build_samples
    from trainwire.store.episodes import ClaimedCall, ClaimedSession

    tok = AutoTokenizer.from_pretrained(str(real_model()))

    def render(messages, generation_prompt=True) -> list[int]:
        text = tok.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=generation_prompt, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    question = [{"role": "user", "content": "What is 12*7?"}]
    sampled = tok(
        '<tool_call>{"name":"calculator","arguments":{"expression":"12*7"}}</tool_call>', add_special_tokens=False
    )
    first_completion = sampled["input_ids"] + [tok.eos_token_id]
    parsed = {"type": "function", "id": "c1", "function": {"name": "calculator", "arguments": {"expression": "12*7"}}}
    history = [
        *question,
        {"role": "assistant", "content": "", "tool_calls": [parsed]},
        {"role": "tool", "content": "84"},
    ]
    second_prompt = render(history)
    third_history = [*history, {"role": "assistant", "content": "84"}, {"role": "user", "content": "Thanks."}]
    second_completion = tok("84", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    third_prompt = render(third_history)

    def call(n, prompt, completion):
        return ClaimedCall(
            id=f"c{n}", seq=n, agent_name=None, policy_version=0, prompt_token_ids=prompt,
            completion_token_ids=completion, logprobs=[-0.1 * (n + 1)] * len(completion), finish_reason="stop",
            reward=0.0, aborted=False, status_code=200,
        )  # fmt: skip

    calls = [
        call(0, render(question), first_completion),
        call(1, second_prompt, second_completion),
        call(2, third_prompt, tok("You're welcome.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]),
    ]
    first = calls[0].prompt_token_ids + first_completion
    assert second_prompt[: len(first)] != first
    assert classify(first, second_prompt, lambda ids: tok.decode(ids), tok.eos_token_id) == "tool_call_json"
    assert third_prompt[: len(second_prompt) + len(second_completion)] == second_prompt + second_completion

    built = build_samples([ClaimedSession(id="s", task_id=None, final_reward=1.0, calls=calls)], mode="trajectory")
    assert built.counters["chain_breaks"] == 1 and built.call_ids == [("c0",), ("c1", "c2")]
    one, two = built.samples
    assert one.prompt_ids + one.response_ids == first and one.response_mask == [1] * len(first_completion)
    assert two.prompt_ids == second_prompt
    assert two.prompt_ids + two.response_ids == third_prompt + calls[2].completion_token_ids
    trained = [t for t, m in zip(two.response_ids, two.response_mask) if m]
    assert trained == second_completion + calls[2].completion_token_ids
    assert [lp for lp, m in zip(two.old_logprobs, two.response_mask) if m] == calls[1].logprobs + calls[2].logprobs

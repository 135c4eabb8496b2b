"""The real model's folder (make real-model) is read the same way by both transformers versions: the trainer's
(project venv, < 5.11) and vLLM's (its venv, >= 5.16). RoPE parameters, tied embeddings, the shape, the special
tokens (the GGUF reader once made ``<|im_start|>`` the EOS), the rendering of a tool conversation with the shipped
template, and decoding; any difference would make the trainer's log-probs disagree with vLLM's or its re-rendered
prompts differ from the ones vLLM saw."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

from demo.vllm_server import vllm_env, vllm_python
from tests.support.vllm_support import real_model, require_vllm_venv

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
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert ours["tokenizer"]["eos"] == ["<|im_end|>", 2] and ours["generation_eos"] == 2
    assert ours["tokenizer"]["adds_bos"] is False
    assert ours["decoded"] == "x = 1 , y ."  # no space clean-up: decoded text re-renders to the same tokens
    assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>' in ours["rendered"]

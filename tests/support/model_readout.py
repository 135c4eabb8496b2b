"""What a transformers version reads from a model folder, as JSON on stdout: run it with the project venv's python
and with the vLLM venv's (their transformers differ: < 5.11 and >= 5.16) and compare.

    python tests/support/model_readout.py MODEL_DIR

Only transformers and the standard library: it must import in either venv without the project on the path.
"""

from __future__ import annotations

import json
import sys

CONVERSATION = [
    {"role": "user", "content": "What is 12*7?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*7"}}},
        ],
    },
    {"role": "tool", "content": "84"},
    {"role": "assistant", "content": "84"},
    {"role": "user", "content": "And 3+4?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression.",
            "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
        },
    }
]


def _rope(config) -> dict:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        return {k: params[k] for k in sorted(params)}
    return {"rope_theta": getattr(config, "rope_theta", None), "rope_scaling": getattr(config, "rope_scaling", None)}


def readout(model_dir: str) -> dict:
    import transformers
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    gen = GenerationConfig.from_pretrained(model_dir)
    eos = gen.eos_token_id
    rendered = tok.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    return {
        "transformers": transformers.__version__,
        "config": {
            "architectures": config.architectures,
            "model_type": config.model_type,
            "rope": _rope(config),
            "tie_word_embeddings": config.tie_word_embeddings,
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": getattr(config, "head_dim", None),
            "rms_norm_eps": config.rms_norm_eps,
            "max_position_embeddings": config.max_position_embeddings,
            "hidden_act": config.hidden_act,
            "attention_bias": config.attention_bias,
            "mlp_bias": config.mlp_bias,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
            "quantization_config": getattr(config, "quantization_config", None),
        },
        "generation_eos": sorted(eos) if isinstance(eos, list) else eos,
        "tokenizer": {
            "len": len(tok),
            "bos": [tok.bos_token, tok.bos_token_id],
            "eos": [tok.eos_token, tok.eos_token_id],
            "pad": [tok.pad_token, tok.pad_token_id],
            "unk": [tok.unk_token, tok.unk_token_id],
            "special_ids": sorted(tok.all_special_ids),
            "adds_bos": tok("hi")["input_ids"][:1] == [tok.bos_token_id],
            "clean_up_tokenization_spaces": tok.clean_up_tokenization_spaces,
        },
        "rendered": rendered,
        "rendered_ids": tok(rendered, add_special_tokens=False)["input_ids"],
        "decoded": tok.decode(tok("x = 1 , y .", add_special_tokens=False)["input_ids"]),
    }


if __name__ == "__main__":
    print(json.dumps(readout(sys.argv[1])))

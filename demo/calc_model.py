"""Build the tiny model of `make demo-calc`: random weights, a tokenizer and chat template made for tool calls.

Nothing is downloaded; everything is deterministic for a given seed. What makes a multi-turn tool skill learnable
for a model this small (see README, "What `make demo-calc` shows"):

* **digits are single tokens** (a ``Digits`` pre-tokenizer before byte-level BPE), so copying a number is copying
  tokens one by one, and no merge ever hides a digit inside a word;
* **the template's markers are single tokens**: ``<|im_start|>``, ``<|im_end|>`` (also the EOS: an assistant turn
  ends with it, and vLLM stops there), and ``<tool_call>`` / ``</tool_call>`` (plain added tokens, so they stay in
  the text vLLM's ``hermes`` tool-call parser reads);
* **short prompts**: a BPE trained on the task's own text (its system prompt, tool schema, questions and tool calls)
  renders each fixed string in a few tokens, so a whole two-turn episode is about 90 tokens;
* a Llama of 4 layers, hidden 256, 4 heads of 64 (vLLM's CPU attention supports head size 64), about 3.4M
  parameters: large enough to copy an expression into a tool call and a tool result into the answer, small
  enough to train on two CPU cores in minutes.

The chat template (ChatML, Qwen-style tool calls)::

    <|im_start|>system\\nUse the calculator.\\n<tools>{"description": ..., "name": ..., "parameters": ...}</tools><|im_end|>\\n
    <|im_start|>user\\nWhat is 37*48+29?<|im_end|>\\n
    <|im_start|>assistant\\n<tool_call>{"name": "calculator", "arguments": {"expression": "37*48+29"}}</tool_call><|im_end|>\\n
    <|im_start|>tool\\n1805<|im_end|>\\n
    <|im_start|>assistant\\n1805<|im_end|>\\n

    python -m demo.calc_model OUT_DIR

Works with transformers 5.x both in the project venv and in the vLLM venv.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from demo import calc_task, model_dir  # noqa: E402

VOCAB_SIZE = 512
MAX_POSITION_EMBEDDINGS = 1024  # = demo/vllm_server.py's --max-model-len
MARKER = "trainwire_calc_model.json"
# Bump when the produced model changes in any way, so old caches are rebuilt.
FORMAT_VERSION = 2
SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
}

PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]
# Plain added tokens: not "special", so they survive detokenization into the text the hermes parser reads.
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tools>", "</tools>"]

# Assistant turns end with <|im_end|>, the EOS: the completion the model generates is the turn up to and including
# it; the newline after it belongs to the template (it is in the next prompt, never generated). Content that is a
# list of text parts is joined with newlines, as vLLM does before rendering; tool-call arguments are rendered from
# the object vLLM (and trainwire's re-tokenizer) parse them into, or as given when they are a string. JSON is written
# with sorted keys: the rendering does not depend on the order of a client's keys, nor on the store keeping it
# (Postgres keeps requests as JSONB, which reorders object keys).
CHAT_TEMPLATE = (
    "{%- set sys = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"
    "{%- if sys is not none or tools -%}"
    "<|im_start|>system"
    "{%- if sys is not none %}{{ '\\n' }}{{ sys }}{% endif -%}"
    "{%- if tools -%}"
    "{{ '\\n' }}<tools>"
    "{%- for tool in tools -%}"
    "{%- set fn = tool['function'] if tool.get('function') else tool -%}"
    "{{ {'name': fn['name'], 'description': fn.get('description') or '', 'parameters': fn.get('parameters') or {}}"
    " | tojson(sort_keys=True) }}"
    "{%- endfor -%}"
    "</tools>"
    "{%- endif -%}"
    "<|im_end|>{{ '\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message['role'] == 'system') -%}"
    "<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- elif message['content'] is not none %}{{ message['content'] | tojson }}{% endif -%}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') -%}"
    "{%- for tc in message['tool_calls'] -%}"
    "{%- set fn = tc['function'] if tc.get('function') else tc -%}"
    '<tool_call>{"name": {{ fn[\'name\'] | tojson }}, "arguments": '
    "{%- if fn['arguments'] is string %} {{ fn['arguments'] }}{% else %} {{ fn['arguments'] | tojson(sort_keys=True) }}"
    "{% endif -%}"
    "}</tool_call>"
    "{%- endfor -%}"
    "{%- endif -%}"
    "<|im_end|>{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif -%}"
)


def _episode_texts(rng: random.Random) -> list[str]:
    """Text shaped like the task's episodes, for the BPE merges (no special tokens: the template adds them)."""
    tool = json.dumps(
        {
            "name": calc_task.TOOL["function"]["name"],
            "description": calc_task.TOOL["function"]["description"],
            "parameters": calc_task.TOOL["function"]["parameters"],
        },
        sort_keys=True,
    )
    lines = []
    for q in calc_task.questions(400, held_out=False, seed=12345):
        args = json.dumps({"expression": q.expression})
        call = f'{{"name": "{calc_task.TOOL_NAME}", "arguments": {args}}}'
        lines += [
            f"system\n{calc_task.SYSTEM_PROMPT}\n<tools>{tool}</tools>",
            f"user\n{q.text}",
            f"assistant\n<tool_call>{call}</tool_call>",
            f"tool\n{q.answer}",
            f"assistant\n{q.answer}",
            f"tool\nError: cannot parse {q.expression[: rng.randint(1, 8)]!r}",
        ]
    lines += [
        "The quick brown fox jumps over the lazy dog.",
        "Hello, world! How can I help you today?",
        "0123456789 +-*/=()[]{}<>.,;:!?'\"",
        "Error: unknown tool",
        "Error: arguments are not JSON",
    ]
    return lines


def _train_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(ADDED_TOKENS),
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_episode_texts(random.Random(0)), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    n = tok.get_vocab_size()
    if n > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {n} tokens, more than {VOCAB_SIZE}")
    if n < VOCAB_SIZE:  # pad so the embedding matrix and the tokenizer agree (every id the model samples decodes)
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(VOCAB_SIZE - n)])
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()

    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_model(tokenizer, seed: int):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
        **SHAPE,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


def _fingerprint() -> str:
    what = json.dumps(
        {
            "template": CHAT_TEMPLATE,
            "shape": SHAPE,
            "vocab": VOCAB_SIZE,
            "tool": calc_task.TOOL,
            "system": calc_task.SYSTEM_PROMPT,
            "added": ADDED_TOKENS,
        },
        sort_keys=True,
    )
    return hashlib.sha256(what.encode()).hexdigest()


def build_calc_model(out_dir: Path, seed: int = 0) -> Path:
    """Build the model into ``out_dir`` (idempotent: an up-to-date build is kept) and return the path."""
    out_dir = Path(out_dir).resolve()
    info = {"format_version": FORMAT_VERSION, "fingerprint": _fingerprint(), "seed": seed}
    if model_dir.is_current(out_dir, MARKER, info):
        return out_dir
    tokenizer = _train_tokenizer()
    return model_dir.write(out_dir, _build_model(tokenizer, seed), tokenizer, CHAT_TEMPLATE, MARKER, info)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(build_calc_model(args.out_dir, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

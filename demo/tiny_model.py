"""Build a tiny, download-free Llama model that real vLLM (CPU) can serve.

The model is only meant for tests, the demo and CI: random weights, a
byte-level BPE tokenizer trained locally on a small built-in corpus, and a
ChatML-style chat template.  Everything is deterministic for a given seed.

Shape constraints (see docs/vllm-cpu.md):
  * vLLM's CPU attention only supports some head sizes (32, 64, 80, ...), so
    hidden 128 / 2 heads => head_dim 64.
  * the vocabulary is exactly ``VOCAB_SIZE`` (a multiple of 64); the tokenizer
    is padded with reserved special tokens so model and tokenizer agree.

Usage::

    python -m demo.tiny_model OUT_DIR

Works with transformers 5.x both in the project venv and in the vLLM venv.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from demo import model_dir  # noqa: E402

VOCAB_SIZE = 512
MAX_POSITION_EMBEDDINGS = 1024
MARKER = "trainwire_tiny_model.json"
# Bump when the produced model changes in any way, so old caches are rebuilt.
FORMAT_VERSION = 3

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

# ChatML-like.  Assistant turns end with EOS so generation stops there.
# Tool calls are rendered as plain text (<tool_call>{json}</tool_call>); the
# template never iterates over message content, so vLLM treats the content
# format as "string".  HF renders templates with trim_blocks=True, which eats
# a newline that directly follows a block tag, hence the explicit {{ '\\n' }}.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}\n"
    "{% endif %}"
    "You can call these tools:"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "<|im_start|>{{ message['role'] }}"
    "{% if message['role'] == 'tool' and message.get('tool_call_id') %} {{ message['tool_call_id'] }}{% endif %}"
    "{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not none %}{{ message['content'] | tojson }}{% endif %}"
    "{% if message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{% for tc in message['tool_calls'] %}"
    "{% set fn = tc['function'] if tc.get('function') else tc %}"
    '<tool_call>{"name": {{ fn[\'name\'] | tojson }}, "arguments": '
    "{% if fn['arguments'] is string %}{{ fn['arguments'] }}{% else %}{{ fn['arguments'] | tojson }}{% endif %}"
    "}</tool_call>"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model can still learn to answer simple questions.",
    "What is two plus two? Two plus two is four.",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short answer and then stop.",
    "The user asked a question and the assistant gave an answer.",
    "You are a helpful assistant. Answer briefly and correctly.",
    "I think the answer is yes, but let me check the numbers again.",
    "The weather today is sunny with a light wind from the west.",
    "Call the tool with the right arguments and read the result.",
    "The function returned an error, so we should try again.",
    "This is a test of the training proxy and the reward model.",
    "Good morning! How can I help you today?",
    "Thank you for your help, that was exactly what I needed.",
    "Let us think step by step about this problem.",
    "The final answer is written inside the answer tags.",
    "system user assistant tool tool_call name arguments content",
    '{"name": "add", "arguments": {"a": 1, "b": 2}}',
    '{"role": "user", "content": "hello"}',
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "Once upon a time there was a little robot who wanted to learn how to count. "
    "Every morning it counted the birds in the garden, and every evening it counted the stars.",
    "The train leaves the station at nine o'clock and arrives in the city before noon.",
    "She opened the book, read the first page, and smiled because the story was about her town.",
    "We need more data to train the model, so we record every request and every response.",
    "If the reward is high, the policy should do more of that; if it is low, it should do less.",
    "Hello, world! This is a simple sentence. Here is another one, with numbers: 3, 14, 15, 92.",
    "Why is the sky blue? Because air scatters blue light more than red light.",
    "The cat sat on the mat. The dog slept by the door. The bird sang in the tree.",
    "Please search the web for the latest news and summarize it in three sentences.",
    "The server returned status code 200, which means the request was successful.",
]


def _corpus() -> list[str]:
    lines = list(_CORPUS_LINES)
    for a in range(0, 21):
        for b in range(0, 21, 3):
            lines.append(f"What is {a} plus {b}? {a} + {b} = {a + b}.")
            lines.append(f"{a} * {b} = {a * b} and {a} - {b} = {a - b}")
    lines.append("0123456789 +-*/=()[]{}<>.,;:!?'\"")
    return lines


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Pad to exactly VOCAB_SIZE so the embedding matrix and the tokenizer agree
    # (ids the model may sample always decode).
    n = tok.get_vocab_size()
    if n > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {n} tokens, more than {VOCAB_SIZE}")
    if n < VOCAB_SIZE:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(VOCAB_SIZE - n)])
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()

    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
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
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    # Random init with std 0.02 gives an almost uniform next-token
    # distribution; a larger output head makes sampled text less uniform and
    # logprobs more distinguishable between weight versions.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.25)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def _template_sha() -> str:
    return hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()


def _marker_info(seed: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "chat_template_sha256": _template_sha(),
        "seed": seed,
        "vocab_size": VOCAB_SIZE,
    }


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny model into ``out_dir`` (idempotent) and return the path."""
    out_dir = Path(out_dir).resolve()
    info = _marker_info(seed)
    if model_dir.is_current(out_dir, MARKER, info):
        return out_dir
    tokenizer = _train_tokenizer()
    return model_dir.write(out_dir, _build_model(tokenizer, seed), tokenizer, CHAT_TEMPLATE, MARKER, info)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = build_tiny_model(args.out_dir, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

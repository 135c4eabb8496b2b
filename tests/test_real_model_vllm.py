"""The real pretrained model (make real-model: SmolLM2-135M-Instruct, 49k-token BPE, tied embeddings, 30 layers)
end to end on real vLLM (CPU build) with the shipped tool template (``--chat-template demo/chatml_tools.jinja``,
``--tool-call-parser hermes``), the real proxy on Postgres and the real trainer.

* **Every API, with tools, streamed and not**: chat (OpenAI SDK), Responses (OpenAI SDK) and Messages (Anthropic
  SDK) through the proxy. Each recorded prompt is exactly vLLM's ``/tokenize`` of the same conversation, and each
  completion has one finite log-prob per token.
* **SFT's re-rendering** of teacher-shaped calls with the real template equals vLLM's.
* **Multi-turn tool sessions** of a calculator agent (the model's own tool calls, parsed by vLLM, executed, and
  sent back): how often the template re-renders an earlier turn otherwise than it was sampled (printed), and the
  trainer's samples in transition and trajectory mode are exactly the tokens generated and seen: every trained token
  is a sampled one with vLLM's log-prob, every context token is what the next prompt held, and a re-rendered turn
  starts a new sample instead of mixing tokens that were never seen together.
* **Train-inference agreement** after a LoRA publish and after a full publish: ``trainwire train`` (trajectory
  mode) trains a step on base model sessions (agreement on the converted weights: the tied embeddings), publishes
  into vLLM, and its next step measures the same on sessions the new weights served: mean |delta log p| <= 1e-4,
  float32 on both sides.
* **``--agreement-max``**: a trainer whose weights are not the served ones refuses its first step and stops with
  one line, exit 3, nothing published, the sessions given back.

Skipped when the vLLM venv is missing; TRAINWIRE_REQUIRE_VLLM=1 makes that an error.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from demo.real_model import TOOL_TEMPLATE
from demo.vllm_server import start_vllm
from tests.support import dbread
from tests.support.ports import free_port
from tests.support.rerender import rerender_report
from tests.support.vllm_support import real_model, require_vllm_venv
from trainwire.store.models import TrainStep

pytestmark = pytest.mark.vllm

require_vllm_venv()

ROOT = Path(__file__).resolve().parent.parent
SERVED = "smollm2"
TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression and return the result.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example 17+25"}},
            "required": ["expression"],
        },
    },
}
QUESTIONS = ["What is 17 + 25?", "What is 38 + 47?", "What is 12 * 7?", "What is 91 - 36?"]
# Sessions of the calculator agent recorded per training step (2 questions x GROUP samples: GRPO groups).
GROUP = 2
# vLLM's recorded log-probs against the trainer's, float32 on both sides, real model (the target).
AGREEMENT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return real_model()


@pytest.fixture(scope="module")
def vllm(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("real-vllm") / "vllm.log"
    proc = start_vllm(
        model_dir,
        free_port(),
        served_model_name=SERVED,
        lora=True,
        log_path=log,
        max_model_len=2048,
        chat_template=TOOL_TEMPLATE,
        kv_cache_gb=2,
        timeout=600,
    )
    print(f"vLLM (real model) started in {proc.startup_s:.1f} s")
    try:
        yield proc
    finally:
        proc.stop()
        assert not proc.alive()


@pytest.fixture
def proxy(start_proxy, vllm, pg_url, tmp_path):
    p = start_proxy("--upstream", vllm.url, "--database-url", pg_url, "--journal-dir", str(tmp_path / "journal"))
    p.db_url = pg_url
    return p


# ---------------------------------------------------------------------------------------------- helpers


def tokenize_chat(vllm, messages: list[dict], tools: list[dict] | None, generation_prompt: bool = True) -> list[int]:
    body: dict = {"model": SERVED, "messages": messages, "add_generation_prompt": generation_prompt}
    if tools:
        body["tools"] = tools
    r = httpx.post(f"{vllm.url}/tokenize", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def decoder(vllm):
    def decode(ids: list[int]) -> str:
        r = httpx.post(f"{vllm.url}/detokenize", json={"model": SERVED, "tokens": ids}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["prompt"]

    return decode


def openai_client(proxy):
    from openai import OpenAI

    return OpenAI(base_url=proxy.v1, api_key="unused", max_retries=0, timeout=300)


def assert_one_logprob_per_token(row: dict) -> None:
    ids, lps = row["completion_token_ids"], row["logprobs"]
    assert ids and len(lps) == len(ids), (len(ids or []), len(lps or []))
    assert all(lp is not None and math.isfinite(lp) and lp <= 0 for lp in lps)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculator(arguments: str) -> str:
    """The tool: arithmetic only, an error text for anything else (the model sees it and may try again)."""

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError("not arithmetic")

    try:
        expression = str(json.loads(arguments)["expression"])
        value = ev(ast.parse(expression, mode="eval").body)
    except Exception as exc:  # noqa: BLE001 - the tool answers every call
        return f"Error: {exc}"
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


# An in-context example (a worked tool call): without it the model never calls the tool at temperature 1.
EXAMPLE = [
    {"role": "user", "content": "What is 5 + 9?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "c0", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "5+9"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c0", "content": "14"},
    {"role": "assistant", "content": "14"},
]


def agent_session(proxy, sid: str, task: str, question: str, max_calls: int = 3) -> float:
    """A calculator agent: the model's tool calls are executed and sent back, and an answer given without the tool
    is sent back once with a request to check it (so every session has several turns); the reward is 1 for a
    correct answer, 0.5 for a tool call that ran, less a little per character (so a group is rarely tied)."""
    client = openai_client(proxy)
    messages: list[dict] = [*EXAMPLE, {"role": "user", "content": question}]
    called, answer, nudged = False, "", False
    for _ in range(max_calls):
        r = client.chat.completions.create(
            model="policy",
            messages=messages,
            tools=[TOOL],
            max_tokens=32,
            temperature=1.0,
            extra_headers={"X-Session-Id": sid, "X-Task-Id": task},
        )
        m = r.choices[0].message
        if not m.tool_calls:
            answer = m.content or ""
            if nudged:
                break
            nudged = True
            messages += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "Check it with the calculator tool."},
            ]
            continue
        calls = [
            {
                "id": tc.id,
                "type": "function",
                "function": {"name": tc.function.name, "arguments": tc.function.arguments},
            }
            for tc in m.tool_calls
        ]
        messages.append({"role": "assistant", "content": m.content, "tool_calls": calls})
        for tc in m.tool_calls:
            known = tc.function.name == "calculator"
            result = calculator(tc.function.arguments) if known else f"Error: no tool {tc.function.name!r}"
            called = called or not result.startswith("Error")
            messages.append({"role": "tool", "tool_call_id": tc.id, "content": result})
    truth = str(int(eval(question.removeprefix("What is ").rstrip("?"))))  # noqa: S307 - our own questions
    reward = (1.0 if truth in answer else 0.0) + (0.5 if called else 0.0) - len(answer) / 1000
    resp = httpx.post(f"{proxy.url}/reward", json={"session_id": sid, "reward": reward}, timeout=30)
    assert resp.status_code == 200, resp.text
    return reward


def record_sessions(proxy, tag: str, questions: list[str], group: int) -> list[str]:
    sids = {q: [f"{tag}-{i}-{uuid.uuid4().hex[:8]}" for i in range(group)] for q in questions}
    with ThreadPoolExecutor(4) as pool:
        jobs = [
            pool.submit(agent_session, proxy, sid, f"{tag}-{questions.index(q)}", q)
            for q in questions
            for sid in sids[q]
        ]
        for j in jobs:
            j.result()
    return [sid for q in questions for sid in sids[q]]


# ------------------------------------------------------------------------------------------------ tests


def test_every_api_with_tools_records_vllms_rendering(proxy, vllm):
    """Chat, Responses and Messages, streamed and not, with the calculator tool, through the proxy."""
    import anthropic

    client = openai_client(proxy)
    question = "What is 17 + 25? Use the calculator tool."
    history = [
        {"role": "user", "content": question},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expression": "17+25"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    sent: dict[str, tuple[list[dict], list[dict]]] = {}  # session -> the conversation as chat, its chat tools

    for stream in (False, True):
        sid = f"chat-{stream}"
        for n, msgs in enumerate(([history[0]], history)):
            kw = dict(model="policy", messages=msgs, tools=[TOOL], max_tokens=24, temperature=1.0)
            kw["extra_headers"] = {"X-Session-Id": f"{sid}-{n}"}
            if stream:
                chunks = list(client.chat.completions.create(stream=True, **kw))
                assert chunks
            else:
                assert client.chat.completions.create(**kw).choices
            sent[f"{sid}-{n}"] = (msgs, [TOOL])

    resp_tool = {"type": "function", **TOOL["function"]}
    resp_input = [
        {"role": "user", "content": question},
        {"type": "function_call", "call_id": "call_1", "name": "calculator", "arguments": '{"expression": "17+25"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "42"},
    ]
    for stream in (False, True):
        sid = f"responses-{stream}"
        kw = dict(model="policy", input=resp_input, tools=[resp_tool], max_output_tokens=24, temperature=1.0)
        r = client.responses.create(stream=stream, extra_headers={"X-Session-Id": sid}, **kw)
        if stream:
            assert [e.type for e in r][-1] in ("response.completed", "response.incomplete")  # max_output_tokens
        else:
            assert r.status in ("completed", "incomplete")
        sent[sid] = (history, [TOOL])

    ant = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0, timeout=300)
    ant_tool = {
        "name": "calculator",
        "description": TOOL["function"]["description"],
        "input_schema": TOOL["function"]["parameters"],
    }
    ant_messages = [
        {"role": "user", "content": question},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "call_1", "name": "calculator", "input": {"expression": "17+25"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "42"}]},
    ]
    for stream in (False, True):
        sid = f"messages-{stream}"
        kw = dict(model="policy", max_tokens=24, tools=[ant_tool], messages=ant_messages)
        if stream:
            with ant.messages.stream(extra_headers={"X-Session-Id": sid}, **kw) as s:
                s.get_final_message()
        else:
            ant.messages.create(extra_headers={"X-Session-Id": sid}, **kw)
        sent[sid] = (history, [TOOL])

    rows = {r["session_id"]: r for r in dbread.wait_calls(proxy.db_url, len(sent), timeout=60)}
    assert set(rows) == set(sent)
    for sid, (messages, tools) in sent.items():
        row = rows[sid]
        assert row["status_code"] == 200, (sid, row["response"])
        assert row["prompt_token_ids"] == tokenize_chat(vllm, messages, tools), sid
        assert_one_logprob_per_token(row)
    # the default system prompt and the tools block are in every prompt: the template vLLM ran is the shipped one
    text = decoder(vllm)(list(rows["chat-False-0"]["prompt_token_ids"]))
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert '<tools>\n{"description": "Evaluate an arithmetic expression' in text


def test_sft_rendering_of_teacher_calls_equals_vllms(vllm, model_dir):
    from tests.test_sft_retokenize import conversations
    from trainwire.rl.retokenize import ChatRenderer

    renderer = ChatRenderer.from_pretrained(str(model_dir))
    for name, request, message in conversations():
        response = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        prompt, completion = renderer.call_tokens(request, response)
        tools = request.get("tools")
        assert prompt == tokenize_chat(vllm, request["messages"], tools), name
        full = tokenize_chat(vllm, request["messages"] + [message], tools, generation_prompt=False)
        assert full[: len(prompt) + len(completion)] == prompt + completion, name
        assert completion[-1] == renderer.tokenizer.eos_token_id == 2, name


def _claim_and_build(db_url: str, mode: str):
    import asyncio

    from trainwire.rl.transitions import build_samples
    from trainwire.store import claims
    from trainwire.store.db import make_engine

    async def go():
        engine = make_engine(db_url)
        try:
            batch = await claims.claim_batch(engine, worker_id="test-inspect", batch_size=64, settle_s=0)
            built = build_samples(batch, mode=mode)
            await claims.release(engine, [s.id for s in batch], worker_id="test-inspect")
            return built
        finally:
            await engine.dispose()

    return asyncio.run(go())


def assert_samples_are_the_recorded_tokens(built, calls_by_id: dict[str, dict]) -> None:
    """Each sample is its calls' tokens and nothing else: the sequence is its last call's prompt + completion;
    each call's prompt is a prefix of it; the trained tokens (mask 1) are exactly the calls' completions, with
    vLLM's log-probs; the rest (mask 0) is context the next prompt held."""
    for sample, call_ids in zip(built.samples, built.call_ids):
        seq = sample.prompt_ids + sample.response_ids
        calls = [calls_by_id[c] for c in call_ids]
        first, last = calls[0], calls[-1]
        assert sample.prompt_ids == list(first["prompt_token_ids"])
        assert seq == list(last["prompt_token_ids"]) + list(last["completion_token_ids"])
        trained, logprobs = [], []
        for c in calls:
            p, done = list(c["prompt_token_ids"]), list(c["completion_token_ids"])
            assert seq[: len(p) + len(done)] == p + done
            trained += range(len(p), len(p) + len(done))
            logprobs += list(c["logprobs"])
        offset = len(sample.prompt_ids)
        mask_ones = [offset + i for i, m in enumerate(sample.response_mask) if m]
        assert mask_ones == trained
        assert [sample.old_logprobs[i - offset] for i in mask_ones] == pytest.approx(logprobs, abs=0)


def _trainer(db_url: str, vllm, model_dir: Path, ckpt: Path, log_path: Path, *, lora_rank: int, steps: int, batch: int):
    argv = [
        sys.executable, "-m", "trainwire.cli", "train",
        "--database-url", db_url, "--upstream", vllm.url, "--model", str(model_dir),
        "--lora-rank", str(lora_rank), "--lr", "5e-3" if lora_rank else "1e-5",
        "--mode", "trajectory", "--batch-size", str(batch), "--group-size", str(GROUP),
        "--checkpoint-dir", str(ckpt), "--settle-s", "0", "--poll-s", "0.2", "--max-steps", str(steps),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # vLLM's CPU engine spins on core 0
    log = open(log_path, "w")  # noqa: SIM115 - closed by the caller through the process
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _wait_version(proxy, version: int, timeout: float = 900) -> None:
    """The proxy stamps the new version once the trainer's publish reached vLLM and its NOTIFY arrived."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = httpx.post(
            f"{proxy.v1}/chat/completions",
            headers={"X-Session-Id": f"probe-{uuid.uuid4().hex[:6]}", "X-Trainwire-Train": "false"},
            json={"model": "policy", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
            timeout=120,
        )
        if int(r.headers.get("x-policy-version", -1)) >= version:
            return
        time.sleep(2)
    raise AssertionError(f"the proxy never served version {version}")


def test_tool_sessions_train_exactly_and_agree_after_a_lora_publish(proxy, vllm, model_dir, tmp_path):
    db = proxy.db_url
    questions = QUESTIONS[:2]
    first = record_sessions(proxy, "a", questions, GROUP)
    by_session = {sid: dbread.calls(db, sid) for sid in first}
    report = rerender_report(list(by_session.values()), decoder(vllm), eos=2)
    print(f"re-rendering on the real template: {json.dumps(report)}")
    calls_by_id = {c["id"]: c for cs in by_session.values() for c in cs}
    for c in calls_by_id.values():
        assert_one_logprob_per_token(c)

    transition = _claim_and_build(db, "transition")
    trajectory = _claim_and_build(db, "trajectory")
    assert len(transition.samples) == len(calls_by_id)
    assert_samples_are_the_recorded_tokens(transition, calls_by_id)
    assert_samples_are_the_recorded_tokens(trajectory, calls_by_id)
    breaks = sum(report["breaks"].values())
    assert len(trajectory.samples) == len(first) + breaks  # one sample per session, one more per re-rendered turn

    steps = train_two_steps(proxy, vllm, model_dir, tmp_path, questions, lora_rank=8, batch=len(first))
    assert_agreement(steps, "LoRA")


def test_agreement_after_a_full_publish(proxy, vllm, model_dir, tmp_path):
    """Full fine-tuning: the trainer exports every weight (tied embeddings once), vLLM reloads them in place.

    The model ties its output layer to the input embeddings, so ``--freeze-embeddings auto`` keeps them frozen:
    vLLM's CPU build multiplies the tied output layer through a oneDNN copy packed when the model loads
    (``dispatch_cpu_unquantized_gemm``), and an in-place reload loads no ``lm_head`` weight, so it never repacks
    it. Trained embeddings were served half: 1.5e-3 after one step here, 8.8e-3 after twelve SFT steps."""
    questions = QUESTIONS[2:]
    first = record_sessions(proxy, "a", questions, GROUP)
    steps = train_two_steps(proxy, vllm, model_dir, tmp_path, questions, lora_rank=0, batch=len(first))
    assert (
        "input embeddings frozen (--freeze-embeddings auto: tied to the output layer)"
        in (tmp_path / "trainer.log").read_text()
    )
    assert_agreement(steps, "full")


def train_two_steps(proxy, vllm, model_dir: Path, tmp_path: Path, questions: list[str], *, lora_rank: int, batch: int):
    """`trainwire train --max-steps 2`: step 1 on the sessions recorded so far (served by the base model), then
    sessions recorded while v1 is served, for step 2. The steps' metrics."""
    db = proxy.db_url
    ckpt = tmp_path / "ckpt"
    log_path = tmp_path / "trainer.log"
    proc, log = _trainer(db, vllm, model_dir, ckpt, log_path, lora_rank=lora_rank, steps=2, batch=batch)
    try:
        _wait_version(proxy, 1)
        second = record_sessions(proxy, "b", questions, GROUP)
        assert proc.wait(timeout=900) == 0, log_path.read_text(errors="replace")[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = log_path.read_text(errors="replace")
    print("\n".join(line for line in out.splitlines() if line.startswith("[trainwire train]")))
    assert "WARNING" not in out
    assert all(c["policy_version"] == 1 for sid in second for c in dbread.calls(db, sid))
    return {r["step"]: r["metrics"] for r in dbread.rows(db, TrainStep.__table__)}


def assert_agreement(steps: dict[int, dict], kind: str) -> None:
    for step, served in ((1, "the converted base model"), (2, f"the published {kind} weights (v1)")):
        m = steps[step]
        print(
            f"agreement, step {step} on {served}: mean |dlogp| {m['agreement/mean_abs_dlogp']:.2e}, "
            f"max {m['agreement/max_abs_dlogp']:.2e}, {m['agreement/tokens']:.0f} tokens"
        )
        assert m["agreement/mean_abs_dlogp"] <= AGREEMENT_TOLERANCE


def test_agreement_max_stops_a_trainer_that_is_not_the_served_model(proxy, vllm, model_dir, tmp_path):
    """The trainer loads weights that are not the ones vLLM serves (here: the rows of the embeddings, tied to the
    output layer, shuffled, as a wrong conversion would): its first step is refused before the optimizer, with one line naming the likely causes; exit 3,
    nothing published, every session given back untrained."""
    import torch
    from safetensors.torch import load_file, save_file

    wrong = tmp_path / "wrong-model"
    wrong.mkdir()
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (wrong / f.name).symlink_to(f)
    weights = load_file(str(model_dir / "model.safetensors"))
    # Scaling the embeddings by 1.5 gave 0.86 nats once and 0.27 another time: shuffled rows are wrong for every token.
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = embed[
        torch.randperm(embed.shape[0], generator=torch.Generator().manual_seed(0))
    ]
    save_file(weights, str(wrong / "model.safetensors"), metadata={"format": "pt"})
    del weights

    sids = record_sessions(proxy, "w", QUESTIONS[:1], GROUP)
    log_path = tmp_path / "trainer.log"
    proc, log = _trainer(proxy.db_url, vllm, wrong, tmp_path / "ckpt", log_path, lora_rank=8, steps=1, batch=GROUP)
    try:
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = log_path.read_text(errors="replace")
    errors = [line for line in out.splitlines() if line.startswith("trainwire train: error:")]
    print(errors)
    assert code == 3, out[-3000:]
    assert len(errors) == 1 and "above --agreement-max 0.5" in errors[0]
    for cause in ("tied embeddings", "transformers", "--temperature", "processed_logprobs"):
        assert cause in errors[0]
    assert "Traceback" not in out
    assert not dbread.rows(proxy.db_url, TrainStep.__table__)
    sessions = {s["id"]: s for s in dbread.sessions(proxy.db_url)}
    assert all(sessions[sid]["status"] == "open" and sessions[sid]["claimed_by"] is None for sid in sids)

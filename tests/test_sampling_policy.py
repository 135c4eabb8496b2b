"""`--sampling-policy enforce|reject|record` against a real vLLM (CPU build, `--logprobs-mode processed_logprobs`),
with the real proxy on Postgres and the real SDKs. One vLLM for the module; one proxy per policy, one after another.

A trainable call's tokens must come from the distribution the trainer recomputes (softmax(logits / --temperature)).
The client here asks for temperature 0.7 (and for greedy decoding):

* enforce (the default): the call is sent at the training temperature, says so in `X-Trainwire-Sampling`, records
  requested and effective settings, and its behaviour log-probs equal the trainer's own recomputation (verl's
  engine, `PolicyEngine.logprobs`) to 1e-3, which they would not at 0.7;
* reject: a 400 in the API's own error format naming temperature, and nothing reaches vLLM or the store;
* record: answered as asked, recorded with an untrainable_reason that names the temperature, and left out of the
  samples the trainer builds;
* an evaluation call (`X-Trainwire-Train: false`) is never touched, under any policy: its log-probs are the 0.7 ones.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import dbread
from tests.support.vllm_support import require_vllm_venv, serve, tiny_model
from trainwire.store.db import make_engine

pytestmark = pytest.mark.vllm

require_vllm_venv()

TRAIN_T = 1.0
NEUTRAL = {
    "temperature": TRAIN_T,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me a short story about a robot who counts birds."},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory, "sampling-policy")


@pytest.fixture(scope="module")
def vllm(model_dir, tmp_path_factory):
    proc = serve(model_dir, tmp_path_factory, "sampling-policy", "tiny")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def trainer_logprobs(model_dir):
    """The trainer's log-probs of a recorded call at the training temperature: verl's engine, as `trainwire train`
    builds it (full model, --temperature 1.0)."""
    from trainwire.rl.engine import EngineConfig, PolicyEngine
    from trainwire.rl.samples import Sample

    engine = PolicyEngine(EngineConfig(model_path=str(model_dir), lora_rank=0, temperature=TRAIN_T))

    def of(row: dict) -> list[float]:
        n = len(row["completion_token_ids"])
        sample = Sample(
            prompt_ids=list(row["prompt_token_ids"]),
            response_ids=list(row["completion_token_ids"]),
            response_mask=[1] * n,
            old_logprobs=list(row["logprobs"]),
            advantage=0.0,
        )
        return engine.logprobs([sample])[0]

    return of


@pytest.fixture(scope="module")
def hf_logprobs(model_dir):
    """Plain transformers log_softmax(logits / T) of the recorded tokens, for temperatures other than the trainer's."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def of(row: dict, temperature: float) -> list[float]:
        prompt, completion = list(row["prompt_token_ids"]), list(row["completion_token_ids"])
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits.float()[0]
        p = len(prompt)
        logp = (logits[p - 1 : p - 1 + len(completion)] / temperature).log_softmax(-1)
        return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()

    return of


def start(start_proxy, vllm, pg_url, tmp_path, policy: str):
    p = start_proxy(
        "--upstream",
        vllm.url,
        "--database-url",
        pg_url,
        "--journal-dir",
        str(tmp_path / f"j-{policy}"),
        "--sampling-policy",
        policy,
        "--temperature",
        str(TRAIN_T),
    )
    p.db_url = pg_url
    return p


def chat(proxy, session: str, *, train: bool = True, **body):
    """A chat completion through the OpenAI SDK; returns the raw response (headers) and the recorded row."""
    from openai import OpenAI

    headers = {"X-Session-Id": session, **({} if train else {"X-Trainwire-Train": "false"})}
    sdk = OpenAI(base_url=proxy.v1, api_key="unused", max_retries=0, timeout=120)
    raw = sdk.chat.completions.with_raw_response.create(
        model="policy", messages=MESSAGES, max_tokens=16, extra_headers=headers, **body
    )
    assert raw.status_code == 200
    return raw, row_of(proxy, session, raw.headers["x-call-id"])


def row_of(proxy, session: str, call_id: str, timeout: float = 10.0) -> dict:
    deadline = time.time() + timeout
    while True:
        rows = [r for r in dbread.calls(proxy.db_url, session) if r["id"] == call_id]
        if rows:
            return rows[0]
        assert time.time() < deadline, f"call {call_id} not recorded"
        time.sleep(0.05)


def max_diff(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def assert_untouched_evaluation_call(proxy, hf_logprobs, trainer_logprobs) -> None:
    """X-Trainwire-Train: false at temperature 0.7: sent as asked (its log-probs are the 0.7 ones, not the
    trainer's), no header, recorded as an evaluation call."""
    raw, row = chat(proxy, f"eval-{uuid.uuid4().hex[:8]}", train=False, temperature=0.7)
    assert "x-trainwire-sampling" not in raw.headers
    # It says why it is not trained, and that reason is the header, not its temperature.
    assert row["trainable"] is False
    assert row["untrainable_reason"] == "evaluation call (X-Trainwire-Train: false)"
    assert row["sampling"] == {"requested": {"temperature": 0.7}}
    assert max_diff(row["logprobs"], hf_logprobs(row, 0.7)) < 1e-3
    assert max_diff(row["logprobs"], trainer_logprobs(row)) > 1e-2


async def _claimed_samples(db_url: str):
    from trainwire.rl.transitions import build_samples
    from trainwire.store import claims

    engine = make_engine(db_url)
    try:
        batch = await claims.claim_batch(engine, worker_id="test-inspect", batch_size=8, settle_s=0)
        built = build_samples(batch)
        await claims.release(engine, [s.id for s in batch], worker_id="test-inspect")
        return built
    finally:
        await engine.dispose()


# ------------------------------------------------------------------------------------------------------- tests


def test_enforce(start_proxy, vllm, pg_url, tmp_path, trainer_logprobs, hf_logprobs):
    proxy = start(start_proxy, vllm, pg_url, tmp_path, "enforce")
    raw, row = chat(proxy, "enforce-1", temperature=0.7)
    assert raw.headers["x-trainwire-sampling"] == "enforced temperature"
    assert row["request"]["temperature"] == 0.7  # the client's request, as it sent it
    assert row["sampling"] == {"requested": {"temperature": 0.7}, "effective": NEUTRAL, "enforced": ["temperature"]}
    assert row["trainable"] is True and row["untrainable_reason"] is None
    # Sampled at the training temperature: vLLM's processed log-probs are the trainer's, not the 0.7 ones.
    same, other = max_diff(row["logprobs"], trainer_logprobs(row)), max_diff(row["logprobs"], hf_logprobs(row, 0.7))
    print(f"enforce: max |vLLM - trainer at 1.0| {same:.1e}, max |vLLM - log_softmax(logits/0.7)| {other:.3f}")
    assert same < 1e-3 and other > 1e-2
    assert max_diff(hf_logprobs(row, TRAIN_T), trainer_logprobs(row)) < 1e-3  # the two recomputations agree

    # Greedy decoding is enforced too (it has no sampling log-probs at all), and so are top_p and friends.
    raw, row = chat(proxy, "enforce-1", temperature=0, top_p=0.5, frequency_penalty=0.3)
    assert raw.headers["x-trainwire-sampling"] == "enforced temperature,top_p,frequency_penalty"
    assert row["sampling"]["effective"] == NEUTRAL and row["untrainable_reason"] is None
    assert max_diff(row["logprobs"], trainer_logprobs(row)) < 1e-3
    # Nothing asked: nothing enforced, every setting still sent explicitly.
    raw, row = chat(proxy, "enforce-1")
    assert "x-trainwire-sampling" not in raw.headers
    assert row["sampling"] == {"requested": {}, "effective": NEUTRAL}
    assert [r["seq"] for r in dbread.calls(proxy.db_url, "enforce-1")] == [0, 1, 2]

    # The translated APIs go through the same policy.
    r = httpx.post(
        f"{proxy.url}/v1/responses",
        headers={"X-Session-Id": "enforce-2"},
        timeout=60,
        json={"model": "policy", "input": "Tell me a story.", "temperature": 0.7, "max_output_tokens": 8},
    )
    assert r.status_code == 200 and r.headers["x-trainwire-sampling"] == "enforced temperature"
    assert r.json()["temperature"] == 0.7  # the Responses object echoes the request
    r = httpx.post(
        f"{proxy.url}/v1/messages",
        headers={"X-Session-Id": "enforce-2"},
        timeout=60,
        json={
            "model": "policy",
            "max_tokens": 8,
            "temperature": 0.7,
            "messages": [{"role": "user", "content": "Tell me a story."}],
        },
    )
    assert r.status_code == 200 and r.headers["x-trainwire-sampling"] == "enforced temperature"
    rows = dbread.wait_calls(proxy.db_url, 2, "enforce-2")
    assert sorted(x["kind"] for x in rows) == ["messages", "responses"]
    for x in rows:
        assert x["sampling"]["effective"]["temperature"] == TRAIN_T and x["sampling"]["enforced"] == ["temperature"]
        assert max_diff(x["logprobs"], trainer_logprobs(x)) < 1e-3

    # A strict tool (the OpenAI Agents SDK marks every tool so) would be decoded under a grammar: sent without
    # strict, said so, and the call stays trainable; the Responses API's strict tools go the same way.
    tool = {"type": "function", "name": "calculator", "parameters": {"type": "object", "properties": {}}}
    r = httpx.post(
        f"{proxy.url}/v1/responses",
        headers={"X-Session-Id": "enforce-3"},
        timeout=60,
        json={"model": "policy", "input": "What is 2+2?", "max_output_tokens": 8, "tools": [{**tool, "strict": True}]},
    )
    assert r.status_code == 200 and r.headers["x-trainwire-sampling"] == "enforced tools.strict"
    row = dbread.wait_calls(proxy.db_url, 1, "enforce-3")[0]
    assert row["trainable"] is True and row["sampling"]["enforced"] == ["tools.strict"]
    assert max_diff(row["logprobs"], trainer_logprobs(row)) < 1e-3

    assert_untouched_evaluation_call(proxy, hf_logprobs, trainer_logprobs)


def test_reject(start_proxy, vllm, pg_url, tmp_path, trainer_logprobs, hf_logprobs):
    from openai import BadRequestError, OpenAI

    proxy = start(start_proxy, vllm, pg_url, tmp_path, "reject")
    sdk = OpenAI(
        base_url=proxy.v1, api_key="unused", max_retries=0, timeout=60, default_headers={"X-Session-Id": "reject-1"}
    )
    with pytest.raises(BadRequestError) as refused:
        sdk.chat.completions.create(model="policy", messages=MESSAGES, max_tokens=8, temperature=0.7)
    err = refused.value.body
    assert refused.value.status_code == 400
    assert (err["param"], err["code"], err["type"]) == (
        "temperature",
        "sampling_not_trainable",
        "invalid_request_error",
    )
    assert "temperature 0.7" in err["message"] and "temperature=1.0" in err["message"]
    with pytest.raises(BadRequestError) as greedy:
        sdk.chat.completions.create(model="policy", messages=MESSAGES, max_tokens=8, temperature=0)
    assert "greedy decoding" in greedy.value.body["message"] and greedy.value.body["param"] == "temperature"

    r = httpx.post(
        f"{proxy.url}/v1/responses",
        headers={"X-Session-Id": "reject-1"},
        timeout=60,
        json={"model": "policy", "input": "Hi", "temperature": 0.7, "max_output_tokens": 8},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(
        f"{proxy.url}/v1/messages",
        headers={"X-Session-Id": "reject-1"},
        timeout=60,
        json={"model": "policy", "max_tokens": 8, "temperature": 0.7, "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"  # Anthropic's shape
    assert "temperature 0.7" in r.json()["error"]["message"]

    # Nothing was forwarded: no call of the session was recorded at all; then a training-temperature call is served.
    raw, row = chat(proxy, "reject-1", temperature=1.0)
    assert "x-trainwire-sampling" not in raw.headers and row["untrainable_reason"] is None
    assert [(r["seq"], r["status_code"]) for r in dbread.calls(proxy.db_url, "reject-1")] == [(0, 200)]
    assert row["sampling"] == {"requested": {"temperature": 1.0}, "effective": NEUTRAL}

    assert_untouched_evaluation_call(proxy, hf_logprobs, trainer_logprobs)  # evaluation calls are not refused


def test_record(start_proxy, vllm, pg_url, tmp_path, trainer_logprobs, hf_logprobs):
    proxy = start(start_proxy, vllm, pg_url, tmp_path, "record")
    session = f"record-{uuid.uuid4().hex[:8]}"
    plain_raw, plain = chat(proxy, session)
    raw, warm = chat(proxy, session, temperature=0.7)
    greedy_raw, greedy = chat(proxy, session, temperature=0)
    for r in (plain_raw, raw, greedy_raw):
        assert "x-trainwire-sampling" not in r.headers
    assert plain["untrainable_reason"] is None
    # Sent as asked, and said so in the record.
    assert warm["sampling"]["requested"] == {"temperature": 0.7}
    assert warm["sampling"]["effective"] == {**NEUTRAL, "temperature": 0.7} and "enforced" not in warm["sampling"]
    assert warm["untrainable_reason"] == "sampling: temperature 0.7 differs from the training value 1.0"
    assert warm["trainable"] is True  # an agent call of the policy, just not one to train on
    assert max_diff(warm["logprobs"], hf_logprobs(warm, 0.7)) < 1e-3
    assert max_diff(warm["logprobs"], trainer_logprobs(warm)) > 1e-2
    assert greedy["sampling"]["effective"]["temperature"] == 0
    assert "greedy decoding" in greedy["untrainable_reason"]

    # The trainer leaves both out of its samples and keeps the session's plain call.
    r = httpx.post(f"{proxy.url}/reward", json={"session_id": session, "reward": 1.0}, timeout=30)
    assert r.status_code == 200, r.text
    built = asyncio.run(_claimed_samples(proxy.db_url))
    assert built.call_ids == [(plain["id"],)]
    assert built.counters["skipped_untrainable"] == 2
    (sample,) = built.samples
    assert sample.response_ids == plain["completion_token_ids"]

    assert_untouched_evaluation_call(proxy, hf_logprobs, trainer_logprobs)

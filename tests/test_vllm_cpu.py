"""Real vLLM (CPU build) behaviour the project relies on.

One vLLM server is started for the whole module (about 40-50 s), serving the
tiny random model from ``demo.tiny_model``.  Every test talks to it over HTTP
and checks the exact response shapes documented in docs/vllm-cpu.md.

Skipped when the vLLM venv is missing (run scripts/setup_vllm_venv.sh); set
TRAINWIRE_REQUIRE_VLLM=1 (CI) to turn that skip into a failure.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.vllm_support import require_vllm_venv, serve, tiny_model

MODEL = "tiny"
BOS_ID = 1
EOS_ID = 2

pytestmark = pytest.mark.vllm

require_vllm_venv()


# --------------------------------------------------------------------------- http


class Http:
    def __init__(self, url: str):
        self.url = url

    def request(self, method: str, path: str, body=None, timeout: float = 60.0):
        """Return (status, parsed JSON or text)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, body=None, timeout: float = 60.0):
        return self.request("POST", path, body, timeout)

    def chat(self, **body) -> dict:
        body.setdefault("model", MODEL)
        status, r = self.post("/v1/chat/completions", body)
        assert status == 200, r
        return r

    def stream_chat(self, **body) -> list:
        """Return the decoded SSE events; the last one is the string '[DONE]'."""
        body = dict(body, stream=True)
        body.setdefault("model", MODEL)
        req = urllib.request.Request(
            self.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        events = []
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
            assert r.headers.get("Content-Type", "").startswith("text/event-stream")
            for raw in r:
                line = raw.decode().rstrip("\r\n")
                if not line:
                    continue
                assert line.startswith("data: "), line
                payload = line[len("data: ") :]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
        return events


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory, "vllm-cpu")


@pytest.fixture(scope="module")
def vllm(model_dir, tmp_path_factory):
    proc = serve(model_dir, tmp_path_factory, "vllm-cpu", MODEL)
    try:
        yield proc
    finally:
        proc.stop()
        assert not proc.alive()


@pytest.fixture(scope="module")
def http(vllm) -> Http:
    return Http(vllm.url)


@pytest.fixture(autouse=True)
def _server_still_alive(request):
    yield
    if "vllm" in request.fixturenames:
        proc = request.getfixturevalue("vllm")
        assert proc.alive(), f"vLLM died during the test; log tail:\n{proc.log_tail()}"


def make_lora_adapter(model_dir: Path, out_dir: Path, *, rank: int, seed: int) -> Path:
    """A PEFT LoRA adapter on q_proj/v_proj with non-zero B (so outputs change)."""
    pytest.importorskip("peft")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: the adapter would be a no-op
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(out_dir)
    assert (out_dir / "adapter_model.safetensors").is_file()
    return out_dir


def make_perturbed_copy(model_dir: Path, out_dir: Path, *, scale: float = 0.05, seed: int = 5) -> Path:
    """A full copy of the model directory with every weight tensor perturbed."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out_dir)
    sd = load_file(out_dir / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    sd = {k: (v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)).contiguous() for k, v in sd.items()}
    save_file(sd, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 plus 3?"},
]
# Longer than one KV block, so a stale prefix cache would be visible.
LONG_MESSAGES = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 12}]


def greedy(http: Http, *, model: str = MODEL, messages=MESSAGES, max_tokens: int = 6):
    r = http.chat(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,
        return_token_ids=True,
    )
    ch = r["choices"][0]
    return ch["token_ids"], [c["logprob"] for c in ch["logprobs"]["content"]]


def max_abs_diff(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- tests


def test_models_lists_served_name(http):
    status, r = http.get("/v1/models")
    assert status == 200
    base = [m for m in r["data"] if m["id"] == MODEL]
    assert len(base) == 1, r
    assert base[0]["max_model_len"] == 1024
    assert base[0]["parent"] is None


def test_chat_returns_token_ids_and_logprobs(http):
    r = http.chat(
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        return_token_ids=True,
    )
    # prompt_token_ids: top level of the response (not per choice).
    prompt_ids = r["prompt_token_ids"]
    assert isinstance(prompt_ids, list) and all(isinstance(t, int) for t in prompt_ids)
    assert prompt_ids[0] == BOS_ID  # the chat template starts with bos
    assert r["usage"]["prompt_tokens"] == len(prompt_ids)
    # ... and equal to what /tokenize renders for the same messages.
    status, tok = http.post("/tokenize", {"model": MODEL, "messages": MESSAGES, "add_generation_prompt": True})
    assert status == 200 and tok["tokens"] == prompt_ids

    (choice,) = r["choices"]
    ids = choice["token_ids"]
    content = choice["logprobs"]["content"]
    assert isinstance(ids, list) and len(ids) >= 1
    assert len(ids) == len(content) == r["usage"]["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert len(ids) == 8
    for tid, lp in zip(ids, content):
        assert isinstance(tid, int) and 0 <= tid < 512
        assert set(lp) >= {"token", "logprob", "bytes", "top_logprobs"}
        assert -50 < lp["logprob"] <= 0
        assert len(lp["top_logprobs"]) == 3
        # greedy: the chosen token is the most likely one
        assert lp["top_logprobs"][0]["logprob"] == pytest.approx(lp["logprob"], abs=1e-5)
        assert lp["logprob"] >= max(t["logprob"] for t in lp["top_logprobs"]) - 1e-5
        assert sum(math.exp(t["logprob"]) for t in lp["top_logprobs"]) <= 1 + 1e-4

    # Deterministic: the same greedy request gives the same tokens and logprobs.
    again = http.chat(messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, return_token_ids=True)
    assert again["choices"][0]["token_ids"] == ids
    assert (
        max_abs_diff(
            [c["logprob"] for c in again["choices"][0]["logprobs"]["content"]], [c["logprob"] for c in content]
        )
        < 1e-4
    )


def test_logprobs_are_processed_temperature_scaled(http):
    """--logprobs-mode processed_logprobs: logprobs are log_softmax(logits / T)."""

    def first_position(temperature):
        r = http.chat(
            messages=MESSAGES,
            max_tokens=1,
            temperature=temperature,
            seed=0,
            logprobs=True,
            top_logprobs=5,
            return_tokens_as_token_ids=True,  # token strings become "token_id:<id>"
        )
        top = r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        assert all(t["token"].startswith("token_id:") for t in top)
        return {t["token"]: t["logprob"] for t in top}

    t1, t2 = first_position(1.0), first_position(2.0)
    common = sorted(set(t1) & set(t2), key=lambda k: -t1[k])
    assert len(common) >= 3
    a, b = common[0], common[-1]
    gap1, gap2 = t1[a] - t1[b], t2[a] - t2[b]
    assert gap1 > 0.05
    # raw logprobs would give gap2 == gap1; processed ones halve the gap at T=2
    assert gap2 == pytest.approx(gap1 / 2, rel=1e-3, abs=1e-4)


def test_streaming_token_ids_logprobs_and_usage(http):
    # What this vLLM build sends (observed, see docs/vllm-cpu.md):
    #  * event 1: choices=[{index, delta:{role:"assistant", content:""}, logprobs:null,
    #    finish_reason:null}] plus TOP-LEVEL "prompt_token_ids" (and "prompt_text": null).
    #  * one event per generated token: choices=[{index, delta:{content}, logprobs:{content:[1 entry]},
    #    finish_reason, token_ids:[1 id]}]; the last of them has finish_reason ("length"/"stop")
    #    and stop_reason.  delta.content may be "" (incomplete UTF-8 bytes) while token_ids is set.
    #  * with stream_options.include_usage: a final event with choices=[] and "usage"
    #    (without it there is no usage anywhere in the stream).
    #  * then "data: [DONE]".
    events = http.stream_chat(
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        return_token_ids=True,
        stream_options={"include_usage": True},
    )
    assert events[-1] == "[DONE]"
    events = events[:-1]
    first, usage_event, token_events = events[0], events[-1], events[1:-1]

    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert first["choices"][0]["logprobs"] is None
    prompt_ids = first["prompt_token_ids"]
    assert prompt_ids[0] == BOS_ID
    assert all("prompt_token_ids" not in e for e in events[1:])

    assert usage_event["choices"] == []
    usage = usage_event["usage"]

    ids, lps, text = [], [], ""
    for e in token_events:
        (ch,) = e["choices"]
        assert "usage" not in e or e["usage"] is None
        assert len(ch["token_ids"]) == len(ch["logprobs"]["content"]) >= 1
        ids += ch["token_ids"]
        lps += [c["logprob"] for c in ch["logprobs"]["content"]]
        text += ch["delta"].get("content") or ""
    assert token_events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert all(e["choices"][0]["finish_reason"] is None for e in token_events[:-1])
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert usage["completion_tokens"] == len(ids)

    # Same tokens, logprobs and text as the non-streaming request.
    r = http.chat(messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, return_token_ids=True)
    assert r["prompt_token_ids"] == prompt_ids
    assert r["choices"][0]["token_ids"] == ids
    assert max_abs_diff([c["logprob"] for c in r["choices"][0]["logprobs"]["content"]], lps) < 1e-4
    assert r["choices"][0]["message"]["content"] == text

    # Without include_usage no usage is sent at all.
    events = http.stream_chat(messages=MESSAGES, max_tokens=3, temperature=0, return_token_ids=True)
    assert events[-1] == "[DONE]"
    assert all(not e.get("usage") for e in events[:-1])
    assert all(e["choices"] for e in events[:-1])


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    }
]
TOOL_MESSAGES = [
    {"role": "system", "content": "You are a calculator."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "5"},
]


def test_tools_are_accepted_and_rendered(http):
    # Needs --enable-auto-tool-choice --tool-call-parser (start_vllm's default
    # tool_parser="hermes"); without them any request carrying "tools" is a 400.
    r = http.chat(
        messages=TOOL_MESSAGES, tools=TOOLS, max_tokens=4, temperature=0, logprobs=True, return_token_ids=True
    )
    (ch,) = r["choices"]
    assert len(ch["token_ids"]) == len(ch["logprobs"]["content"]) == r["usage"]["completion_tokens"]
    status, det = http.post("/detokenize", {"model": MODEL, "tokens": r["prompt_token_ids"]})
    assert status == 200
    prompt = det["prompt"]
    assert prompt.startswith("<|bos|><|im_start|>system\nYou are a calculator.\nYou can call these tools:\n")
    assert '"name": "add"' in prompt
    assert (
        '<|im_start|>assistant\n<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><|eos|><|im_end|>\n'
        in prompt
    )
    assert prompt.endswith("<|im_start|>tool call_1\n5<|im_end|>\n<|im_start|>assistant\n")


def test_eos_is_returned_in_token_ids(http):
    # logit_bias forces EOS; the EOS id is part of token_ids and of logprobs.content.
    r = http.chat(
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        return_token_ids=True,
        logit_bias={str(EOS_ID): 100},
    )
    (ch,) = r["choices"]
    assert ch["finish_reason"] == "stop"
    assert ch["token_ids"] == [EOS_ID]
    assert len(ch["logprobs"]["content"]) == 1
    # processed logprobs include the logit bias: EOS is certain
    assert ch["logprobs"]["content"][0]["logprob"] == pytest.approx(0.0, abs=1e-4)
    assert ch["message"]["content"] == ""


def test_runtime_lora_adapters(http, model_dir, tmp_path):
    base_ids, base_lps = greedy(http)
    adapters = {
        "tiny-lora-r8": make_lora_adapter(model_dir, tmp_path / "r8", rank=8, seed=1),
        "tiny-lora-r16": make_lora_adapter(model_dir, tmp_path / "r16", rank=16, seed=2),
    }
    for name, path in adapters.items():
        t0 = time.monotonic()
        status, r = http.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        assert status == 200, r
        assert r == f"Success: LoRA adapter '{name}' added successfully."  # plain text, not JSON
        assert time.monotonic() - t0 < 5

    status, r = http.get("/v1/models")
    by_id = {m["id"]: m for m in r["data"]}
    for name, path in adapters.items():
        assert by_id[name]["parent"] == MODEL
        assert by_id[name]["root"] == str(path)

    outs = {}
    for name in adapters:
        r = http.chat(model=name, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, return_token_ids=True)
        assert r["model"] == name
        ch = r["choices"][0]
        assert len(ch["token_ids"]) == len(ch["logprobs"]["content"])
        outs[name] = [c["logprob"] for c in ch["logprobs"]["content"]], ch["token_ids"]
        lps, ids = outs[name]
        assert ids != base_ids or max_abs_diff(lps, base_lps) > 1e-3, f"adapter {name} did not change outputs"
    assert outs["tiny-lora-r8"] != outs["tiny-lora-r16"]

    # The base model is unaffected by loaded adapters.
    assert greedy(http) == (base_ids, pytest.approx(base_lps, abs=1e-4))

    # Loading again under the same name is refused (use a new name per version).
    status, r = http.post(
        "/v1/load_lora_adapter", {"lora_name": "tiny-lora-r8", "lora_path": str(adapters["tiny-lora-r8"])}
    )
    assert status == 400 and "already been loaded" in r["error"]["message"]

    # Unloading removes it from /v1/models; requests for it then 404.
    status, r = http.post("/v1/unload_lora_adapter", {"lora_name": "tiny-lora-r16"})
    assert status == 200, r
    assert "tiny-lora-r16" not in {m["id"] for m in http.get("/v1/models")[1]["data"]}
    status, r = http.post("/v1/chat/completions", {"model": "tiny-lora-r16", "messages": MESSAGES, "max_tokens": 1})
    assert status == 404, r
    assert r["error"]["type"] == "NotFoundError"


def test_reload_weights_changes_outputs(http, model_dir, tmp_path):
    perturbed = make_perturbed_copy(model_dir, tmp_path / "perturbed")
    base = greedy(http, messages=LONG_MESSAGES, max_tokens=4)
    try:
        t0 = time.monotonic()
        status, r = http.post(
            "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(perturbed)}}
        )
        reload_s = time.monotonic() - t0
        assert status == 200, r
        assert r == {"results": [None]}  # one entry per worker
        assert reload_s < 10
        # reload_weights does NOT reset the prefix cache; without this, a prompt
        # sharing cached blocks is answered with KV computed by the old weights.
        status, r = http.post("/reset_prefix_cache")
        assert status == 200 and r == {"success": True}
        new = greedy(http, messages=LONG_MESSAGES, max_tokens=4)
        assert new[0] != base[0] or max_abs_diff(new[1], base[1]) > 1e-3, "weights did not change"
        # and the new weights are used consistently
        assert greedy(http, messages=LONG_MESSAGES, max_tokens=4) == (new[0], pytest.approx(new[1], abs=1e-4))
    finally:
        status, r = http.post(
            "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(model_dir)}}
        )
        assert status == 200, r
        assert http.post("/reset_prefix_cache")[0] == 200
    # Back on the original weights: exactly the original outputs.
    restored = greedy(http, messages=LONG_MESSAGES, max_tokens=4)
    assert restored == (base[0], pytest.approx(base[1], abs=1e-4))


def test_reset_prefix_cache(http):
    status, r = http.post("/reset_prefix_cache")
    assert status == 200 and r == {"success": True}
    # GET is not allowed
    assert http.get("/reset_prefix_cache")[0] == 405


def test_weight_version(http):
    status, r = http.get("/weight_info")
    assert status == 200 and set(r) == {"weight_version"}
    status, r = http.post("/update_weight_version", {"new_version": "step-7"})
    assert status == 200 and r == {"success": True, "new_version": "step-7"}
    assert http.get("/weight_info") == (200, {"weight_version": "step-7"})
    # the body must be an object with new_version; vLLM turns FastAPI's
    # validation error into 400 (not 422)
    assert http.post("/update_weight_version", {"version": "x"})[0] == 400


def test_pause_keep_and_resume(http):
    assert http.get("/is_paused") == (200, {"is_paused": False})
    status, r = http.post("/pause?mode=keep")
    assert status == 200 and r == {"status": "paused"}
    result = {}
    try:
        assert http.get("/is_paused") == (200, {"is_paused": True})

        def call():
            result["r"] = http.post(
                "/v1/chat/completions",
                {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "temperature": 0},
            )

        t = threading.Thread(target=call, daemon=True)
        t.start()
        t.join(1.5)
        assert "r" not in result, "request finished while the engine was paused (mode=keep)"
    finally:
        status, r = http.post("/resume")
    assert status == 200 and r == {"status": "resumed"}
    t.join(30)
    assert result["r"][0] == 200, result
    assert result["r"][1]["usage"]["completion_tokens"] >= 1
    assert http.get("/is_paused") == (200, {"is_paused": False})
    # an unknown mode is rejected by validation (400, like all validation errors)
    assert http.post("/pause?mode=bogus")[0] == 400
    assert http.get("/is_paused") == (200, {"is_paused": False})

"""The training engine (rl/engine/, rl/advantages.py) against real verl on CPU.

Every check is computed, not mocked: HF forward passes give the reference log-probs, the PPO loss
is recomputed by hand, exports are loaded back with PEFT / transformers.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("verl")
pytest.importorskip("peft")

from trainwire.rl.advantages import compute_advantages, policy_loss_names  # noqa: E402
from trainwire.rl.engine import EngineConfig, PolicyEngine  # noqa: E402
from trainwire.rl.samples import Sample  # noqa: E402

CLIP = 0.2
CLIP_C = 3.0


# ---------------------------------------------------------------------- fixtures


def _build_minimal_model(out_dir: Path) -> Path:
    """Fallback when demo/tiny_model.py is unavailable: a random tiny Llama + a GPT-2-style
    byte-level tokenizer trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["hello world", "the answer is four", "what is two plus two"],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    try:
        from demo.tiny_model import build_tiny_model
    except ImportError:  # pragma: no cover - only before demo/tiny_model.py exists
        return _build_minimal_model(out)
    return build_tiny_model(out, seed=0)


@pytest.fixture(scope="session")
def hf_model(model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def hf_logprobs(model, sample: Sample) -> torch.Tensor:
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(ids).logits.float()[0]
    p = len(sample.prompt_ids)
    logp = logits[p - 1 : p - 1 + len(sample.response_ids)].log_softmax(-1)
    return logp.gather(-1, torch.tensor(sample.response_ids)[:, None])[:, 0]


def make_samples() -> list[Sample]:
    """Different prompt and response lengths (exercises left/right padding), one merged
    trajectory with masked 'tool' tokens in the middle, mixed advantages and weights."""
    return [
        Sample([1, 40, 41, 42, 43], [50, 51, 52], [1, 1, 1], [0.0] * 3, advantage=1.0),
        Sample([1, 60, 61], [70, 71, 72, 73, 74, 75], [1, 1, 0, 0, 1, 1], [0.0] * 6, advantage=-0.7, weight=0.5),
        Sample([1, 80], [90, 91], [1, 1], [0.0] * 2, advantage=0.4, weight=2.0),
    ]


def with_old_logprobs(samples: list[Sample], lps: list[torch.Tensor], shift: list[list[float]]) -> list[Sample]:
    out = []
    for s, lp, sh in zip(samples, lps, shift):
        old = [float(a) + b if m else None for a, b, m in zip(lp.tolist(), sh, s.response_mask)]
        out.append(Sample(s.prompt_ids, s.response_ids, s.response_mask, old, s.advantage, s.weight))
    return out


def weights_of(engine: PolicyEngine) -> dict[str, torch.Tensor]:
    return engine.state_dict()


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k} differs by {(a[k] - b[k]).abs().max()}"


@pytest.fixture(scope="module")
def full_engine(model_path) -> PolicyEngine:
    return PolicyEngine(EngineConfig(model_path=str(model_path), lr=1e-4, micro_batch_size=2, seed=0))


# ---------------------------------------------------------------------- (b) log-probs


def test_logprobs_match_hf(model_path, hf_model):
    engine = PolicyEngine(EngineConfig(model_path=str(model_path), micro_batch_size=2))
    samples = make_samples()
    got = engine.logprobs(samples)
    for s, g in zip(samples, got):
        want = hf_logprobs(hf_model, s)
        assert len(g) == len(s.response_ids)
        assert torch.allclose(torch.tensor(g), want, atol=1e-5), (g, want)


# ---------------------------------------------------------------------- (a) loss


def hand_ppo_loss(samples: list[Sample], new_lps: list[torch.Tensor]) -> float:
    """verl's vanilla dual-clip PPO loss, token-mean, with per-sample weights as multipliers."""
    total, tokens = 0.0, 0
    for s, lp in zip(samples, new_lps):
        for t, (m, new) in enumerate(zip(s.response_mask, lp.tolist())):
            if not m:
                continue
            a = s.advantage
            ratio = math.exp(new - s.old_logprobs[t])
            clipped = min(max(ratio, 1 - CLIP), 1 + CLIP)
            loss = max(-a * ratio, -a * clipped)
            if a < 0:
                loss = min(loss, -a * CLIP_C)
            total += s.weight * loss
            tokens += 1
    return total / tokens


def test_step_loss_equals_hand_computed_ppo(model_path, hf_model):
    engine = PolicyEngine(
        EngineConfig(
            model_path=str(model_path),
            lr=1e-4,
            micro_batch_size=2,
            clip_ratio_low=CLIP,
            clip_ratio_high=CLIP,
            clip_ratio_c=CLIP_C,
        )
    )
    base = make_samples()
    lps = [hf_logprobs(hf_model, s) for s in base]
    # Behaviour log-probs off the current policy, so some ratios fall outside the clip range
    # and the dual-clip bound (ratio > 3 with a negative advantage) is hit once.
    shifts = [[0.05, -0.3, 0.1], [0.0, 0.0, 9.0, 9.0, -1.5, 0.1], [0.25, -0.02]]
    samples = with_old_logprobs(base, lps, shifts)
    want = hand_ppo_loss(samples, lps)
    metrics = engine.step(samples)
    assert metrics["loss"] == pytest.approx(want, abs=1e-5)
    assert metrics["pg_loss"] == pytest.approx(want, abs=1e-5)
    assert 0.0 < metrics["clip_frac"] < 1.0
    assert metrics["tokens"] == 9.0 and metrics["samples"] == 3.0
    for key in ("grad_norm", "lr", "entropy", "ppo_kl", "step_time_s"):
        assert math.isfinite(metrics[key]), key
    assert metrics["lr"] == pytest.approx(1e-4)


def test_weight_is_a_loss_multiplier(model_path, hf_model):
    """Scaling one sample's weight scales exactly its share of the loss (rollout_is_weights)."""
    engine = PolicyEngine(EngineConfig(model_path=str(model_path), lr=0.0, micro_batch_size=4))
    base = make_samples()
    lps = [hf_logprobs(hf_model, s) for s in base]
    shifts = [[0.1, -0.1, 0.0], [0.0] * 6, [0.0, 0.3]]
    losses = []
    for w in (1.0, 3.0):
        samples = with_old_logprobs(base, lps, shifts)
        for s in samples:
            s.weight = 1.0
        samples[0].weight = w
        losses.append(engine.step(samples)["loss"])
        assert losses[-1] == pytest.approx(hand_ppo_loss(samples, lps), abs=1e-5)
    only_first = with_old_logprobs(base, lps, shifts)
    share = hand_ppo_loss(only_first[:1], lps[:1]) * 3 / 9  # first sample: 3 of 9 tokens
    assert losses[1] - losses[0] == pytest.approx(2 * share, abs=1e-5)


# ---------------------------------------------------------------------- (a2) off-policy correction

# Behaviour (recorded) and proximal log-probs as shifts from the current policy's: the proximal - behaviour gaps
# put three weights above the cap (e^1.0, e^1.3, e^0.9 > 2) and the ratios on both sides of the clip range.
BEHAVIOUR_SHIFT = [[0.05, -0.3, 0.1], [0.0, 0.0, 9.0, 9.0, -1.5, 0.1], [0.25, -0.02]]
PROXIMAL_SHIFT = [[0.0, 0.0, -0.5], [1.0, 0.0, 0.0, 0.0, -0.2, 0.4], [0.1, 0.88]]
CAP = 2.0


def off_policy_samples(hf_model) -> tuple[list[Sample], list[torch.Tensor]]:
    base = make_samples()
    lps = [hf_logprobs(hf_model, s) for s in base]
    samples = with_old_logprobs(base, lps, BEHAVIOUR_SHIFT)
    for s, lp, sh in zip(samples, lps, PROXIMAL_SHIFT):
        s.proximal_logprobs = [float(a) + b if m else None for a, b, m in zip(lp.tolist(), sh, s.response_mask)]
    return samples, lps


def hand_corrected_loss(samples: list[Sample], new_lps: list[torch.Tensor], mode: str) -> tuple[float, float, int]:
    """verl's vanilla dual-clip PPO loss, token-mean, each token weighted by its sample's weight times
    min(pi_proximal / pi_behaviour, CAP); the ratio is against the behaviour (tis) or the proximal (decoupled)
    log-probs. Returns the loss, the largest applied weight and the number of tokens truncated."""
    total, tokens, wmax, truncated = 0.0, 0, 0.0, 0
    for s, lp in zip(samples, new_lps):
        assert s.proximal_logprobs is not None
        for t, (m, new) in enumerate(zip(s.response_mask, lp.tolist())):
            if not m:
                continue
            behaviour, proximal = s.old_logprobs[t], s.proximal_logprobs[t]
            raw = math.exp(proximal - behaviour)
            w = min(raw, CAP)
            truncated += raw > CAP
            wmax = max(wmax, w)
            ratio = math.exp(new - (behaviour if mode == "tis" else proximal))
            clipped = min(max(ratio, 1 - CLIP), 1 + CLIP)
            a = s.advantage
            loss = max(-a * ratio, -a * clipped)
            if a < 0:
                loss = min(loss, -a * CLIP_C)
            total += s.weight * w * loss
            tokens += 1
    return total / tokens, wmax, truncated


@pytest.mark.parametrize("mode", ["tis", "decoupled"])
def test_corrected_loss_equals_hand_computation(model_path, hf_model, mode):
    engine = PolicyEngine(
        EngineConfig(
            model_path=str(model_path),
            lr=1e-4,
            micro_batch_size=2,
            clip_ratio_low=CLIP,
            clip_ratio_high=CLIP,
            clip_ratio_c=CLIP_C,
            off_policy=mode,
            is_cap=CAP,
        )
    )
    samples, lps = off_policy_samples(hf_model)
    want, wmax, truncated = hand_corrected_loss(samples, lps, mode)
    # the two modes really differ on this batch, and both differ from the uncorrected loss
    other = hand_corrected_loss(samples, lps, "decoupled" if mode == "tis" else "tis")[0]
    assert abs(want - other) > 1e-2 and abs(want - hand_ppo_loss(samples, lps)) > 1e-2
    metrics = engine.step(samples)
    assert metrics["pg_loss"] == pytest.approx(want, abs=1e-5)
    assert truncated == 3
    assert metrics["offpolicy/truncated_share"] == pytest.approx(truncated / 9)
    assert metrics["offpolicy/is_max"] == pytest.approx(wmax) == CAP
    raw = [
        math.exp(p - b)
        for sp, sb, s in zip(PROXIMAL_SHIFT, BEHAVIOUR_SHIFT, samples)
        for p, b, m in zip(sp, sb, s.response_mask)
        if m
    ]
    assert metrics["offpolicy/is_raw_max"] == pytest.approx(max(raw), rel=1e-5)
    assert 0.0 < metrics["clip_frac"] < 1.0


def test_decoupled_on_policy_batch_is_todays_step(model_path, hf_model):
    """A batch served entirely by the weights being trained: its proximal log-probs are its recorded ones
    (with_proximal), every weight is exactly 1 and the update is bit for bit the one drop makes."""
    from trainwire.rl.offpolicy import with_proximal

    cfg = dict(model_path=str(model_path), lr=1e-3, micro_batch_size=2, seed=3)
    drop, decoupled = PolicyEngine(EngineConfig(**cfg)), PolicyEngine(EngineConfig(**cfg, off_policy="decoupled"))
    assert_same_weights(weights_of(drop), weights_of(decoupled))
    base = make_samples()
    lps = [hf_logprobs(hf_model, s) for s in base]
    samples = with_old_logprobs(base, lps, [[1e-6 * (i + 1) for i in range(len(s.response_ids))] for s in base])
    trainer_lps = decoupled.logprobs(samples)
    corrected = with_proximal(samples, trainer_lps, [True] * len(samples))
    a, b = drop.step(samples), decoupled.step(corrected)
    assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    assert b["offpolicy/is_mean"] == 1.0 and b["offpolicy/truncated_share"] == 0.0
    assert_same_weights(weights_of(drop), weights_of(decoupled), atol=0.0)
    # the trainer's own log-probs as proximal would not be exactly today's step
    off = with_proximal(samples, trainer_lps, [False] * len(samples))
    assert any(p != o for s, t in zip(samples, off) for p, o in zip(s.old_logprobs, t.proximal_logprobs or []) if p)


# ---------------------------------------------------------------------- (c) direction


def test_steps_move_logprobs_with_advantage_sign(model_path):
    engine = PolicyEngine(EngineConfig(model_path=str(model_path), lr=2e-5, micro_batch_size=2, seed=1))
    pos = Sample([1, 40, 41], [50, 51, 52, 53], [1, 1, 1, 1], [0.0] * 4, advantage=1.0)
    neg = Sample([1, 60, 61], [70, 71, 72], [1, 1, 1], [0.0] * 3, advantage=-1.0)
    before = [sum(lp) for lp in engine.logprobs([pos, neg])]
    for _ in range(3):
        cur = engine.logprobs([pos, neg])  # on-policy: old = current log-probs
        pos.old_logprobs, neg.old_logprobs = cur[0], cur[1]
        engine.step([pos, neg])
    after = [sum(lp) for lp in engine.logprobs([pos, neg])]
    assert after[0] > before[0] + 0.1, (before, after)
    assert after[1] < before[1] - 0.1, (before, after)


def test_frozen_embeddings_stay_and_the_rest_trains(model_path):
    """--freeze-embeddings: a full fine-tuning step moves every other weight it reaches and leaves the input
    embeddings exactly as they were (AdamW skips a parameter without a gradient, moments included)."""
    from trainwire.rl.engine.config import freezes_embeddings

    engine = PolicyEngine(
        EngineConfig(model_path=str(model_path), lr=1e-3, micro_batch_size=2, seed=2, freeze_embeddings=True)
    )
    before = {k: v.clone() for k, v in weights_of(engine).items()}
    pos = Sample([1, 40, 41], [50, 51, 52, 53], [1, 1, 1, 1], [0.0] * 4, advantage=1.0)
    pos.old_logprobs = engine.logprobs([pos])[0]
    engine.step([pos])
    after = weights_of(engine)
    embed = [k for k in before if "embed_tokens" in k]
    assert embed and all(torch.equal(before[k], after[k]) for k in embed)
    moved = [k for k in before if k not in embed and not torch.equal(before[k], after[k])]
    assert any("lm_head" in k for k in moved) and any("layers.0." in k for k in moved), moved
    # auto: on only for a model whose output layer is tied to the embeddings (the tiny model's is not)
    assert freezes_embeddings("auto", str(model_path)) is False
    assert freezes_embeddings("on", str(model_path)) and not freezes_embeddings("off", str(model_path))


# ---------------------------------------------------------------------- (d) masking


def test_masked_tokens_have_no_effect(model_path, hf_model):
    """Trailing masked tokens change nothing (same loss, same update as without them), and the
    recorded log-probs / advantages under mask 0 are ignored."""
    cfg = dict(model_path=str(model_path), lr=1e-3, micro_batch_size=2)
    lp = hf_logprobs(hf_model, Sample([1, 40, 41], [50, 51, 52, 53, 54], [1] * 5, [0.0] * 5, 1.0))
    lp3 = lp[:3].tolist()
    short = Sample([1, 40, 41], [50, 51, 52], [1, 1, 1], [lp3[0] + 0.1, lp3[1] - 0.1, lp3[2]], 1.0)
    other = Sample(
        [1, 60], [70, 71], [1, 1], hf_logprobs(hf_model, Sample([1, 60], [70, 71], [1, 1], [0, 0], 0)).tolist(), -0.5
    )
    # Same trajectory plus two tool tokens the model did not generate, with garbage behaviour
    # log-probs (vLLM reports none for them).
    longer = Sample([1, 40, 41], [50, 51, 52, 53, 54], [1, 1, 1, 0, 0], short.old_logprobs + [-99.0, None], 1.0)

    a = PolicyEngine(EngineConfig(**cfg))
    w0 = weights_of(a)
    m_a = a.step([short, other])
    b = PolicyEngine(EngineConfig(**cfg))
    m_b = b.step([longer, other])
    assert m_a["loss"] == pytest.approx(m_b["loss"], abs=1e-6)
    assert m_a["tokens"] == m_b["tokens"] == 5.0
    assert m_a["grad_norm"] == pytest.approx(m_b["grad_norm"], rel=1e-5)
    # Same update up to float noise (different padded shapes); Adam's first step is ~lr*sign(g),
    # so compare against the update size rather than bit-for-bit.
    wa, wb = weights_of(a), weights_of(b)
    diff = torch.cat([((wa[k] - w0[k]) - (wb[k] - w0[k])).abs().flatten() for k in w0])
    assert (diff > 1e-7).float().mean() < 1e-3
    assert diff.mean() < 1e-3 * cfg["lr"]

    # Masked positions in the middle: their old log-probs must not matter either.
    mid1 = Sample([1, 40], [50, 51, 52, 53], [1, 0, 0, 1], [-1.0, -5.0, -5.0, -1.0], 0.5)
    mid2 = Sample([1, 40], [50, 51, 52, 53], [1, 0, 0, 1], [-1.0, 3.0, None, -1.0], 0.5)
    m1, m2 = a.step([mid1]), b.step([mid2])
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)


# ---------------------------------------------------------------------- (e) export


def test_full_export_loads_in_transformers(full_engine, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = make_samples()
    cur = full_engine.logprobs(s)
    for x, lp in zip(s, cur):
        x.old_logprobs = lp
    full_engine.step(s)
    out = full_engine.export(tmp_path / "full")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    AutoTokenizer.from_pretrained(str(out))
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    engine_sd = weights_of(full_engine)
    loaded_sd = loaded.state_dict()
    assert set(engine_sd) == set(loaded_sd)
    assert_same_weights(engine_sd, {k: loaded_sd[k] for k in engine_sd})
    # and the exported model computes the engine's log-probs
    for x, lp in zip(s, full_engine.logprobs(s)):
        assert torch.allclose(hf_logprobs(loaded.eval(), x), torch.tensor(lp), atol=1e-5)
    # re-export replaces the folder atomically
    full_engine.export(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_lora_export_is_a_peft_adapter(model_path, hf_model, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    engine = PolicyEngine(
        EngineConfig(model_path=str(model_path), lora_rank=4, lora_alpha=8, lr=1e-2, micro_batch_size=2, kl_coef=0.05)
    )
    s = make_samples()
    m = None
    for _ in range(2):
        for x, lp in zip(s, engine.logprobs(s)):
            x.old_logprobs = lp
        m = engine.step(s)
    assert "kl" in m and m["kl"] > 0  # KL to the base model (adapter disabled) after an update
    # only LoRA tensors train
    sd = weights_of(engine)
    base = hf_model.state_dict()
    for k, v in sd.items():
        if "lora_" not in k:
            hf_key = k.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(v, base[hf_key]), k

    out = engine.export(tmp_path / "adapter")
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
    assert Path(cfg["base_model_name_or_path"]) == Path(model_path).resolve()
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.") and ".default" not in k for k in keys)
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)

    base_model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base_model, str(out)).merge_and_unload().eval()
    for x, lp in zip(s, engine.logprobs(s)):
        assert torch.allclose(hf_logprobs(merged, x), torch.tensor(lp), atol=1e-4)
    # the adapter really changed the model
    assert not torch.allclose(hf_logprobs(hf_model, s[0]), hf_logprobs(merged, s[0]), atol=1e-3)
    # reference log-probs = base model
    ref = engine.logprobs(s, reference=True)
    for x, lp in zip(s, ref):
        assert torch.allclose(hf_logprobs(hf_model, x), torch.tensor(lp), atol=1e-5)


# ---------------------------------------------------------------------- (f) checkpoints


def test_checkpoint_restores_model_and_optimizer(full_engine, tmp_path):
    s = make_samples()

    def on_policy_step():
        for x, lp in zip(s, full_engine.logprobs(s)):
            x.old_logprobs = lp
        full_engine.step(s)

    on_policy_step()
    step_at_save = full_engine.global_step
    path = full_engine.save_checkpoint(tmp_path / "ckpt")
    saved = weights_of(full_engine)
    on_policy_step()
    after_one = weights_of(full_engine)
    on_policy_step()
    assert not torch.equal(weights_of(full_engine)["lm_head.weight"], saved["lm_head.weight"])

    assert full_engine.load_checkpoint(path) == path.resolve()
    assert full_engine.global_step == step_at_save
    assert_same_weights(weights_of(full_engine), saved)
    # Adam moments came back too: the same step lands on the same weights.
    on_policy_step()
    assert_same_weights(weights_of(full_engine), after_one, atol=1e-7)


def test_checkpoint_dir_tracks_latest(model_path, tmp_path):
    cfg = EngineConfig(
        model_path=str(model_path),
        lora_rank=2,
        lr=1e-3,
        micro_batch_size=2,
        checkpoint_dir=str(tmp_path / "ckpts"),
        keep_checkpoints=2,
    )
    engine = PolicyEngine(cfg)
    assert engine.latest_checkpoint() is None and engine.load_checkpoint() is None
    s = make_samples()
    for x, lp in zip(s, engine.logprobs(s)):
        x.old_logprobs = lp
    engine.step(s)
    first = engine.save_checkpoint()
    engine.step(s)
    second = engine.save_checkpoint()
    assert first.name == "global_step_1" and second.name == "global_step_2"
    assert engine.latest_checkpoint() == second
    engine.step(s)
    third = engine.save_checkpoint()
    assert sorted(p.name for p in (tmp_path / "ckpts").glob("global_step_*")) == [second.name, third.name]
    want = weights_of(engine)
    # a restarted process: fresh engine, resume from the latest checkpoint (LoRA-only state)
    fresh = PolicyEngine(cfg)
    assert fresh.load_checkpoint() == third.resolve() and fresh.global_step == 3
    assert_same_weights(weights_of(fresh), want)


# ---------------------------------------------------------------------- (g) advantages


def test_grpo_advantages_by_hand():
    scores = [1.0, 0.0, 0.5, 2.0, 3.0, 7.0]
    groups = ["a", "a", "a", "b", "b", "c"]
    got = compute_advantages(scores, groups, "grpo")
    want = []
    for s, g in zip(scores, groups):
        members = [x for x, h in zip(scores, groups) if h == g]
        if len(members) == 1:  # verl: a singleton group has mean 0, std 1
            want.append(s / (1 + 1e-6))
            continue
        # verl uses the sample (Bessel-corrected) standard deviation
        want.append((s - statistics.mean(members)) / (statistics.stdev(members) + 1e-6))
    assert got == pytest.approx(want, abs=1e-6)
    no_std = compute_advantages(scores, groups, "grpo", norm_adv_by_std_in_grpo=False)
    assert no_std[:3] == pytest.approx([0.5, -0.5, 0.0], abs=1e-6)


def test_rloo_advantages_by_hand():
    scores = [1.0, 0.0, 0.5, 2.0, 3.0]
    groups = ["a", "a", "a", "b", "b"]
    got = compute_advantages(scores, groups, "rloo")
    want = []
    for i, (s, g) in enumerate(zip(scores, groups)):
        others = [x for j, (x, h) in enumerate(zip(scores, groups)) if h == g and j != i]
        want.append(s - sum(others) / len(others))
    assert got == pytest.approx(want, abs=1e-6)


def test_reinforce_plus_plus_and_errors():
    scores = [1.0, 0.0, 0.5, 2.0]
    got = compute_advantages(scores, ["a", "a", "b", "b"], "reinforce_plus_plus")
    mean, std = statistics.mean(scores), statistics.stdev(scores)  # whitened over the batch
    assert got == pytest.approx([(s - mean) / math.sqrt(std**2 + 1e-8) for s in scores], abs=1e-5)
    with pytest.raises(ValueError, match="grpo"):
        compute_advantages(scores, ["a"] * 4, "no_such_estimator")
    with pytest.raises(ValueError):
        compute_advantages(scores, ["a"] * 3)
    assert {"vanilla", "gspo", "cispo"} <= set(policy_loss_names())
    with pytest.raises(ValueError, match="vanilla"):
        EngineConfig(model_path="x", policy_loss="no_such_loss")


# ---------------------------------------------------------------------- data parallel

_DP_SCRIPT = r"""
import json, os, sys
import torch
from trainwire.rl.engine import EngineConfig, PolicyEngine
from trainwire.rl.samples import Sample
samples = [Sample(**s) for s in json.loads(os.environ["TW_SAMPLES"])]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
engine = PolicyEngine(EngineConfig(model_path=os.environ["TW_MODEL"], lr=1e-4, micro_batch_size=2))
mine = samples[:2] if rank == 0 else samples[2:]  # uneven shards: 2 + 1 samples
metrics = engine.step(mine)
state = engine.state_dict()
if rank == 0:
    torch.save({"metrics": metrics, "state": state, "world": world}, os.environ["TW_OUT"])
"""


def test_torchrun_two_ranks_match_one_process(model_path, tmp_path):
    """The many-GPU path (torchrun, FSDP2 sharding, DP batch split) on 2 CPU ranks with gloo:
    uneven per-rank shards give the same loss, gradient norm and updated weights as one process
    training on the whole batch."""
    import os
    import subprocess
    import sys
    from dataclasses import asdict

    samples = [
        Sample([1, 40, 41, 42, 43], [50, 51, 52], [1, 1, 1], [-20.0] * 3, 1.0),
        Sample([1, 60, 61], [70, 71, 72, 73, 74, 75], [1, 1, 0, 0, 1, 1], [-20.0] * 6, -0.7, 0.5),
        Sample([1, 80], [90, 91], [1, 1], [-20.0] * 2, 0.4, 2.0),
    ]
    script = tmp_path / "dp.py"
    script.write_text(_DP_SCRIPT)
    out = tmp_path / "rank0.pt"
    repo = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        PYTHONPATH=str(repo),
        TW_MODEL=str(model_path),
        TW_OUT=str(out),
        TW_SAMPLES=json.dumps([asdict(s) for s in samples]),
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    import signal
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        str(script),
    ]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        output, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    result = torch.load(out)
    assert result["world"] == 2

    engine = PolicyEngine(EngineConfig(model_path=str(model_path), lr=1e-4, micro_batch_size=2))
    metrics = engine.step(samples)
    assert result["metrics"]["samples"] == 3.0 and result["metrics"]["tokens"] == 9.0
    assert result["metrics"]["loss"] == pytest.approx(metrics["loss"], abs=1e-6)
    assert result["metrics"]["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-5)
    assert_same_weights(result["state"], weights_of(engine), atol=1e-6)


def test_a_child_process_forms_its_own_group_despite_inherited_master_port():
    """`trainwire train` started from a process that holds a group (a test runner, a notebook) inherits
    MASTER_PORT; binding it again fails with EADDRINUSE unless a lone process picks its own port."""
    import subprocess
    import sys

    from trainwire.rl.cpu_platform import init_single_process_group

    init_single_process_group()
    parent_port = os.environ["MASTER_PORT"]
    code = (
        "import os; from trainwire.rl.cpu_platform import init_single_process_group as init; init(); "
        "print(os.environ['MASTER_PORT'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        cwd=Path(__file__).resolve().parent.parent,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() != parent_port


def test_importing_the_trainer_changes_nothing_until_an_engine_is_built(model_path):
    """Importing rl/ (the engine package included) leaves verl's platform alone; PolicyEngine(cfg) activates the
    CPU platform itself, before verl.workers' engines (which read the device name on import) are loaded."""
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "import trainwire.rl.engine, trainwire.rl.worker, trainwire.rl.transitions, trainwire.rl.cpu_platform\n"
        "from verl.plugin.platform import platform_manager as pm\n"
        "print('TW', os.environ.get('VERL_PLATFORM'), pm._current_platform is None,\n"
        "      any(m.startswith('verl.workers.engine') for m in sys.modules))\n"
        "from trainwire.rl.engine import EngineConfig, PolicyEngine\n"
        "cfg = EngineConfig(model_path=sys.argv[1], micro_batch_size=2)\n"
        "print('TW', os.environ.get('VERL_PLATFORM'), pm._current_platform is None)\n"
        "PolicyEngine(cfg)\n"
        "print('TW', os.environ.get('VERL_PLATFORM'), type(pm._current_platform).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_ENGINE_DEVICE", "MASTER_PORT")}
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    imported, configured, built = [line[3:] for line in out.stdout.splitlines() if line.startswith("TW ")]
    assert imported == "None True False"
    assert configured == "None True"  # EngineConfig checks the loss name in verl's registry, nothing more
    if not torch.cuda.is_available():
        assert built == "cpu PlatformCPU"

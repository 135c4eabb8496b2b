"""Whose run a checkpoint directory holds (rl/identity.py), on hand-made directories: the manifest is written and
read back, each difference (store, base model config or weights, LoRA settings, full fine-tuning) is named in the
one refusal line, a directory with checkpoints but no manifest is refused, a moved copy of the same base model is
the same model, and --fresh moves everything aside without deleting anything. No torch, no database."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from trainwire.rl.identity import (
    MANIFEST,
    PREVIOUS_RUNS,
    Refused,
    RunIdentity,
    check_checkpoint_dir,
    has_checkpoints,
    model_fingerprint,
    move_aside,
    write_manifest,
)

CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 512,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
}


def make_model(path: Path, *, weights: bytes = b"\x01" * 300_000, **config) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**CONFIG, **config}))
    (path / "model.safetensors").write_bytes(weights)
    (path / "tokenizer.json").write_text("{}")
    return path


def identity(model: Path, *, store="a" * 32, rank=8, alpha=16, targets="all-linear") -> RunIdentity:
    return RunIdentity.of(
        store_id=store, model=str(model), lora_rank=rank, lora_alpha=alpha, lora_target_modules=targets
    )


def add_checkpoint(ckpt: Path, step: int = 3) -> None:
    (ckpt / "state" / f"global_step_{step}").mkdir(parents=True)
    (ckpt / "state" / "latest_checkpointed_iteration.txt").write_text(str(step))


def refusal(ckpt: Path, ident: RunIdentity) -> str:
    with pytest.raises(Refused) as exc:
        check_checkpoint_dir(ckpt, ident, shown="./ckpt")
    assert exc.value.code == 2
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("--checkpoint-dir ./ckpt ")
    assert message.endswith("; use a new --checkpoint-dir, or --fresh to start over there")
    return message


@pytest.fixture
def model(tmp_path) -> Path:
    return make_model(tmp_path / "base")


def test_a_first_start_finds_nothing_and_writes_the_manifest(tmp_path, model):
    ckpt = tmp_path / "ckpt"
    ident = identity(model)
    assert check_checkpoint_dir(ckpt, ident) is None  # not even there yet
    write_manifest(ckpt, ident)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["store_id"] == "a" * 32
    assert manifest["base_model"]["path"] == str(model.resolve())
    assert manifest["base_model"]["config"] == {k: v for k, v in CONFIG.items() if k != "rms_norm_eps"}
    assert len(manifest["base_model"]["weights_sha256"]) == 64
    assert manifest["training"] == {
        "kind": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_target_modules": "all-linear",
    }
    assert datetime.fromisoformat(manifest["created_at"]).tzinfo is not None
    assert manifest["trainwire_version"] and manifest["format"] == 1
    add_checkpoint(ckpt)
    assert check_checkpoint_dir(ckpt, identity(model)) == manifest  # the same run: resume


def test_another_store_is_refused(tmp_path, model):
    ckpt = tmp_path / "ckpt"
    write_manifest(ckpt, identity(model, store="a1b2c3d4" * 4))
    add_checkpoint(ckpt)
    msg = refusal(ckpt, identity(model, store="c3d4e5f6" * 4))
    assert "holds a run of another store (store a1b2c3d4a1b2 vs this database's c3d4e5f6c3d4)" in msg


def test_lora_and_full_fine_tuning_are_not_the_same_run(tmp_path, model):
    ckpt = tmp_path / "ckpt"
    write_manifest(ckpt, identity(model))
    assert "a run of LoRA rank 8 alpha 16 on all-linear (this start: full fine-tuning)" in refusal(
        ckpt, identity(model, rank=0)
    )
    assert "(this start: LoRA rank 16 alpha 16 on all-linear)" in refusal(ckpt, identity(model, rank=16))
    assert "(this start: LoRA rank 8 alpha 32 on all-linear)" in refusal(ckpt, identity(model, alpha=32))
    assert "(this start: LoRA rank 8 alpha 16 on k_proj,q_proj)" in refusal(
        ckpt, identity(model, targets=["q_proj", "k_proj"])
    )
    full = tmp_path / "full"
    write_manifest(full, identity(model, rank=0))
    assert "a run of full fine-tuning (this start: LoRA rank 8" in refusal(full, identity(model))
    # full fine-tuning has no LoRA settings to differ in
    assert check_checkpoint_dir(full, identity(model, rank=0, alpha=99)) is not None


def test_another_base_model_by_config_or_by_weights(tmp_path, model):
    ckpt = tmp_path / "ckpt"
    write_manifest(ckpt, identity(model))
    deeper = make_model(tmp_path / "deeper", num_hidden_layers=4)
    assert f"another base model ({model.resolve()}, not {deeper.resolve()}: num_hidden_layers 2 vs 4)" in refusal(
        ckpt, identity(deeper)
    )
    reseeded = make_model(tmp_path / "reseeded", weights=b"\x01" * 150_000 + b"\x02" + b"\x01" * 149_999)
    assert "another base model" in refusal(ckpt, identity(reseeded))
    assert "same config, other weights" in refusal(ckpt, identity(reseeded))


def test_the_same_model_moved_elsewhere_is_the_same_model(tmp_path, model):
    ckpt = tmp_path / "ckpt"
    write_manifest(ckpt, identity(model))
    moved = make_model(tmp_path / "mnt" / "models" / "base")  # same files
    assert check_checkpoint_dir(ckpt, identity(moved)) is not None


def test_a_model_id_is_compared_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr("trainwire.rl.identity._hub_config", lambda model: None)  # no network in unit tests
    fp = model_fingerprint("org/some-model")
    assert fp == {"path": "org/some-model", "config": None, "weights_sha256": None}
    ckpt = tmp_path / "ckpt"
    write_manifest(ckpt, identity(Path("org/some-model")))
    assert check_checkpoint_dir(ckpt, identity(Path("org/some-model"))) is not None
    assert "another base model (org/some-model, not org/other-model)" in refusal(
        ckpt, identity(Path("org/other-model"))
    )


def test_every_difference_in_one_line(tmp_path, model):
    ckpt = tmp_path / "ckpt"
    write_manifest(ckpt, identity(model))
    msg = refusal(ckpt, identity(make_model(tmp_path / "other", vocab_size=1024), store="b" * 32, rank=0))
    assert msg.count("another store") == 1 and "another base model" in msg and "(this start: full fine-tuning)" in msg
    assert ", and of " in msg


def test_checkpoints_without_a_manifest_are_refused(tmp_path, model):
    ckpt = tmp_path / "ckpt"
    add_checkpoint(ckpt)
    assert "holds checkpoints but no trainwire_run.json (written by an older trainwire)" in refusal(
        ckpt, identity(model)
    )
    # only the tracker file, or only a step folder, is a checkpoint too
    (ckpt / "state" / "global_step_3").rmdir()
    assert has_checkpoints(ckpt)
    (ckpt / "state" / "latest_checkpointed_iteration.txt").unlink()
    assert not has_checkpoints(ckpt)
    # published exports and TensorBoard logs alone are nothing to resume
    (ckpt / "published" / "v3").mkdir(parents=True)
    (ckpt / "tensorboard").mkdir()
    assert check_checkpoint_dir(ckpt, identity(model)) is None


def test_an_unreadable_manifest_is_refused(tmp_path, model):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / MANIFEST).write_text("{not json")
    assert "has a trainwire_run.json this trainwire cannot read" in refusal(ckpt, identity(model))
    (ckpt / MANIFEST).write_text(json.dumps({"format": 99}))
    assert "cannot read" in refusal(ckpt, identity(model))


def test_fresh_moves_everything_aside_and_deletes_nothing(tmp_path, model):
    ckpt = tmp_path / "ckpt"
    write_manifest(ckpt, identity(model))
    add_checkpoint(ckpt)
    (ckpt / "published" / "v3").mkdir(parents=True)
    (ckpt / "published" / "v3" / "adapter_model.safetensors").write_bytes(b"x")
    when = datetime(2026, 12, 1, 10, 30, 5, tzinfo=UTC)
    dest = move_aside(ckpt, now=when)
    assert dest == ckpt / PREVIOUS_RUNS / "20261201T103005Z"
    assert sorted(p.name for p in ckpt.iterdir()) == [PREVIOUS_RUNS]
    assert sorted(p.name for p in dest.iterdir()) == sorted([MANIFEST, "published", "state"])
    assert (dest / "published" / "v3" / "adapter_model.safetensors").read_bytes() == b"x"
    assert not has_checkpoints(ckpt) and check_checkpoint_dir(ckpt, identity(model, rank=0)) is None
    # a second --fresh in the same second keeps both earlier runs, and never moves previous-runs into itself
    write_manifest(ckpt, identity(model, rank=0))
    again = move_aside(ckpt, now=when)
    assert again == ckpt / PREVIOUS_RUNS / "20261201T103005Z-2"
    assert (again / MANIFEST).is_file() and (dest / MANIFEST).is_file()
    assert move_aside(ckpt) is None  # nothing left to move
    assert move_aside(tmp_path / "never-made") is None

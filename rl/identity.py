"""Whose run a checkpoint directory holds: ``CHECKPOINT_DIR/trainwire_run.json``, written at a run's first start and
compared at every start, before the engine is built.

A checkpoint directory is resumed only by the run that made it: the same store (its ``store_id``,
:mod:`trainwire.store.identity`), the same base model (path or id, a fingerprint of its config and a sample of its
weight files) and the same kind of training (LoRA rank, alpha and target modules, or full fine-tuning). Anything
else would resume a global step, an optimizer state or an adapter that belongs to something else: a second store
would continue the first one's step count, and a full fine-tuning start on a LoRA run's directory dies inside verl
loading a LoRA-only checkpoint. So a difference stops the trainer with one line naming what differs, exit code 2.

A directory with checkpoints but no manifest (written by a trainwire before manifests) cannot be checked and is
refused the same way. ``--fresh`` starts over: everything the directory holds moves into
``CHECKPOINT_DIR/previous-runs/<UTC time>/`` (a rename inside the directory, so it works when the directory is a
mounted volume that cannot itself be renamed; nothing is deleted) and the run starts at step 0.

No torch here: the check runs before the training stack is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST",
    "PREVIOUS_RUNS",
    "Refused",
    "RunIdentity",
    "check_checkpoint_dir",
    "has_checkpoints",
    "model_fingerprint",
    "move_aside",
    "write_manifest",
]

MANIFEST = "trainwire_run.json"
PREVIOUS_RUNS = "previous-runs"
FORMAT = 1
STATE_DIR = "state"  # the engine's checkpoints (rl/engine/checkpoint.py) under CHECKPOINT_DIR
TRACKER = "latest_checkpointed_iteration.txt"  # verl's tracker file, as in rl/engine/checkpoint.py
# What makes two base models the same model to the trainer, from config.json (top level, or text_config for
# models that nest it).
CONFIG_KEYS = (
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WINDOW = 1 << 16


class Refused(Exception):
    """The trainer must not start; the message is the one line to print, ``code`` the exit code (2: what it was
    told to do cannot be done; 1: something it needs is not there now)."""

    def __init__(self, message: str, *, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint directory's run is: compared field by field, recorded with more."""

    store_id: str
    base_model: dict[str, Any]  # model_fingerprint()
    training: dict[str, Any]  # {"kind": "lora", "lora_rank", "lora_alpha", "lora_target_modules"} | {"kind": "full"}

    @classmethod
    def of(
        cls,
        *,
        store_id: str,
        model: str,
        lora_rank: int,
        lora_alpha: int,
        lora_target_modules: Any,
        fingerprint: dict[str, Any] | None = None,
    ) -> RunIdentity:
        training: dict[str, Any] = {"kind": "full"}
        if lora_rank > 0:
            targets = (
                sorted(lora_target_modules)
                if isinstance(lora_target_modules, (list, tuple, set))
                else lora_target_modules
            )
            training = {
                "kind": "lora",
                "lora_rank": lora_rank,
                "lora_alpha": lora_alpha,
                "lora_target_modules": targets,
            }
        return cls(store_id=store_id, base_model=fingerprint or model_fingerprint(model), training=training)

    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "store_id": self.store_id,
            "base_model": self.base_model,
            "training": self.training,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "trainwire_version": _version(),
        }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trainwire")
    except PackageNotFoundError:  # pragma: no cover - a checkout without an install
        return "unknown"


# ---------------------------------------------------------------------------------------------- base model


def model_fingerprint(model: str) -> dict[str, Any]:
    """``{"path", "config", "weights_sha256"}`` of a base model: its resolved path (or the id as given), the
    identifying fields of its config.json, and a digest of its weight files' names, sizes and three 64 KiB
    windows of each (start, which holds the header and first tensors, middle, end): cheap on a 100 GB model, and
    different for two checkpoints of one architecture. For a model id that is not a local directory the config
    comes from the Hugging Face cache when it is there, and there is no weight digest."""
    path = Path(model).expanduser()
    if path.is_dir():
        config = _read_json(path / "config.json")
        return {"path": str(path.resolve()), "config": _config_fields(config), "weights_sha256": _weights_digest(path)}
    return {"path": model, "config": _config_fields(_hub_config(model)), "weights_sha256": None}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _hub_config(model: str) -> dict[str, Any] | None:
    try:
        from huggingface_hub import hf_hub_download

        return _read_json(Path(hf_hub_download(model, "config.json")))
    except Exception:  # no hub library, no network, not a model id: verl will say what is wrong
        return None


def _config_fields(config: dict[str, Any] | None) -> dict[str, Any] | None:
    if config is None:
        return None
    text_config = config.get("text_config")
    nested: dict[str, Any] = text_config if isinstance(text_config, dict) else {}
    out = {}
    for key in CONFIG_KEYS:
        value = config.get(key, nested.get(key))
        if value is not None:
            out[key] = value
    return out


def _weights_digest(path: Path) -> str | None:
    files = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            for offset in sorted({0, max(0, size // 2 - _WINDOW // 2), max(0, size - _WINDOW)}):
                fh.seek(offset)
                digest.update(fh.read(_WINDOW))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- the directory


def has_checkpoints(ckpt_dir: Path) -> bool:
    state = Path(ckpt_dir) / STATE_DIR
    return (state / TRACKER).is_file() or any(d.is_dir() for d in state.glob("global_step_*"))


def move_aside(ckpt_dir: Path, *, now: datetime | None = None) -> Path | None:
    """``--fresh``: move everything ``ckpt_dir`` holds (but earlier runs moved aside) into
    ``ckpt_dir/previous-runs/<UTC time>/``. Returns that folder, or None when there was nothing to move."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    entries = [e for e in ckpt_dir.iterdir() if e.name != PREVIOUS_RUNS]
    if not entries:
        return None
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    dest = ckpt_dir / PREVIOUS_RUNS / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = ckpt_dir / PREVIOUS_RUNS / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for e in entries:
        os.replace(e, dest / e.name)
    return dest


def write_manifest(ckpt_dir: Path, identity: RunIdentity) -> Path:
    """Write the manifest (atomically: a reader never sees half of it). Returns its path."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(identity.manifest(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def check_checkpoint_dir(ckpt_dir: Path, identity: RunIdentity, *, shown: str | None = None) -> dict | None:
    """Raise :class:`Refused` when ``ckpt_dir`` holds another run than ``identity``'s, or checkpoints without a
    manifest. Returns the manifest found (same run: resume), or None (nothing there yet: a first start, which
    writes the manifest). ``shown``: the directory as the user gave it, for the message."""
    ckpt_dir = Path(ckpt_dir)
    where = f"--checkpoint-dir {shown if shown is not None else ckpt_dir}"
    fix = "use a new --checkpoint-dir, or --fresh to start over there"
    path = ckpt_dir / MANIFEST
    if not path.exists():
        if has_checkpoints(ckpt_dir):
            raise Refused(
                f"{where} holds checkpoints but no {MANIFEST} (written by an older trainwire), so whose run "
                f"they are cannot be checked; {fix}"
            )
        return None
    manifest = _read_json(path)
    if manifest is None or manifest.get("format") != FORMAT:
        raise Refused(f"{where} has a {MANIFEST} this trainwire cannot read; {fix}")
    differences = differ(manifest, identity)
    if differences:
        raise Refused(f"{where} holds a run of {', and of '.join(differences)}; {fix}")
    return manifest


def differ(manifest: dict[str, Any], identity: RunIdentity) -> list[str]:
    """What differs between a manifest and this start, each as what the directory's run is of."""
    out = []
    if manifest.get("store_id") != identity.store_id:
        out.append(
            f"another store (store {str(manifest.get('store_id'))[:12]} vs this database's {identity.store_id[:12]})"
        )
    base = _base_model_difference(manifest.get("base_model") or {}, identity.base_model)
    if base:
        out.append(base)
    trained, now = manifest.get("training") or {}, identity.training
    if trained != now:
        out.append(f"{_training(trained)} (this start: {_training(now)})")
    return out


def _base_model_difference(was: dict[str, Any], now: dict[str, Any]) -> str | None:
    where = f"{was.get('path')}, not {now.get('path')}"
    if was.get("config") and now.get("config") and was["config"] != now["config"]:
        keys = [k for k in CONFIG_KEYS if was["config"].get(k) != now["config"].get(k)]
        detail = ", ".join(f"{k} {was['config'].get(k)} vs {now['config'].get(k)}" for k in keys)
        return f"another base model ({where}: {detail})"
    if was.get("weights_sha256") and now.get("weights_sha256"):
        if was["weights_sha256"] != now["weights_sha256"]:
            return f"another base model ({where}: same config, other weights)"
        return None  # the same files, wherever they are now
    if was.get("path") != now.get("path"):
        return f"another base model ({where})"
    return None


def _training(t: dict[str, Any]) -> str:
    if t.get("kind") == "full":
        return "full fine-tuning"
    if t.get("kind") == "lora":
        return f"LoRA rank {t.get('lora_rank')} alpha {t.get('lora_alpha')} on {_modules(t.get('lora_target_modules'))}"
    return "an unknown kind of training"


def _modules(targets: Any) -> str:
    return ",".join(map(str, targets)) if isinstance(targets, list) else str(targets)

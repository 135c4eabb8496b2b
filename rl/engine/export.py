"""Weights vLLM can load, written from the live (possibly sharded) engine.

LoRA: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) for vLLM's
``/v1/load_lora_adapter``. Full fine-tuning: a complete HF model folder (config, safetensors shards, tokenizer
files from the base model) for vLLM's ``reload_weights``.

Gathering the tensors is collective under data parallelism (FSDP2 ``full_tensor``), so every rank runs the whole
export; only rank 0 writes. It writes into a temporary folder beside the target and renames it into place, so
vLLM never reads a half-written version.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from trainwire.rl.engine.config import EngineConfig
from trainwire.rl.engine.ranks import barrier, is_writer

__all__ = ["export_weights"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def export_weights(worker, cfg: EngineConfig, out_dir: Path) -> Path:
    """Write ``worker``'s weights into ``out_dir`` (replaced if it exists) and return it. Collective."""
    out_dir = Path(out_dir).resolve()
    tmp: Optional[Path] = None
    if is_writer():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if cfg.is_lora:
            _write_lora(worker, cfg, tmp)
        else:
            _write_full(worker, cfg, tmp)
        if tmp is not None:  # rank 0
            os.chmod(tmp, 0o755)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return out_dir


def _write_lora(worker, cfg: EngineConfig, tmp: Optional[Path]) -> None:
    """Every rank gathers the adapter tensors; with ``tmp`` None (not rank 0) nothing is written."""
    from safetensors.torch import save_file

    params, _ = worker.engine.get_per_tensor_param(base_sync_done=True)
    tensors = {}
    for name, tensor in params:
        # PEFT names, without the adapter-name segment vLLM and PEFT do not expect on disk.
        name = name.replace(".default.", ".")
        t = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        tensors[name] = t.detach().to("cpu").contiguous()
    if tmp is None:
        return
    module = worker.engine.module
    peft_model = getattr(module, "_fsdp_wrapped_module", module)
    peft_config = clean_peft_config(peft_model.peft_config["default"], cfg.model_path)
    peft_config.save_pretrained(str(tmp))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})


def _write_full(worker, cfg: EngineConfig, tmp: Optional[Path]) -> None:
    """Every rank gathers every tensor (the gather is collective); rank 0 streams them into shards in the base
    model's dtype and copies the base model's non-weight files (config, tokenizer, chat template)."""
    from transformers import AutoConfig

    src = Path(worker.model_config.local_path)
    hf_config = AutoConfig.from_pretrained(str(src), trust_remote_code=cfg.trust_remote_code)
    dtype = _config_dtype(hf_config)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    params, _ = worker.engine.get_per_tensor_param()
    shards = ShardWriter(tmp) if tmp is not None else None
    for name, tensor in params:
        t = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if shards is None:
            continue
        if tied and name == "lm_head.weight":
            continue
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(dtype)
        shards.add(name, t.contiguous())
    if shards is None or tmp is None:
        return
    shards.close()
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        if f.name.endswith(_WEIGHT_SUFFIXES) or f.name.endswith(".index.json"):
            continue
        shutil.copy2(f, tmp / f.name)


def clean_peft_config(peft_config, base_model_path: str):
    """A copy of the live PEFT config fit for disk: leaf target-module names, inference mode,
    and the base model recorded."""
    cfg = copy.deepcopy(peft_config)
    targets = cfg.target_modules
    if isinstance(targets, (set, list, tuple)):
        cfg.target_modules = sorted({t.split(".")[-1] for t in targets})
    cfg.base_model_name_or_path = (
        str(Path(base_model_path).resolve()) if Path(base_model_path).exists() else (base_model_path)
    )
    cfg.inference_mode = True
    return cfg


def _config_dtype(hf_config) -> torch.dtype:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


class ShardWriter:
    """Streams tensors into ``model-0000k-of-0000n.safetensors`` shards (HF layout)."""

    MAX_SHARD_BYTES = 5 * 1024**3

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.current and self.current_bytes + size > self.MAX_SHARD_BYTES:
            self._flush()
        self.current[name] = t
        self.current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f".shard-{len(self.files):05d}.safetensors"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def close(self) -> None:
        if self.current or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.files[0][0], self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.files, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

"""Shared by the tests that start a real vLLM (CPU build) from the cached venv."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from demo.tiny_model import build_tiny_model
from demo.vllm_server import start_vllm, venv_ready, vllm_venv
from tests.support.ports import free_port


def require_vllm_venv() -> None:
    """Call at module level: skips the module without the venv, or fails when TRAINWIRE_REQUIRE_VLLM is set."""
    if venv_ready():
        return
    if os.environ.get("TRAINWIRE_REQUIRE_VLLM"):
        raise RuntimeError(f"TRAINWIRE_REQUIRE_VLLM is set but there is no complete vLLM venv at {vllm_venv()}")
    pytest.skip(f"no vLLM venv at {vllm_venv()} (run scripts/setup_vllm_venv.sh)", allow_module_level=True)


def tiny_model(tmp_path_factory, name: str) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp(name) / "tiny")


def serve(model_dir: Path, tmp_path_factory, name: str, served_model_name: str):
    """Start vLLM with runtime LoRA and dev mode; yields the process and stops it afterwards."""
    log = tmp_path_factory.mktemp(f"{name}-log") / "vllm.log"
    proc = start_vllm(model_dir, free_port(), served_model_name=served_model_name, lora=True, log_path=log)
    print(f"vLLM started in {proc.startup_s:.1f} s at {proc.url} (log {log})")
    return proc


def real_model() -> Path:
    """The packaged SmolLM2-135M-Instruct as an HF folder (make real-model; materialized here when missing)."""
    from demo.real_model import materialize

    return materialize()

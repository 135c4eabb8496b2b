"""The coding-agent CLIs from npm, pinned, installed once into ~/.cache/trainwire/npm (TRAINWIRE_NPM_CACHE)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

# Pinned: a new release may send new fields (that is what tests/test_real_clients.py is for); bump on purpose.
CODEX = ("@openai/codex", "0.171.0", "codex")
CLAUDE_CODE = ("@anthropic-ai/claude-code", "2.1.332", "claude")


def cache_dir() -> Path:
    return Path(os.environ.get("TRAINWIRE_NPM_CACHE", Path.home() / ".cache" / "trainwire" / "npm"))


def installed(package: tuple[str, str, str]) -> Path:
    """The CLI's executable, installed with `npm install` at its pinned version if it is not there yet."""
    name, version, binary = package
    root = cache_dir()
    exe = root / "node_modules" / ".bin" / binary
    manifest = root / "node_modules" / name / "package.json"
    if exe.exists() and manifest.exists() and f'"version": "{version}"' in manifest.read_text():
        return exe
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed (apt-get install nodejs npm)")
    root.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(root), f"{name}@{version}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0 or not exe.exists():
        raise RuntimeError(f"npm install {name}@{version} failed: {(out.stdout + out.stderr)[-2000:]}")
    return exe

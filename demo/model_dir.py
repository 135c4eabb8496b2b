"""A locally built model folder (weights, tokenizer, chat template), written atomically with a marker that says
what it was built from, so a later run keeps an up-to-date build instead of rebuilding it.

Both demo models (:mod:`demo.tiny_model`, :mod:`demo.calc_model`) are made this way; vLLM and the trainer only
ever see a complete folder, because it appears with one ``os.replace``."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def is_current(out_dir: Path, marker: str, expected: dict[str, Any]) -> bool:
    """The folder was built with these marker values and still has every file it was built with."""
    try:
        info = json.loads((Path(out_dir) / marker).read_text())
    except (OSError, ValueError):
        return False
    if any(info.get(key) != value for key, value in expected.items()):
        return False
    return all((Path(out_dir) / f).is_file() for f in info.get("files", []))


def write(out_dir: Path, model: Any, tokenizer: Any, chat_template: str, marker: str, info: dict[str, Any]) -> Path:
    """Save ``model`` and ``tokenizer`` into ``out_dir``, replacing what was there; the marker gets ``info`` and
    the list of files."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a model folder is readable by all, like a downloaded one
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "tokenizer_config.json"  # transformers versions differ in where the template goes
        cfg = json.loads(cfg_path.read_text())
        cfg.setdefault("chat_template", chat_template)
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        if "model.safetensors" not in files or "tokenizer.json" not in files:
            raise RuntimeError(f"unexpected files after save: {files}")
        for name in files:
            os.chmod(tmp / name, 0o644)
        (tmp / marker).write_text(json.dumps({**info, "files": files}, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir

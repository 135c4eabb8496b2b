"""Checkpoints: what a restarted trainer resumes from.

verl's FSDP checkpoint manager (``TrainingWorker.save_checkpoint``) writes model, optimizer, LR scheduler and
RNG state, sharded per rank. Beside it rank 0 writes the engine's own state (global step and config), and, for
checkpoints under ``EngineConfig.checkpoint_dir``, verl's tracker file naming the newest ``global_step_<n>``
folder, replaced atomically so a crash mid-save leaves the previous checkpoint as the latest. Older folders are
pruned to ``keep_checkpoints``. Saving is collective under data parallelism; loading is done by every rank.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from trainwire.rl.engine.config import EngineConfig
from trainwire.rl.engine.ranks import barrier, is_writer

__all__ = ["checkpoint_path", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

ENGINE_STATE_FILE = "trainwire_engine.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"  # verl's tracker file name


def _root(cfg: EngineConfig) -> Path:
    if not cfg.checkpoint_dir:
        raise ValueError("EngineConfig.checkpoint_dir is not set")
    return Path(cfg.checkpoint_dir)


def checkpoint_path(cfg: EngineConfig, step: int) -> Path:
    return _root(cfg) / f"global_step_{step}"


def latest_checkpoint(cfg: EngineConfig) -> Optional[Path]:
    """The newest checkpoint under ``cfg.checkpoint_dir`` (verl's tracker file), or None."""
    if not cfg.checkpoint_dir:
        return None
    tracker = Path(cfg.checkpoint_dir) / LATEST_FILE
    if not tracker.is_file():
        return None
    path = checkpoint_path(cfg, int(tracker.read_text().strip()))
    return path if path.is_dir() else None


def save_checkpoint(worker, cfg: EngineConfig, global_step: int, ckpt_dir: Optional[Path] = None) -> Path:
    """Save ``worker``'s state as of ``global_step``; without ``ckpt_dir`` into
    ``cfg.checkpoint_dir/global_step_<n>``, updating the tracker and pruning. Collective."""
    use_tracker = ckpt_dir is None
    path = Path(ckpt_dir) if ckpt_dir is not None else checkpoint_path(cfg, global_step)
    path = path.resolve()
    worker.save_checkpoint(str(path), global_step=global_step)
    if is_writer():
        state = {"global_step": global_step, "config": asdict(cfg)}
        (path / ENGINE_STATE_FILE).write_text(json.dumps(state, indent=2, default=str) + "\n")
        if use_tracker:
            tracker = _root(cfg) / LATEST_FILE
            tmp = tracker.with_suffix(".tmp")
            tmp.write_text(str(global_step))
            os.replace(tmp, tracker)
            _prune(cfg, keep=path)
    barrier()
    return path


def _prune(cfg: EngineConfig, keep: Path) -> None:
    """Delete all but the newest ``cfg.keep_checkpoints`` global_step_* folders (also ones
    left by earlier processes); never the one just written."""
    n = cfg.keep_checkpoints
    if not n or n < 1:
        return
    steps = []
    for d in _root(cfg).glob("global_step_*"):
        suffix = d.name[len("global_step_") :]
        if d.is_dir() and suffix.isdigit():
            steps.append((int(suffix), d))
    for _, d in sorted(steps)[:-n]:
        if d.resolve() != keep.resolve():
            shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(worker, cfg: EngineConfig, ckpt_dir: Optional[Path] = None) -> Optional[tuple[Path, Optional[int]]]:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``worker`` (default: the latest one under
    ``cfg.checkpoint_dir``). Returns (the path loaded, its global step when recorded), or None if there was
    none."""
    path = Path(ckpt_dir) if ckpt_dir is not None else latest_checkpoint(cfg)
    if path is None:
        return None
    path = path.resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    worker.load_checkpoint(str(path), del_local_after_load=False)
    state_file = path / ENGINE_STATE_FILE
    step = None
    if state_file.is_file():
        step = int(json.loads(state_file.read_text()).get("global_step", 0))
    return path, step

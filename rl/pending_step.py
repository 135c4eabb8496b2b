"""Which sessions the step in progress trains, written beside the checkpoints before the step begins, so a trainer
killed at any moment can be resumed without counting a step twice.

A session becomes `trained` in the store only after the checkpoint that holds what was learned from it is saved;
a kill between the two leaves the sessions claimed. The next trainer (it holds the store's lease, so every claim
left is a dead trainer's) reads this file after loading the latest complete checkpoint:
- the checkpoint holds the step (its global step is at least the file's): the sessions are marked trained by that
  step, never trained again;
- it does not (the kill came before the checkpoint was complete): they are given back and trained by a later step.
Either way the global step, and so the version numbers, go on from the checkpoint: a version number once recorded
is never given to other weights (the next publish is numbered after the newest recorded version)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

NAME = "trainwire_pending_step.json"


@dataclass(frozen=True)
class PendingStep:
    step: int  # the global step the checkpoint will have once this step is saved
    worker_id: str
    sessions: list[str]


def write(checkpoint_dir: Path, pending: PendingStep) -> None:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint_dir / (NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(pending), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, checkpoint_dir / NAME)


def read(checkpoint_dir: Path) -> PendingStep | None:
    try:
        data = json.loads((checkpoint_dir / NAME).read_text())
        return PendingStep(int(data["step"]), str(data["worker_id"]), [str(s) for s in data["sessions"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear(checkpoint_dir: Path) -> None:
    try:
        (checkpoint_dir / NAME).unlink()
    except FileNotFoundError:
        pass

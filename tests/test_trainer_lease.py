"""One trainer per store (store/trainer_lease.py), on Postgres and SQLite: while a process holds the store's
trainer lease, `trainwire train` refuses to start with one line naming the holder (exit 2); the lease goes away the
moment its holder is SIGKILLed, with nothing to wait out.

The holder is a process of its own that takes the lease exactly as a trainer does (TrainerLease.acquire), so the
refusal is tested without building a model engine; the trainer is the real CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from trainwire.store.db import make_engine
from trainwire.store.trainer_lease import LeaseHeld, TrainerLease

ROOT = Path(__file__).resolve().parent.parent

HOLDER = """
import asyncio, sys
from trainwire.store.db import make_engine
from trainwire.store.trainer_lease import TrainerLease

async def main():
    lease = TrainerLease(make_engine(sys.argv[1]), "holder-host:" + str(__import__("os").getpid()))
    await lease.acquire()
    print("held", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def _holder(db_url: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, db_url], cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


async def _try_lease(db_url: str) -> str | None:
    engine = make_engine(db_url)
    lease = TrainerLease(engine, "test:1")
    try:
        await lease.acquire()
        return None
    except LeaseHeld as exc:
        return str(exc)
    finally:
        await lease.release()
        await engine.dispose()


def test_a_second_trainer_refuses_to_start_and_the_lease_dies_with_its_holder(db_url, tmp_path):
    holder = _holder(db_url)
    try:
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "trainwire.cli",
                "train",
                "--database-url",
                db_url,
                "--model",
                str(tmp_path / "no-model-needed"),
                "--checkpoint-dir",
                str(tmp_path / "ckpt"),
                "--upstream",
                "http://127.0.0.1:9",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert second.returncode == 2, second.stdout + second.stderr
        assert len(lines) == 1, second.stderr
        assert "another trainer holds this store's trainer lease: trainwire-train holder-host:" in lines[0]
        assert str(holder.pid) in lines[0] and "one trainer per store" in lines[0], lines[0]
        assert not (tmp_path / "ckpt").exists(), "the refused trainer must not touch the checkpoint directory"
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(10)
    # SIGKILLed: the lease is free at once (no heartbeat or timeout to wait out).
    assert asyncio.run(_try_lease(db_url)) is None

"""One training step on what a test recorded: the trainer's first two stages in-process (to inspect the samples),
then the real `trainwire train --max-steps 1`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from trainwire.store.db import make_engine

ROOT = Path(__file__).resolve().parents[2]


async def claim_and_build(db_url: str):
    """Claim the finished sessions and build their samples; then give the claims back so the real trainer can
    take them."""
    from trainwire.rl.transitions import build_samples
    from trainwire.store import claims

    engine = make_engine(db_url)
    try:
        batch = await claims.claim_batch(engine, worker_id="test-inspect", batch_size=8, settle_s=0)
        built = build_samples(batch)
        assert await claims.release(engine, [s.id for s in batch], worker_id="test-inspect") == len(batch)
        return batch, built
    finally:
        await engine.dispose()


def run_trainer(proxy, vllm, model_dir: Path, tmp_path: Path, *, batch_size: int) -> str:
    """`trainwire train` for one LoRA step against the test's proxy store and vLLM; its output."""
    argv = [
        sys.executable,
        "-m",
        "trainwire.cli",
        "train",
        "--database-url",
        proxy.db_url,
        "--upstream",
        vllm.url,
        "--model",
        str(model_dir),
        "--lora-rank",
        "8",
        "--lr",
        "5e-3",
        "--batch-size",
        str(batch_size),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--settle-s",
        "0",
        "--poll-s",
        "0.2",
        "--max-steps",
        "1",
    ]
    log_path = tmp_path / "trainer.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            argv,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    out = log_path.read_text(errors="replace")
    print(f"trainer ran {time.monotonic() - t0:.1f}s")
    assert proc.returncode == 0, out[-4000:]
    return out

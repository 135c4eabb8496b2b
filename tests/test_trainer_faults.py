"""The trainer SIGKILLed during a step, during a publish, during a checkpoint save and right after a checkpoint is
complete (before the store hears that its sessions are trained), then started again: the run resumes consistently.

Real processes: `trainwire train` (the tiny model in verl's CPU engine, LoRA), `trainwire serve`, Postgres. The
upstream is the scripted stand-in for vLLM, which also loads adapters the way vLLM's runtime LoRA endpoints do
and remembers a hash of the weights of every load, and which can hold a load so the kill lands inside a publish.

After each kill and restart, and after the run has trained every rewarded session:
- the restarted trainer gives the dead one's claims back at once (not after --claim-timeout-s);
- every rewarded session is trained once: by one step, and the step rows never repeat a step;
- a version number is never given to two sets of weights: each recorded version's adapter, as the upstream last
  loaded it, is the one its recorded path holds, and what the store says the upstream serves is loaded there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from demo.tiny_model import build_tiny_model
from tests.support import dbread
from tests.support.apihelpers import wait_for
from trainwire.store.models import PolicyVersion, Session, TrainStep, UpstreamVersion

ROOT = Path(__file__).resolve().parent.parent
GROUP = 4
BATCH = 2 * GROUP


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("faults-model") / "tiny")


def _batches(proxy_url: str, n: int, tag: str) -> list[str]:
    """n batches of rewarded one-call sessions, two task groups each."""
    client = openai.OpenAI(base_url=f"{proxy_url}/v1", api_key="x", max_retries=0, timeout=30)
    out = []
    for b in range(n):
        for g in range(2):
            for i in range(GROUP):
                sid = f"{tag}-{b}-{g}-{uuid.uuid4().hex[:6]}"
                client.chat.completions.create(
                    model="policy",
                    messages=[{"role": "user", "content": f"question {b}.{g}"}],
                    max_tokens=8,
                    extra_headers={"X-Session-Id": sid, "X-Task-Id": f"{tag}-{b}-{g}"},
                )
                r = httpx.post(f"{proxy_url}/reward", json={"session_id": sid, "reward": i / GROUP}, timeout=30)
                assert r.status_code == 200, r.text
                out.append(sid)
    return out


def _trainer(db_url: str, upstream: str, model_dir: Path, ckpt: Path, log: Path, *extra: str) -> subprocess.Popen:
    argv = [
        sys.executable,
        "-m",
        "trainwire.cli",
        "train",
        "--database-url",
        db_url,
        "--upstream",
        upstream,
        "--model",
        str(model_dir),
        "--lora-rank",
        "4",
        "--batch-size",
        str(BATCH),
        "--group-size",
        str(GROUP),
        "--checkpoint-dir",
        str(ckpt),
        "--settle-s",
        "0",
        "--poll-s",
        "0.1",
        "--max-staleness",
        "-1",
        # The scripted upstream's log-probs are made up, not the tiny model's: no step is refused for the gap.
        "--agreement-max",
        "0",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def _status(db_url: str) -> dict[str, dict]:
    return {r["id"]: r for r in dbread.rows(db_url, Session.__table__)}


def _versions(db_url: str) -> list[dict]:
    return sorted(dbread.rows(db_url, PolicyVersion.__table__), key=lambda r: r["version"])


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_trainer_killed_during_a_step_a_publish_and_a_checkpoint_resumes_consistently(
    start_proxy, upstream, pg_url, model_dir, tmp_path
):
    proxy = start_proxy("--upstream", upstream.url, "--database-url", pg_url, "--journal-dir", str(tmp_path / "j"))
    ckpt, log = tmp_path / "ckpt", tmp_path / "trainer.log"
    sessions = _batches(proxy.url, 6, "k")
    killed_at: list[str] = []

    def restart_gives_claims_back() -> subprocess.Popen:
        claimed = sum(1 for r in _status(pg_url).values() if r["status"] == "claimed")
        t0 = time.monotonic()
        proc = _trainer(pg_url, upstream.url, model_dir, ckpt, log)
        if claimed:
            wait_for(
                lambda: (
                    not any(
                        r["status"] == "claimed" and r["claimed_by"] and str(proc.pid) not in r["claimed_by"]
                        for r in _status(pg_url).values()
                    )
                ),
                60,
                interval=0.2,
                what="the dead trainer's claims given back",
            )
            assert time.monotonic() - t0 < 60
        return proc

    # 1. During a step: as soon as it has claimed its batch.
    proc = _trainer(pg_url, upstream.url, model_dir, ckpt, log)
    wait_for(
        lambda: any(r["status"] == "claimed" for r in _status(pg_url).values()),
        120,
        interval=0.02,
        what="a batch claimed",
    )
    _kill(proc)
    killed_at.append(f"step (versions then: {[v['version'] for v in _versions(pg_url)]})")

    # 2. During a publish: the upstream holds the adapter load; the trainer dies waiting for it.
    upstream.hold_loads.set()
    asked = upstream.load_requests
    proc = restart_gives_claims_back()
    wait_for(lambda: upstream.load_requests > asked, 120, interval=0.05, what="a publish under way")
    _kill(proc)
    upstream.hold_loads.clear()
    killed_at.append(f"publish (versions then: {[v['version'] for v in _versions(pg_url)]})")

    # 3. During a checkpoint: as soon as the next step's checkpoint folder appears (verl is writing it).
    state = ckpt / "state"

    def saved() -> int:
        tracker = state / "latest_checkpointed_iteration.txt"
        return int(tracker.read_text()) if tracker.is_file() else 0

    proc = restart_gives_claims_back()
    target = state / f"global_step_{saved() + 1}"
    wait_for(target.exists, 120, interval=0.001, what="a checkpoint being written")
    _kill(proc)
    killed_at.append(f"checkpoint (saved then: step {saved()})")

    # 4. Right after a checkpoint is complete, before the store is told its sessions are trained.
    proc = restart_gives_claims_back()
    done = saved()
    wait_for(lambda: saved() > done, 120, interval=0.001, what="a checkpoint completed")
    _kill(proc)
    step = saved()
    left_claimed = [sid for sid, r in _status(pg_url).items() if r["status"] == "claimed" and r["train_step"] is None]
    killed_at.append(f"after checkpoint {step} ({len(left_claimed)} sessions still claimed)")
    settled = _status(pg_url)

    # The run goes on to the end of what was rewarded.
    proc = restart_gives_claims_back()
    try:
        wait_for(
            lambda: all(_status(pg_url)[s]["status"] == "trained" for s in sessions),
            240,
            interval=0.5,
            what=f"every session trained ({log})",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    out = log.read_text(errors="replace")
    print("killed during: " + "; ".join(killed_at))
    pending = [sid for sid, r in settled.items() if r["status"] == "claimed" and r["train_step"] is None]
    if pending:  # the kill beat the store update: the next trainer settles the step the checkpoint holds
        assert f"step {step} was saved before the last trainer stopped" in out, out[-3000:]
        assert all(_status(pg_url)[sid]["train_step"] == step for sid in pending)
    print("\n".join(ln for ln in out.splitlines() if ln.startswith("[trainwire train]")))

    status = _status(pg_url)
    steps = [r["step"] for r in dbread.rows(pg_url, TrainStep.__table__)]
    assert len(steps) == len(set(steps)), f"a step recorded twice: {sorted(steps)}"
    assert all(status[s]["train_step"] is not None for s in sessions)
    per_step: dict[int, int] = {}
    for s in sessions:
        per_step[status[s]["train_step"]] = per_step.get(status[s]["train_step"], 0) + 1
    assert all(n <= BATCH for n in per_step.values()), per_step
    # A step's row counts the sessions it trained (a step settled by the next trainer has no row: its metrics died).
    for row in dbread.rows(pg_url, TrainStep.__table__):
        assert row["n_sessions"] == per_step.get(row["step"], 0), (row["step"], row["n_sessions"], per_step)

    versions = _versions(pg_url)
    numbers = [v["version"] for v in versions]
    assert numbers == sorted(set(numbers))
    last_load = {name: sha for name, sha in upstream.loads}
    for v in versions:
        assert last_load[v["served_model"]] == _sha(Path(v["path"])), f"v{v['version']}: other weights loaded"
    (serving,) = dbread.rows(pg_url, UpstreamVersion.__table__)
    assert serving["version"] == numbers[-1] and serving["served_model"] in upstream.adapters
    assert "Traceback" not in out, out[-3000:]

"""A checkpoint directory knows whose run it holds, and the trainer stops cleanly at any moment.

Real `trainwire train` subprocesses on the tiny model (no vLLM: --upstream is a closed port, which the trainer
reports and carries on past; publishing fails, the checkpoint is still written). One LoRA run against an SQLite
store makes a checkpoint directory; copies of it are then started against another store (Postgres), with full
fine-tuning, with another base model (same config, other weights) and without its manifest: each stops before the
engine is built with exit code 2, one line on stderr and no traceback. --fresh moves the directory's contents
aside and trains from step 0. SIGTERM during engine start-up ends the process within seconds with exit code 0.

SIGTERM during a step is tested in this process with the trainer's real step code, store and signal handling and a
fake engine: the step's claims are given back at once (not left to expire); a signal during the publish lets the
step finish, so no version is published without its checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from tests.support.ports import free_port
from trainwire.store.db import make_engine
from trainwire.store.identity import store_id
from trainwire.store.migrate import upgrade_head
from trainwire.store.models import Call, PolicyVersion, Reward, Session, TrainStep, utcnow

pytest.importorskip("torch")
pytest.importorskip("verl")

S, C, R = Session.__table__, Call.__table__, Reward.__table__
FIX = "; use a new --checkpoint-dir, or --fresh to start over there"


# ---------------------------------------------------------------------------------------------- helpers


async def _seed(url: str, tag: str, n: int) -> list[str]:
    """``n`` finished single-call sessions with token ids of the tiny model's vocabulary and a final reward."""
    engine = make_engine(url)
    at = utcnow() - timedelta(seconds=30)
    ids = [f"{tag}{i}" for i in range(n)]
    try:
        async with engine.begin() as conn:
            for i, sid in enumerate(ids):
                await conn.execute(
                    insert(S).values(id=sid, task_id=f"{tag}-task", n_calls=1, first_call_at=at, last_call_at=at)
                )
                await conn.execute(
                    insert(C).values(
                        id=f"{sid}-c0",
                        session_id=sid,
                        seq=0,
                        task_id=f"{tag}-task",
                        trainable=True,
                        kind="chat",
                        path="/v1/chat/completions",
                        policy_version=0,
                        prompt_token_ids=[1, 3, 40 + i, 41],
                        completion_token_ids=[50 + i, 60, 2],
                        logprobs=[-6.0, -6.1, -6.2],
                        finish_reason="stop",
                        status_code=200,
                        started_at=at,
                        finished_at=at,
                    )
                )
                await conn.execute(insert(R).values(session_id=sid, value=float(i % 2), final=True, created_at=at))
    finally:
        await engine.dispose()
    return ids


def seed(url: str, tag: str, n: int = 4) -> list[str]:
    return asyncio.run(_seed(url, tag, n))


async def _rows(url: str, stmt) -> list[dict]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(stmt)).mappings().all()]
    finally:
        await engine.dispose()


def rows(url: str, stmt) -> list[dict]:
    return asyncio.run(_rows(url, stmt))


def the_store_id(url: str) -> str:
    async def read():
        engine = make_engine(url)
        try:
            return await store_id(engine)
        finally:
            await engine.dispose()

    return asyncio.run(read())


def trainer_argv(*, db: str, model: Path, ckpt: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainwire.cli",
        "train",
        "--database-url",
        db,
        "--upstream",
        f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "--model",
        str(model),
        "--checkpoint-dir",
        str(ckpt),
        "--batch-size",
        "4",
        "--settle-s",
        "0",
        "--poll-s",
        "0.2",
        # The seeded calls' log-probs are made up (-6.x, not the tiny model's): these tests are about whose run a
        # checkpoint holds, and one checks that the gap is reported and warned, so no step is refused for it.
        "--agreement-max",
        "0",
        *extra,
    ]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")}
    out["OMP_NUM_THREADS"] = "1"
    return out


def train(tmp_path: Path, **kw) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    proc = subprocess.run(trainer_argv(**kw), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    proc.seconds = time.monotonic() - t0  # type: ignore[attr-defined]
    return proc


def assert_refused(proc: subprocess.CompletedProcess, ckpt: Path) -> str:
    """Exit code 2, exactly one line on stderr, no traceback, the engine never started."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    (line,) = lines
    assert line.startswith(f"trainwire train: error: --checkpoint-dir {ckpt} "), line
    assert line.endswith(FIX), line
    assert "loading" not in proc.stdout  # stopped before the engine was built
    print(f"refused in {proc.seconds:.1f}s: {line}")  # type: ignore[attr-defined]
    return line


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from demo.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("identity") / "tiny")


@pytest.fixture(scope="module")
def lora_run(model_dir, tmp_path_factory) -> dict:
    """One LoRA step against SQLite store A: the checkpoint directory the other tests start from (copies)."""
    work = tmp_path_factory.mktemp("lora-run")
    db = f"sqlite+aiosqlite:///{work}/a.db"
    upgrade_head(db)
    seed(db, "a")
    ckpt = work / "ckpt"
    proc = train(work, db=db, model=model_dir, ckpt=ckpt, extra=("--lora-rank", "8", "--max-steps", "1"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "step 1 -> v0" in proc.stdout  # nothing listens upstream: trained and checkpointed, not published
    assert (ckpt / "state" / "global_step_1").is_dir()
    return {"db": db, "ckpt": ckpt, "work": work, "stdout": proc.stdout}


def copy_of(lora_run: dict, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(lora_run["ckpt"], ckpt)
    return ckpt


# ------------------------------------------------------------------------------------------------ tests


def test_the_first_start_writes_the_manifest(lora_run, model_dir):
    manifest = json.loads((lora_run["ckpt"] / "trainwire_run.json").read_text())
    assert manifest["store_id"] == the_store_id(lora_run["db"])
    assert manifest["base_model"]["path"] == str(model_dir)
    assert manifest["base_model"]["config"]["model_type"] == "llama"
    assert manifest["base_model"]["config"]["num_hidden_layers"] == 2
    assert manifest["base_model"]["config"]["vocab_size"] == 512
    assert manifest["training"] == {
        "kind": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_target_modules": "all-linear",
    }
    assert manifest["trainwire_version"] and manifest["created_at"]


def test_disagreeing_log_probs_are_reported_and_warned(lora_run):
    """The seeded calls' recorded log-probs (-6.x) are not the tiny model's, as if vLLM served other weights: the
    step reports the gap and warns."""
    out = lora_run["stdout"]
    assert "agreement |dlogp|" in out and "(12 tokens of v0)" in out
    assert "WARNING: the trainer's log-probs of the 12 tokens v0 served differ from vLLM's by" in out
    (row,) = rows(lora_run["db"], select(TrainStep.__table__))
    metrics = row["metrics"]
    assert metrics["agreement/tokens"] == 12 and metrics["agreement/samples"] == 4
    assert metrics["agreement/mean_abs_dlogp"] > 0.05 and metrics["agreement/kl_k3"] > 0


def test_a_run_of_another_store_is_refused(lora_run, model_dir, pg_url, tmp_path):
    ckpt = copy_of(lora_run, tmp_path)
    seed(pg_url, "b")  # a new database with work to do: it would have resumed step 1 of store A
    line = assert_refused(train(tmp_path, db=pg_url, model=model_dir, ckpt=ckpt), ckpt)
    a, b = the_store_id(lora_run["db"]), the_store_id(pg_url)
    assert f"holds a run of another store (store {a[:12]} vs this database's {b[:12]})" in line
    assert rows(pg_url, select(TrainStep.__table__)) == []


def test_full_fine_tuning_on_a_lora_run_is_refused(lora_run, model_dir, tmp_path):
    """Before: verl's `ValueError: Failed to load LoRA-only checkpoint: unexpected keys [...]`."""
    ckpt = copy_of(lora_run, tmp_path)
    line = assert_refused(
        train(tmp_path, db=lora_run["db"], model=model_dir, ckpt=ckpt, extra=("--lora-rank", "0")), ckpt
    )
    assert "holds a run of LoRA rank 8 alpha 16 on all-linear (this start: full fine-tuning)" in line


def test_another_base_model_is_refused(lora_run, model_dir, tmp_path):
    from demo.tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "tiny-seed1", seed=1)  # the same config, other weights
    ckpt = copy_of(lora_run, tmp_path)
    line = assert_refused(train(tmp_path, db=lora_run["db"], model=other, ckpt=ckpt), ckpt)
    assert f"holds a run of another base model ({model_dir}, not {other}: same config, other weights)" in line


def test_checkpoints_without_a_manifest_are_refused(lora_run, model_dir, tmp_path):
    ckpt = copy_of(lora_run, tmp_path)
    (ckpt / "trainwire_run.json").unlink()  # as an older trainwire left it
    line = assert_refused(train(tmp_path, db=lora_run["db"], model=model_dir, ckpt=ckpt), ckpt)
    assert "holds checkpoints but no trainwire_run.json (written by an older trainwire)" in line


def test_fresh_moves_the_old_run_aside_and_starts_at_step_0(lora_run, model_dir, pg_url, tmp_path):
    ckpt = copy_of(lora_run, tmp_path)
    ids = seed(pg_url, "f")
    proc = train(tmp_path, db=pg_url, model=model_dir, ckpt=ckpt, extra=("--fresh", "--max-steps", "1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    (moved,) = (ckpt / "previous-runs").iterdir()
    assert f"--fresh: moved what {ckpt} held into {moved}" in proc.stdout
    assert "resumed from" not in proc.stdout
    assert "step 1 -> v0" in proc.stdout
    # the old run is all there, untouched
    assert json.loads((moved / "trainwire_run.json").read_text())["store_id"] == the_store_id(lora_run["db"])
    assert (moved / "state" / "global_step_1").is_dir() and (moved / "tensorboard").is_dir()
    # the new one is this store's, from step 1 again
    assert json.loads((ckpt / "trainwire_run.json").read_text())["store_id"] == the_store_id(pg_url)
    assert (ckpt / "state" / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert [r["step"] for r in rows(pg_url, select(TrainStep.__table__))] == [1]
    assert {r["status"] for r in rows(pg_url, select(S).where(S.c.id.in_(ids)))} == {"trained"}


def sigterm_when(lora_run: dict, model_dir: Path, tmp_path: Path, marker: str) -> tuple[int, float, str]:
    """Start the trainer on a copy of the LoRA run (the same run: it resumes), SIGTERM it when it prints
    ``marker``; returns its exit code, the seconds it took to exit after the signal, and its output."""
    ckpt = copy_of(lora_run, tmp_path)
    proc = subprocess.Popen(
        trainer_argv(db=lora_run["db"], model=model_dir, ckpt=ckpt),
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                break
        else:
            raise AssertionError(f"the trainer never printed {marker!r}: {''.join(seen)}{proc.stderr.read()[-3000:]}")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"exited {took:.1f}s after SIGTERM")
    return proc.returncode, took, "".join(seen) + out + err


def test_sigterm_during_engine_start_up_stops_promptly(lora_run, model_dir, tmp_path):
    # the identity check passed (the same run), and the engine is being built
    code, took, out = sigterm_when(lora_run, model_dir, tmp_path, "into verl's engine")
    assert code == 0, out[-3000:]
    assert took < 10
    assert "SIGTERM: stopping now" in out and "stopped (SIGTERM)" in out
    assert "engine ready" not in out and "Traceback" not in out


def test_sigterm_while_waiting_for_sessions_stops_promptly(lora_run, model_dir, tmp_path):
    code, took, out = sigterm_when(lora_run, model_dir, tmp_path, "waiting for rewarded sessions")
    assert code == 0, out[-3000:]
    assert took < 10
    assert "SIGTERM: stopping (SIGTERM again to abort)" in out and "stopped (SIGTERM)" in out
    assert "Traceback" not in out


# ---------------------------------------------------------------------------- a stop during the step itself


class SlowEngine:
    """PolicyEngine's step sequence for Collective; ``step`` signals this process, then works on."""

    def __init__(self, signal_in: str) -> None:
        self.signal_in = signal_in
        self.global_step = 0
        self.exported = self.checkpointed = 0

    def logprobs(self, samples):
        return [list(s.old_logprobs) for s in samples]

    def step(self, samples):
        if self.signal_in == "step":
            os.kill(os.getpid(), signal.SIGTERM)
            end = time.monotonic() + 20
            while time.monotonic() < end:  # a long optimizer step
                sum(range(1000))
            raise AssertionError("the step was not interrupted")
        self.global_step += 1
        return {"loss": 0.25}

    def export(self, out_dir: Path) -> Path:
        self.exported += 1
        out_dir.mkdir(parents=True, exist_ok=True)
        return out_dir

    def save_checkpoint(self):
        self.checkpointed += 1


class SignalledPublisher:
    kind = "lora"

    def __init__(self, signal_in: str) -> None:
        self.signal_in = signal_in
        self.published: list[int] = []

    async def publish(self, version: int, path: str):
        from trainwire.rl.publish import PublishResult

        if self.signal_in == "publish":
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.3)  # the reload takes a while
        self.published.append(version)
        return PublishResult(version, f"policy-v{version}", reached=["http://vllm"])


class NoSink:
    def log(self, step, metrics):
        pass


def stepping_trainer(tmp_path: Path, db: str, signal_in: str):
    from trainwire.rl.collective import Collective
    from trainwire.rl.stopping import Stopper
    from trainwire.rl.worker import Trainer
    from trainwire.settings import Settings

    said: list[str] = []
    settings = Settings(
        model="tiny", database_url=db, checkpoint_dir=tmp_path / "ckpt", settle_s=0, batch_size=4, group_size=0
    )
    tr = Trainer(settings, Stopper(say=said.append, abort=lambda signum: None))
    tr.policy = SlowEngine(signal_in)
    tr.ranks = Collective(tr.policy, tr.publish_root, rank=0, world=1, broadcast=None)
    tr.pub = SignalledPublisher(signal_in)
    tr.sink = NoSink()
    tr.base_model, tr.version, tr.weights_version = None, 0, 0
    tr.said = said
    return tr


def run_one_step(tr) -> object:
    async def main():
        tr.stopper.attach()
        try:
            return await tr.step_once()
        finally:
            tr.stopper.detach()
            await tr.db.dispose()

    tr.stopper.install()
    try:
        return asyncio.run(main())
    finally:
        tr.stopper.uninstall()


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    monkeypatch.setattr(
        "trainwire.rl.advantages.compute_advantages", lambda scores, groups, estimator: [0.5] * len(scores)
    )
    url = f"sqlite+aiosqlite:///{tmp_path}/steps.db"
    upgrade_head(url)
    return url


def test_sigterm_during_the_step_gives_its_claims_back(store, tmp_path):
    from trainwire.rl.stopping import StopRequested

    ids = seed(store, "s")
    tr = stepping_trainer(tmp_path, store, signal_in="step")
    t0 = time.monotonic()
    with pytest.raises(StopRequested):
        run_one_step(tr)
    assert time.monotonic() - t0 < 10
    sessions = {r["id"]: r for r in rows(store, select(S))}
    assert {sessions[i]["status"] for i in ids} == {"open"}  # given back now, not after --claim-timeout-s
    assert {sessions[i]["claimed_by"] for i in ids} == {None}
    assert tr.pub.published == [] and tr.policy.exported == tr.policy.checkpointed == 0
    assert rows(store, select(PolicyVersion.__table__)) == []
    assert "SIGTERM: stopping now" in tr.said and "stopped during step 1; gave its 4 sessions back" in tr.said


def test_sigterm_during_the_publish_lets_the_step_finish(store, tmp_path):
    ids = seed(store, "p")
    tr = stepping_trainer(tmp_path, store, signal_in="publish")
    metrics = run_one_step(tr)
    assert tr.stopper.requested  # the loop stops after this step
    assert metrics["agreement/mean_abs_dlogp"] == 0.0 and metrics["agreement/samples"] == 4
    assert tr.pub.published == [1] and tr.policy.checkpointed == 1
    assert [(v["version"], v["train_step"]) for v in rows(store, select(PolicyVersion.__table__))] == [(1, 1)]
    sessions = {r["id"]: r for r in rows(store, select(S))}
    assert {(sessions[i]["status"], sessions[i]["train_step"]) for i in ids} == {("trained", 1)}
    assert any("stopping when the step's publish and checkpoint are done" in line for line in tr.said)

"""`--plugin` end to end: the worked example (examples/plugin_example.py) imported by a real `trainwire serve` with
two workers, whose automatic-reward rule fires on a real call; and by each rank of a real
`torchrun -m trainwire.cli train` (2 CPU ranks, gloo), each of which trains its shard with the plugin's loss
and the plugin's advantage estimator."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import dbread
from trainwire.store.models import Reward, TrainStep

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin_example.py"


def test_serve_workers_run_the_plugins_reward_rule(start_proxy, upstream, sqlite_url, tmp_path):
    """The rule's flag exists because the plugin was imported before the parser was built; each of the two
    workers imports it again (a worker without the rule would refuse --air-empty-answer and stop the proxy)."""
    proxy = start_proxy(
        "--upstream", upstream.url, "--database-url", sqlite_url, "--journal-dir", str(tmp_path / "journal"),
        "--workers", "2", "--plugin", str(EXAMPLE), "--air-empty-answer", "-1",
    )  # fmt: skip
    upstream.script(text="")
    upstream.script(text="not empty")
    for session in ("plugin-empty", "plugin-text"):
        r = httpx.post(
            f"{proxy.v1}/chat/completions",
            json={"model": "policy", "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Session-Id": session},
            timeout=30,
        )
        assert r.status_code == 200, r.text
    deadline = time.time() + 10
    while time.time() < deadline and not (rewards := dbread.rows(sqlite_url, Reward.__table__)):
        time.sleep(0.2)
    assert [(w["session_id"], w["source"], w["value"], w["final"]) for w in rewards] == [
        ("plugin-empty", "empty_answer", -1.0, False)
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from demo.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("plugin") / "tiny")


def test_torchrun_ranks_each_import_the_plugin_and_train_with_its_loss(model_dir, tmp_path):
    from tests.test_checkpoint_identity import seed

    pytest.importorskip("verl")
    db = f"sqlite+aiosqlite:///{tmp_path}/train.db"
    from trainwire.store.migrate import upgrade_head

    upgrade_head(db)
    seed(db, "p", 4)
    probe = tmp_path / "probe.txt"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # nothing listens there: the step is trained, not published
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TW_PLUGIN_PROBE=str(probe))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(port), "-m", "trainwire.cli", "train",
        "--plugin", str(EXAMPLE), "--plugin", "tests.support.plugin_probe",
        "--policy-loss", "truncated_pg", "--adv-estimator", "group_sign",
        "--database-url", db, "--upstream", f"http://127.0.0.1:{closed}", "--model", str(model_dir),
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--batch-size", "4", "--settle-s", "0", "--poll-s", "0.2",
        "--max-steps", "1",
        "--agreement-max", "0",  # the seeded log-probs are made up, not the tiny model's
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        output, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-4000:]
    calls = [line.split() for line in probe.read_text().splitlines()]
    assert {rank for rank, _pid in calls} == {"0", "1"}, output[-3000:]  # both ranks called the plugin's loss
    assert len({pid for _rank, pid in calls}) == 2
    (step,) = dbread.rows(db, TrainStep.__table__)
    assert step["n_sessions"] == 4, step
    # group_sign: two of the seeded task's four sessions scored 1 and two 0, so the advantages are exactly +1 and
    # -1 (grpo would give +-0.866).
    metrics = step["metrics"]
    assert (metrics["advantage/max"], metrics["advantage/min"]) == (1.0, -1.0), metrics
    assert "2 ranks (torchrun)" in output

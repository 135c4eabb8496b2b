"""The two stages end to end, the way `make demo-calc` runs them, at CI size, on real vLLM (CPU) and Postgres.

`python -m demo.calc_run --ci` builds the calculator model, starts vLLM (hermes tool-call parser), the scripted
teacher, `trainwire serve` with the teacher as a frozen route, then evaluates the base model and the teacher on
held-out questions, records teacher episodes, runs `trainwire train --objective sft --sft-from teacher` over them,
evaluates, continues with `trainwire train --objective rl` from the SFT checkpoint while the policy runs its own
episodes, and evaluates again. From its results and the store:

* accuracy on the held-out questions rises after SFT and rises again after RL, each by at least ``MIN_Z``
  standard errors of the difference (the evaluations are independent samples of the policies at temperature 1;
  if a stage changed nothing, a 3-SE rise would have a chance of about 1 in 700);
* one run: the RL trainer resumed the SFT trainer's last checkpoint, the published versions go on without a gap
  (SFT's, then RL's), every teacher session was trained by an SFT step and every RL session by a later RL step,
  and no evaluation call was trained on;
* the trainer's view of the policy's own calls: re-rendering a recorded request with the policy's tokenizer and
  template (rl/retokenize.py) gives exactly the prompt ids vLLM recorded, and for almost every tool call or answer
  the policy generated, exactly the completion ids vLLM sampled (a model can sample a non-canonical tokenization
  of the same text now and then);
* the demo leaves no process behind.

Skipped when the vLLM venv is missing; TRAINWIRE_REQUIRE_VLLM=1 makes that an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import dbread
from tests.support.vllm_support import require_vllm_venv
from tests.test_demo_e2e import processes_mentioning
from trainwire.rl.retokenize import ChatRenderer, RenderError
from trainwire.store.models import PolicyVersion, Session, TrainStep

pytestmark = pytest.mark.vllm

require_vllm_venv()

ROOT = Path(__file__).resolve().parent.parent
MIN_Z = 3.0
MIN_COMPLETIONS_EQUAL = 0.95


def test_sft_then_rl_on_postgres(pg_url, tmp_path):
    work = tmp_path / "calc"
    env = {**os.environ, "TRAINWIRE_DATABASE_URL": pg_url, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    out_path = tmp_path / "demo.out"
    with open(out_path, "w") as out:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "demo.calc_run",
                "--ci",
                "--workdir",
                str(work),
                "--vllm-port",
                "0",
                "--proxy-port",
                "0",
                "--teacher-port",
                "0",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    wall = time.monotonic() - t0
    output = out_path.read_text(errors="replace")
    print(output[-5000:])
    print(f"demo-calc --ci wall time {wall:.0f}s")
    assert proc.returncode == 0, output[-6000:]
    assert not processes_mentioning(str(work)), "the demo left processes behind"

    # Accuracy rises after SFT, and again after RL, by standard errors.
    results = json.loads((work / "results.json").read_text())
    margins = results["margins"]
    for key in ("sft-base", "rl-sft"):
        m = margins[key]
        print(f"{key}: {m['gain']:+.3f} = {m['z']:.1f} SE (required >= {MIN_Z})")
        assert m["z"] >= MIN_Z, margins
    phases = results["phases"]
    assert phases["sft"]["validity"] > 0.5 and phases["base"]["accuracy"] < phases["sft"]["accuracy"]

    # One run: SFT's steps and versions, then RL's, from the SFT checkpoint.
    steps = sorted(dbread.rows(pg_url, TrainStep.__table__), key=lambda s: s["step"])
    sft_steps = [s["step"] for s in steps if "advantage/mean" not in s["metrics"]]
    rl_steps = [s["step"] for s in steps if "advantage/mean" in s["metrics"]]
    assert sft_steps and rl_steps and max(sft_steps) < min(rl_steps)
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    versions = sorted(dbread.rows(pg_url, PolicyVersion.__table__), key=lambda v: v["version"])
    assert [v["version"] for v in versions] == list(range(1, len(steps) + 1))
    assert all(v["kind"] == "full" and v["status"] == "published" for v in versions)
    rl_log = (work / "logs" / "trainer-rl.log").read_text()
    assert f"resumed from {(work / 'checkpoints' / 'state' / f'global_step_{max(sft_steps)}').resolve()}" in rl_log

    calls = dbread.calls(pg_url)  # as readers see them: a call stored as a delta comes back whole
    sessions = {s["id"]: s for s in dbread.rows(pg_url, Session.__table__)}
    teacher_sessions = {c["session_id"] for c in calls if c["session_id"].startswith("calc-teacher-train-")}
    rl_sessions = {c["session_id"] for c in calls if c["session_id"].startswith("calc-rl-train-")}
    assert len(teacher_sessions) == results["teacher_episodes"]
    assert all(sessions[s]["status"] == "trained" and sessions[s]["train_step"] in sft_steps for s in teacher_sessions)
    trained_rl = [s for s in rl_sessions if sessions[s]["status"] == "trained"]
    assert trained_rl and all(sessions[s]["train_step"] in rl_steps for s in trained_rl)
    evals = [c for c in calls if c["session_id"].startswith("calc-eval-")]
    assert evals and not any(c["trainable"] for c in evals)
    assert all(sessions[c["session_id"]]["status"] == "open" for c in evals)  # no reward: never claimed

    # The trainer's rendering of the policy's own calls is vLLM's.
    renderer = ChatRenderer.from_pretrained(str(work / "model"))
    policy_calls = [
        c
        for c in calls
        if c["session_id"] in rl_sessions
        and c["route"] == "policy"
        and c["status_code"] == 200
        and c["prompt_token_ids"]
    ]
    assert policy_calls
    equal = rendered = 0
    for c in policy_calls:
        req = c["request"]
        assert renderer.prompt_ids(req["messages"], req.get("tools")) == list(c["prompt_token_ids"]), c["id"]
        message = c["response"]["choices"][0]["message"]
        parsed = message.get("tool_calls") or (message.get("content") or "").strip().isdigit()
        if c["finish_reason"] not in ("stop", "tool_calls") or not parsed:
            continue
        try:
            _, completion = renderer.call_tokens(req, c["response"])
        except RenderError:
            continue
        rendered += 1
        equal += completion == list(c["completion_token_ids"])
    print(
        f"policy calls: {len(policy_calls)} prompts all equal to vLLM's; {equal} of {rendered} well-formed "
        "completions re-render to the sampled token ids"
    )
    assert rendered and equal / rendered >= MIN_COMPLETIONS_EQUAL

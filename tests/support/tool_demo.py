"""What the two calculator demos' end-to-end tests share: running one at CI size, and checking from its results and
the store that SFT and then RL ran as one run, each session trained once, and that the trainer's rendering of the
policy's own calls is vLLM's (``tests/test_demo_calc_e2e.py``, ``tests/test_demo_real_e2e.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support import dbread
from trainwire.rl.retokenize import ChatRenderer, RenderError
from trainwire.store.models import PolicyVersion, Session, TrainStep

ROOT = Path(__file__).resolve().parent.parent.parent


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found


def run_ci(module: str, work: Path, pg_url: str, *extra: str, timeout: float = 900) -> dict:
    """``python -m MODULE --ci`` on free ports with the store at ``pg_url``; its results.json. Asserts exit 0 and
    that it left no process behind."""
    env = {**os.environ, "TRAINWIRE_DATABASE_URL": pg_url, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    out_path = work.parent / f"{work.name}.out"
    argv = [sys.executable, "-m", module, "--ci", "--workdir", str(work)]
    argv += ["--vllm-port", "0", "--proxy-port", "0", "--teacher-port", "0", *extra]
    with open(out_path, "w") as out:
        proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    output = out_path.read_text(errors="replace")
    print(output[-5000:])
    print(f"{module} --ci wall time {time.monotonic() - t0:.0f}s")
    assert proc.returncode == 0, output[-6000:]
    assert not processes_mentioning(str(work)), "the demo left processes behind"
    return json.loads((work / "results.json").read_text())


def check_one_run(pg_url: str, work: Path, results: dict, prefix: str) -> tuple[list[dict], list[int]]:
    """SFT's steps and versions, then RL's from the SFT checkpoint; every teacher session trained by an SFT step,
    every trained RL session by an RL step, no evaluation call trainable. The calls and the RL steps."""
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
    teacher_sessions = {c["session_id"] for c in calls if c["session_id"].startswith(f"{prefix}-teacher-train-")}
    rl_sessions = {c["session_id"] for c in calls if c["session_id"].startswith(f"{prefix}-rl-train-")}
    assert len(teacher_sessions) == results["teacher_episodes"]
    assert all(sessions[s]["status"] == "trained" and sessions[s]["train_step"] in sft_steps for s in teacher_sessions)
    trained_rl = [s for s in rl_sessions if sessions[s]["status"] == "trained"]
    assert trained_rl and all(sessions[s]["train_step"] in rl_steps for s in trained_rl)
    evals = [c for c in calls if c["session_id"].startswith(f"{prefix}-eval-")]
    assert evals and not any(c["trainable"] for c in evals)
    assert all(sessions[c["session_id"]]["status"] == "open" for c in evals)  # no reward: never claimed
    rl_calls = [c for c in calls if c["session_id"] in rl_sessions]
    return rl_calls, rl_steps


def rendering_agreement(model_dir: Path, policy_calls: list[dict], final_answer) -> tuple[int, int]:
    """Every recorded prompt of the policy's own calls re-renders (rl/retokenize.py, the policy's tokenizer and
    template) to exactly the ids vLLM recorded (asserted); of the well-formed completions (a parsed tool call, or
    a final answer ``final_answer(text)`` accepts), how many re-render to the sampled ids, and how many there were."""
    renderer = ChatRenderer.from_pretrained(str(model_dir))
    equal = rendered = 0
    for c in policy_calls:
        req = c["request"]
        assert renderer.prompt_ids(req["messages"], req.get("tools")) == list(c["prompt_token_ids"]), c["id"]
        message = c["response"]["choices"][0]["message"]
        parsed = message.get("tool_calls") or final_answer(message.get("content") or "")
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
    return equal, rendered

"""The whole loop, end to end, the way `make demo` runs it, on real Postgres.

`python -m demo.run` starts a real vLLM (CPU build), `trainwire serve`, `trainwire train` (verl on CPU, LoRA
published into the running vLLM) and the sample agent (the OpenAI SDK with OPENAI_BASE_URL, rewards by HTTP
POST like curl), with TRAINWIRE_DATABASE_URL pointing at a throwaway Postgres. Then, from the agent's own log of
every HTTP request and from the store:

* at least 2 policy versions were published, and the agent was served by several of them;
* no request failed, including the ones in flight while the trainer swapped adapters;
* every call of every episode is in the store, with the session, the status and the policy version the agent
  saw in `X-Policy-Version`, and every episode's reward is its session's final reward;
* the mean reward of the last version is clearly above the first's: the gain and its size in standard errors
  are printed; we require a gain of at least 0.15 (rewards are in [0, 1], the base model scores about 0.2)
  and at least 5 standard errors. If training did nothing, the two means would be two samples of the same
  policy and a 5-SE gap would have a chance of about 3e-7: the rise is learning, not luck;
* the demo leaves no process behind.

Skipped when the vLLM venv is missing; TRAINWIRE_REQUIRE_VLLM=1 makes that an error.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

import pytest

from demo.run import first_last, per_version, read_log
from tests.support import dbread
from tests.support.tool_demo import processes_mentioning
from tests.support.vllm_support import require_vllm_venv
from trainwire.store.models import Call, PolicyVersion, Session, TrainStep

pytestmark = pytest.mark.vllm

require_vllm_venv()

ROOT = Path(__file__).resolve().parent.parent
DURATION_S = 90
MIN_GAIN = 0.15
MIN_Z = 5.0


def test_demo_learns_on_postgres(pg_url, tmp_path):
    work = tmp_path / "demo"
    agent_log = tmp_path / "agent.jsonl"
    env = {**os.environ, "TRAINWIRE_DATABASE_URL": pg_url, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    out_path = tmp_path / "demo.out"
    with open(out_path, "w") as out:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "demo.run",
                "--workdir",
                str(work),
                "--duration",
                str(DURATION_S),
                "--agent-log",
                str(agent_log),
                "--vllm-port",
                "0",
                "--proxy-port",
                "0",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    wall = time.monotonic() - t0
    output = out_path.read_text(errors="replace")
    print(output[-6000:])
    print(f"demo wall time {wall:.0f}s")
    assert proc.returncode == 0, output[-6000:]
    assert not processes_mentioning(str(work)), "the demo left processes behind"

    records = read_log(agent_log)
    chats = [r for r in records if r["kind"] == "chat"]
    rewards = [r for r in records if r["kind"] == "reward"]
    episodes = [r for r in records if r["kind"] == "episode"]
    assert episodes and len(chats) == 2 * len(episodes) and len(rewards) == len(episodes)

    # No failed request, ever (the agent's SDK does not retry: max_retries=0).
    failed = [r for r in chats + rewards if r["status"] != 200]
    assert not failed, failed[:5]
    assert all(e["ok"] for e in episodes)

    # Versions: published by the trainer, and served to the agent.
    versions = sorted(dbread.rows(pg_url, PolicyVersion.__table__), key=lambda v: v["version"])
    steps = {s["step"]: s for s in dbread.rows(pg_url, TrainStep.__table__)}
    assert len(versions) >= 2, versions
    assert [v["version"] for v in versions] == list(range(1, len(versions) + 1))
    assert all(v["kind"] == "lora" and v["status"] == "published" for v in versions)
    seen = {r["policy_version"] for r in chats}
    assert len(seen) >= 2, seen

    # Traffic during the swaps: a swap happens within the publish time the trainer measured before it
    # recorded the version; count the agent's requests in flight then (all of them succeeded, see above).
    in_flight = []
    for v in versions:
        end = v["created_at"].replace(tzinfo=v["created_at"].tzinfo or UTC).timestamp()
        publish_s = (steps.get(v["train_step"]) or {}).get("metrics", {}).get("time/publish_s", 0.05)
        start = end - publish_s - 0.05
        in_flight.append(sum(1 for r in chats if r["t"] < end and r["t"] + r["latency_s"] > start))
    swaps_with_traffic = sum(1 for n in in_flight if n)
    print(
        f"{len(versions)} swaps; {swaps_with_traffic} had agent requests in flight "
        f"(max {max(in_flight)} at once); {len(chats) + len(rewards)} requests, none failed"
    )
    assert swaps_with_traffic >= 1

    # Every call of every episode is in the store, as the agent saw it.
    calls = {c["id"]: c for c in dbread.rows(pg_url, Call.__table__)}
    for r in chats:
        c = calls.get(r["call_id"])
        assert c is not None, f"call {r['call_id']} of {r['session_id']} is not in the store"
        assert (c["session_id"], c["status_code"], c["policy_version"], c["task_id"]) == (
            r["session_id"],
            200,
            r["policy_version"],
            r["task_id"],
        )
        assert c["completion_token_ids"] and len(c["logprobs"]) == len(c["completion_token_ids"])
    sessions = {s["id"]: s for s in dbread.rows(pg_url, Session.__table__)}
    for e in episodes:
        s = sessions[e["session_id"]]
        assert s["n_calls"] == 2 and s["final_reward"] == pytest.approx(e["reward"])
    trained = [s for s in sessions.values() if s["status"] == "trained"]
    assert trained and all(s["train_step"] in steps for s in trained)

    # The reward rose: last version vs first, with the margin in standard errors.
    rows = per_version([e for e in episodes if e["ok"]])
    first, last = first_last(rows, min_episodes=16)
    assert first is not None and last is not None and last["version"] > first["version"], rows
    gain = last["mean"] - first["mean"]
    se = math.hypot(first["sem"], last["sem"])
    z = gain / se if se > 0 else math.inf
    print(
        f"mean reward v{first['version']} {first['mean']:.3f} ± {first['sem']:.3f} (n={first['episodes']}) -> "
        f"v{last['version']} {last['mean']:.3f} ± {last['sem']:.3f} (n={last['episodes']}): gain {gain:+.3f} = "
        f"{z:.1f} standard errors (required: >= {MIN_GAIN} and >= {MIN_Z} SE)"
    )
    assert gain >= MIN_GAIN and z >= MIN_Z

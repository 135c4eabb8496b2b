"""`make demo-real` end to end at CI size: the real model (SmolLM2-135M-Instruct), an OpenAI Agents SDK agent,
real vLLM (CPU) and Postgres.

`python -m demo.real_run --ci` materializes (or reuses) the real model, starts vLLM with the tool template and the
hermes parser, the scripted teacher and `trainwire serve`; evaluates the base model and the teacher on held-out
questions, records teacher episodes of the Agents SDK agent, distills them (`--objective sft --sft-from teacher`),
evaluates, continues with RL from the SFT checkpoint while the agent runs its own episodes, and evaluates again.
From its results and the store:

* every phase evaluated the same held-out questions, and SFT made the model better than the base model, which
  never answers right (the full run's margins are in the README; at CI size only the direction is certain);
* one run: SFT's steps and full-weight versions, then RL's from the SFT checkpoint; every teacher session trained
  by an SFT step, every trained RL session by an RL step, no evaluation call trainable;
* the trainer agrees with vLLM on the log-probs of what the published weights served (the embeddings are tied,
  so ``--freeze-embeddings auto`` keeps them frozen): mean |delta log p| <= 1e-4 in float32;
* the trainer's re-rendering of the agent's calls is vLLM's: every prompt exactly, nearly every well-formed
  completion (a 49k-token BPE model sometimes samples another split of the same text);
* the demo leaves no process behind.

Skipped when the vLLM venv is missing; TRAINWIRE_REQUIRE_VLLM=1 makes that an error.
"""

from __future__ import annotations

import pytest

from tests.support import dbread
from tests.support.tool_demo import check_one_run, rendering_agreement, run_ci
from tests.support.vllm_support import real_model, require_vllm_venv
from trainwire.store.models import TrainStep

pytestmark = pytest.mark.vllm

require_vllm_venv()

AGREEMENT_TOLERANCE = 1e-4
MIN_COMPLETIONS_EQUAL = 0.8


def test_real_model_sft_then_rl_with_an_agents_sdk_agent(pg_url, tmp_path):
    model_dir = real_model()
    work = tmp_path / "real"
    results = run_ci("demo.real_run", work, pg_url, "--model-dir", str(model_dir), timeout=1500)

    phases = results["phases"]
    assert {k: phases[k]["n"] for k in ("base", "teacher", "sft", "rl")} == dict.fromkeys(
        ("base", "teacher", "sft", "rl"), results["eval_n"]
    )
    print({k: (round(v["accuracy"], 3), round(v["tool_use"], 3)) for k, v in phases.items()})
    assert phases["base"]["accuracy"] < phases["sft"]["accuracy"]
    assert phases["base"]["tool_use"] < phases["sft"]["tool_use"]

    rl_calls, rl_steps = check_one_run(pg_url, work, results, "real")
    assert all(c["agent_name"] == "calculator-agents-sdk" for c in rl_calls)

    metrics = [s["metrics"] for s in dbread.rows(pg_url, TrainStep.__table__) if s["step"] in rl_steps]
    measured = [m for m in metrics if m.get("agreement/tokens")]
    assert measured, "no RL step measured agreement on the weights that served its sessions"
    for m in measured:
        print(f"agreement: mean |dlogp| {m['agreement/mean_abs_dlogp']:.2e} over {m['agreement/tokens']:.0f} tokens")
        assert m["agreement/mean_abs_dlogp"] <= AGREEMENT_TOLERANCE
    assert "input embeddings frozen (--freeze-embeddings auto" in (work / "logs" / "trainer-sft.log").read_text()

    policy_calls = [c for c in rl_calls if c["route"] == "policy" and c["status_code"] == 200 and c["prompt_token_ids"]]
    assert policy_calls
    equal, rendered = rendering_agreement(model_dir, policy_calls, lambda text: text.strip().lstrip("-").isdigit())
    assert rendered and equal / rendered >= MIN_COMPLETIONS_EQUAL

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

import pytest

from tests.support.tool_demo import check_one_run, rendering_agreement, run_ci
from tests.support.vllm_support import require_vllm_venv

pytestmark = pytest.mark.vllm

require_vllm_venv()

MIN_Z = 3.0
MIN_COMPLETIONS_EQUAL = 0.95


def test_sft_then_rl_on_postgres(pg_url, tmp_path):
    work = tmp_path / "calc"
    results = run_ci("demo.calc_run", work, pg_url)

    # Accuracy rises after SFT, and again after RL, by standard errors.
    margins = results["margins"]
    for key in ("sft-base", "rl-sft"):
        m = margins[key]
        print(f"{key}: {m['gain']:+.3f} = {m['z']:.1f} SE (required >= {MIN_Z})")
        assert m["z"] >= MIN_Z, margins
    phases = results["phases"]
    assert phases["sft"]["validity"] > 0.5 and phases["base"]["accuracy"] < phases["sft"]["accuracy"]

    rl_calls, _ = check_one_run(pg_url, work, results, "calc")

    # The trainer's rendering of the policy's own calls is vLLM's.
    policy_calls = [c for c in rl_calls if c["route"] == "policy" and c["status_code"] == 200 and c["prompt_token_ids"]]
    assert policy_calls
    equal, rendered = rendering_agreement(work / "model", policy_calls, lambda text: text.strip().isdigit())
    assert rendered and equal / rendered >= MIN_COMPLETIONS_EQUAL

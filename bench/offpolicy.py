"""drop vs tis vs decoupled (`trainwire train --off-policy`) side by side, on real vLLM, at equal wall-clock.

One vLLM (CPU, the demo's tiny model, runtime LoRA) serves every run; each run gets a fresh SQLite store, a fresh
checkpoint directory, its own proxy and trainer and its own policy name (so its adapters never collide with another
run's). The agents are threads on the unchanged OpenAI SDK running episodes back to back, ``--concurrency`` at a
time, in GRPO groups of 8 under one ``X-Task-Id``. The task needs the prompt: half the groups are asked to answer
with digits, half with letters, and the reward is the fraction of the answer's non-space characters of the class
asked for, so a policy that only learns "digits" earns about half.

Per run it reports: the share of rewarded sessions trained (after the agents stop the trainer gets ``--drain-s``
to take what is left), sessions dropped as stale, the mean reward of the episodes of the last ``--window-s`` of the
run with its standard error (digits and letters prompts apart too), the trainer's step time, and the time from a
batch's last reward to its new weights serving (the publish is recorded once vLLM loaded the adapter).

    flock /tmp/trainwire-vllm.lock .venv/bin/python -m bench.offpolicy --duration 240 --concurrency 32,64

Writes ``WORKDIR/results.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import threading
import time
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.procs import Child, ensure_vllm_venv, port_or_free, say, wait_healthy  # noqa: E402

ASK = {"digits": "Answer with digits only.", "letters": "Answer with letters only."}
GROUP = 8


def class_reward(kind: str, text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    hit = (lambda c: c in "0123456789") if kind == "digits" else (lambda c: c.isascii() and c.isalpha())
    return sum(hit(c) for c in chars) / len(chars)


def mean_sem(xs: list[float]) -> tuple[float, float, int]:
    if not xs:
        return float("nan"), float("nan"), 0
    sem = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan")
    return statistics.fmean(xs), sem, len(xs)


class Agents:
    """``concurrency / 8`` lanes; each runs one group of 8 episodes at a time (one prompt, one task id)."""

    def __init__(self, proxy_url: str, policy: str, concurrency: int, max_tokens: int) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=f"{proxy_url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.root, self.policy, self.max_tokens = proxy_url, policy, max_tokens
        self.lanes = max(1, concurrency // GROUP)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.episodes: list[dict] = []
        self.failed = 0
        self.refused = 0  # 429s (--max-backlog), each waited out
        self.t0 = 0.0

    def _episode(self, kind: str, task: str) -> None:
        from openai import RateLimitError

        sid = f"{task}-{uuid.uuid4().hex[:8]}"
        while True:
            try:
                r = self.client.chat.completions.with_raw_response.create(
                    model=self.policy,
                    messages=[{"role": "user", "content": ASK[kind]}],
                    max_tokens=self.max_tokens,
                    extra_headers={"X-Session-Id": sid, "X-Task-Id": task},
                )
                answer = r.parse()
                version = int(r.headers.get("x-policy-version", "0"))
                break
            except RateLimitError as exc:  # --max-backlog: the trainer is behind; wait as told, unless time is up
                with self.lock:
                    self.refused += 1
                if self.stop.is_set():
                    return
                time.sleep(float(exc.response.headers.get("retry-after", "1")))
            except Exception:
                with self.lock:
                    self.failed += 1
                return
        reward = class_reward(kind, answer.choices[0].message.content or "")
        body = json.dumps({"session_id": sid, "reward": reward}).encode()
        req = urllib.request.Request(
            f"{self.root}/reward", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                resp.read()
        except Exception:
            with self.lock:
                self.failed += 1
            return
        with self.lock:
            self.episodes.append({"t": time.monotonic() - self.t0, "kind": kind, "reward": reward, "version": version})

    def _lane(self, lane: int) -> None:
        n = 0
        while not self.stop.is_set():
            kind = "digits" if (lane + n) % 2 == 0 else "letters"
            task = f"{kind}-l{lane}-r{n}"
            threads = [threading.Thread(target=self._episode, args=(kind, task)) for _ in range(GROUP)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            n += 1

    def run(self, duration: float) -> None:
        self.t0 = time.monotonic()
        lanes = [threading.Thread(target=self._lane, args=(i,), daemon=True) for i in range(self.lanes)]
        for t in lanes:
            t.start()
        time.sleep(duration)
        self.stop.set()
        for t in lanes:
            t.join(120)


def _ts(value: str | None) -> float | None:
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def store_numbers(db: Path) -> dict:
    con = sqlite3.connect(db)
    try:
        status = dict(
            con.execute(
                "SELECT status, count(*) FROM sessions WHERE finished_at IS NOT NULL GROUP BY status"
            ).fetchall()
        )
        steps = [json.loads(m) for (m,) in con.execute("SELECT metrics FROM train_steps ORDER BY step")]
        lag = []
        for step, published in con.execute("SELECT train_step, created_at FROM policy_versions"):
            (last,) = con.execute("SELECT max(finished_at) FROM sessions WHERE train_step = ?", (step,)).fetchone()
            if last is not None and published is not None:
                lag.append(_ts(published) - _ts(last))
    finally:
        con.close()
    rewarded = sum(status.values())
    return {
        "rewarded": rewarded,
        "trained": status.get("trained", 0),
        "skipped": status.get("skipped", 0),
        "left_open": status.get("open", 0) + status.get("claimed", 0),
        "steps": len(steps),
        "step_train_s": statistics.median([m["time/train_s"] for m in steps]) if steps else float("nan"),
        "step_total_s": statistics.median([sum(m[k] for k in m if k.startswith("time/")) for m in steps])
        if steps
        else float("nan"),
        "reward_to_serving_s": statistics.median(lag) if lag else float("nan"),
        "is_mean": statistics.fmean(
            [m["offpolicy/is_mean"] for m in steps if "offpolicy/is_mean" in m] or [float("nan")]
        ),
        "truncated_share": statistics.fmean(
            [m["offpolicy/truncated_share"] for m in steps if "offpolicy/truncated_share" in m] or [float("nan")]
        ),
        "staleness_mean": statistics.fmean(
            [m["staleness/mean"] for m in steps if m.get("staleness/mean") == m.get("staleness/mean")] or [float("nan")]
        ),
    }


def one_run(args, vllm_url: str, model: Path, variant: str, concurrency: int, logs: Path) -> dict:
    # "decoupled" or "decoupled+backlog64": the off-policy mode, and the proxy's --max-backlog (0: off)
    # "+newest": the trainer claims with --claim-order newest
    newest = variant.endswith("+newest")
    mode, _, backlog = variant.removesuffix("+newest").partition("+backlog")
    name = f"{variant}-c{concurrency}"
    work = args.workdir / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    db = work / "trainwire.db"
    env = {**os.environ, "TRAINWIRE_DATABASE_URL": f"sqlite:///{db}", "PYTHONUNBUFFERED": "1"}
    env.pop("TRAINWIRE_UPSTREAM", None)
    policy = f"p{uuid.uuid4().hex[:6]}"
    tw = [sys.executable, "-m", "trainwire.cli"]
    port = port_or_free(0)
    proxy_url = f"http://127.0.0.1:{port}"
    common = ["--upstream", vllm_url, "--policy-model", policy]
    proxy = Child(
        f"proxy-{name}",
        [
            *tw,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *common,
            "--journal-dir",
            str(work / "journal"),
            "--max-backlog",
            backlog or "0",
        ],
        env=env,
        log_path=logs / f"proxy-{name}.log",
    )
    trainer = None
    try:
        if not wait_healthy(f"{proxy_url}/healthz", proxy):
            raise RuntimeError(f"proxy {name} did not start")
        trainer = Child(
            f"trainer-{name}",
            [
                *tw,
                "train",
                *common,
                "--model",
                str(model),
                "--lora-rank",
                "8",
                "--lr",
                str(args.lr),
                "--batch-size",
                str(args.batch_size),
                "--group-size",
                str(GROUP),
                "--group-timeout-s",
                "20",
                "--settle-s",
                "0.3",
                "--poll-s",
                "0.3",
                "--lora-grace-s",
                "10",
                "--off-policy",
                mode,
                "--max-staleness",
                str(args.max_staleness),
                "--claim-order",
                "newest" if newest else "oldest",
                "--checkpoint-dir",
                str(work / "ckpt"),
            ],
            # vLLM's CPU engine spins on core 0: one OpenMP thread for the trainer (demo/run.py says why)
            env={**env, "OMP_NUM_THREADS": "1"},
            log_path=logs / f"trainer-{name}.log",
        )
        if not trainer.wait_for_line("waiting for rewarded sessions", timeout=300):
            raise RuntimeError(f"trainer {name} did not start; see {logs}")
        say(f"{name}: {concurrency} concurrent episodes for {args.duration:.0f}s")
        agents = Agents(proxy_url, policy, concurrency, args.max_tokens)
        agents.run(args.duration)
        time.sleep(args.drain_s)  # the trainer takes what the agents left
    finally:
        if trainer is not None:
            trainer.stop()
        proxy.stop()
    numbers = store_numbers(db)
    late = [e for e in agents.episodes if e["t"] >= args.duration - args.window_s]
    out = {
        "mode": variant,
        "refused_429": agents.refused,
        "concurrency": concurrency,
        "episodes": len(agents.episodes),
        "failed": agents.failed,
        **numbers,
        "trained_share": numbers["trained"] / numbers["rewarded"] if numbers["rewarded"] else float("nan"),
        "reward_last": mean_sem([e["reward"] for e in late]),
        "reward_first": mean_sem([e["reward"] for e in agents.episodes if e["t"] < args.window_s]),
        "reward_last_digits": mean_sem([e["reward"] for e in late if e["kind"] == "digits"]),
        "reward_last_letters": mean_sem([e["reward"] for e in late if e["kind"] == "letters"]),
        "last_version": max((e["version"] for e in agents.episodes), default=0),
    }
    say(f"{name}: {json.dumps(out)}")
    return out


def table(results: list[dict]) -> str:
    def ms(t) -> str:
        return f"{t[0]:.3f} ± {t[1]:.3f}"

    lines = [
        "| concurrent | mode | rewarded | trained | dropped stale / skipped | 429s | reward, first window | reward, "
        "last window (digits / letters) | steps | step time (train) | last reward → serving |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['concurrency']} | {r['mode']} | {r['rewarded']} | {r['trained']} ({100 * r['trained_share']:.1f}%) | "
            f"{r['skipped']} | {r['refused_429']} | {ms(r['reward_first'])} | {ms(r['reward_last'])} ({r['reward_last_digits'][0]:.2f} / "
            f"{r['reward_last_letters'][0]:.2f}) | {r['steps']} | {r['step_total_s']:.2f} s ({r['step_train_s']:.2f} s) "
            f"| {r['reward_to_serving_s']:.1f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--modes",
        default="drop,tis,decoupled,decoupled+backlog64",
        help="--off-policy modes; MODE+backlogN also runs the proxy with --max-backlog N, MODE+newest the trainer "
        "with --claim-order newest",
    )
    p.add_argument("--concurrency", default="32,64")
    p.add_argument("--duration", type=float, default=240.0, help="seconds of agents per run")
    p.add_argument("--drain-s", type=float, default=20.0, help="seconds the trainer gets after the agents stop")
    p.add_argument("--window-s", type=float, default=60.0, help="the last (and first) window the reward is read over")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-staleness", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "offpolicy")
    args = p.parse_args(argv)
    args.workdir = args.workdir.resolve()

    from demo.tiny_model import build_tiny_model
    from demo.vllm_server import start_vllm

    if not ensure_vllm_venv():
        return 1
    logs = args.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(args.workdir / "model")
    vllm = start_vllm(
        model, port_or_free(0), served_model_name="tiny", lora=True, log_path=logs / "vllm.log", timeout=600
    )
    results = []
    try:
        say(f"vLLM ready in {vllm.startup_s:.0f}s")
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            for mode in args.modes.split(","):
                results.append(one_run(args, vllm.url, model, mode, concurrency, logs))
                (args.workdir / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        vllm.stop()
    print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

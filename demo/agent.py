"""The demo's sample agent: the unchanged OpenAI SDK, pointed at trainwire with ``OPENAI_BASE_URL``.

The task is one a tiny random model can learn by RL in a few minutes: **answer with digits**. Each episode is a
two-turn chat (a request, then "More.") and its reward is the fraction of the non-space characters the model
wrote, over both answers, that are digits (0 for an empty answer). A random 512-token model starts around 0.2
(about one token in seven of its vocabulary is a number); the policy only has to learn to prefer those tokens,
which GRPO-style groups make easy to see: every prompt is asked ``--group-size`` times under one ``X-Task-Id``,
so the trainer compares samples of the same prompt with each other and the advantages are not zero.

One episode is one trainwire session (``X-Session-Id``). When it ends the agent posts its reward with an HTTP
request shaped exactly like::

    curl -X POST http://127.0.0.1:8100/reward -H 'Content-Type: application/json' \\
         -d '{"session_id": "digits-1a2b3c4d5e6f", "reward": 0.42}'

Every HTTP request the agent makes is written to ``--log`` (JSON lines) with its status code, the
``X-Policy-Version`` that served it and its ``X-Call-Id``, so a test can check that no request failed while
the trainer swapped weights, and that every call is in the store with the version the agent saw.

    export OPENAI_BASE_URL=http://127.0.0.1:8100/v1 OPENAI_API_KEY=unused
    python -m demo.agent --duration 120 --log episodes.jsonl

Pacing (``--max-backlog``): an online learner is only as useful as its data is fresh. With a backlog limit the
agent asks the proxy's ``GET /stats`` how many finished sessions wait for the trainer and holds back while
there are more than that, so it does not run many versions ahead of the trainer on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = [
    "Write a number.",
    "Give me some digits.",
    "What is the code?",
    "Count with me.",
    "Tell me a number.",
    "Numbers, please.",
    "What time is it?",
    "Say something.",
]
FOLLOW_UP = "More."


def digit_reward(text: str) -> float:
    """Fraction of non-space characters that are ASCII digits; 0.0 for an empty answer."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return sum(c in "0123456789" for c in chars) / len(chars)


def proxy_root(base_url: str) -> str:
    """http://host:port/v1 -> http://host:port (where /reward and /stats live)."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


class Recorder:
    """Thread-safe JSON-lines log of every request and episode, plus the running numbers for progress lines."""

    def __init__(self, path: Path | None) -> None:
        self.lock = threading.Lock()
        self.file = open(path, "a", buffering=1) if path else None
        self.requests = 0
        self.failed = 0
        self.episodes = 0
        self.by_version: dict[int, list[float]] = defaultdict(list)
        self.versions_seen: set[int] = set()

    def write(self, record: dict) -> None:
        with self.lock:
            if record["kind"] in ("chat", "reward"):
                self.requests += 1
                if record.get("status") != 200:
                    self.failed += 1
            if record["kind"] == "episode":
                self.episodes += 1
                self.by_version[record["policy_version"]].append(record["reward"])
                self.versions_seen.update(record["versions"])
            if self.file:
                self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.file:
            self.file.close()


def post_reward(root: str, session_id: str, reward: float, admin_key: str | None, timeout: float = 30.0) -> int:
    """`curl -X POST ROOT/reward -H 'Content-Type: application/json' -d '{"session_id":..,"reward":..}'`."""
    headers = {"Content-Type": "application/json"}
    if admin_key:
        headers["Authorization"] = f"Bearer {admin_key}"
    body = json.dumps({"session_id": session_id, "reward": reward}).encode()
    req = urllib.request.Request(f"{root}/reward", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def run_episode(client, rec: Recorder, *, root: str, task_id: str, prompt: str, args) -> dict:
    from openai import APIConnectionError, APIStatusError

    session_id = f"digits-{uuid.uuid4().hex[:12]}"
    headers = {"X-Session-Id": session_id, "X-Task-Id": task_id, "X-Agent-Name": "digits"}
    messages = [{"role": "user", "content": prompt}]
    answers, versions, call_ids = [], [], []
    ok = True
    for turn in range(args.turns):
        t0 = time.time()
        record = {"kind": "chat", "session_id": session_id, "task_id": task_id, "turn": turn, "t": t0}
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=args.model,
                messages=messages,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                extra_headers=headers,
            )
            completion = raw.parse()
            text = completion.choices[0].message.content or ""
            version = int(raw.headers.get("x-policy-version", "0"))
            record.update(
                status=raw.status_code,
                policy_version=version,
                call_id=raw.headers.get("x-call-id"),
                latency_s=time.time() - t0,
                tokens=completion.usage.completion_tokens if completion.usage else None,
            )
        except APIStatusError as exc:
            record.update(
                status=exc.status_code,
                error=str(exc)[:300],
                latency_s=time.time() - t0,
                call_id=exc.response.headers.get("x-call-id"),
            )
            rec.write(record)
            ok = False
            break
        except APIConnectionError as exc:
            record.update(status=0, error=repr(exc)[:300], latency_s=time.time() - t0)
            rec.write(record)
            ok = False
            break
        rec.write(record)
        answers.append(text)
        versions.append(version)
        call_ids.append(record["call_id"])
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": FOLLOW_UP}]
    reward = digit_reward(" ".join(answers)) if ok else 0.0
    t0 = time.time()
    status = post_reward(root, session_id, reward, args.admin_key)
    rec.write(
        {
            "kind": "reward",
            "session_id": session_id,
            "status": status,
            "t": t0,
            "latency_s": time.time() - t0,
            "reward": reward,
        }
    )
    episode = {
        "kind": "episode",
        "session_id": session_id,
        "task_id": task_id,
        "reward": reward,
        "ok": ok,
        "versions": versions,
        "policy_version": max(versions) if versions else -1,
        "call_ids": call_ids,
        "answers": answers,
        "t": time.time(),
    }
    rec.write(episode)
    return episode


def backlog(root: str, admin_key: str | None) -> int | None:
    """Finished sessions not yet claimed by the trainer, from GET /stats (None if unavailable)."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{root}/stats", headers=headers), timeout=10) as r:
            return int(json.loads(r.read())["sessions"]["finished"])
    except (urllib.error.URLError, OSError, KeyError, ValueError, TypeError):
        return None


def mean_sem(xs: list[float]) -> dict:
    """Episodes, mean reward and its standard error."""
    sem = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return {"episodes": len(xs), "mean": statistics.fmean(xs), "sem": sem}


def summarize(by_version: dict[int, list[float]]) -> list[dict]:
    """Per policy version, oldest first: {"version", "episodes", "mean", "sem"}."""
    return [{"version": v, **mean_sem(by_version[v])} for v in sorted(by_version)]


def progress_line(rec: Recorder, elapsed: float) -> str:
    rows = summarize(rec.by_version)
    shown = rows if len(rows) <= 6 else rows[:2] + rows[-4:]
    per_version = "  ".join(f"v{r['version']}:{r['mean']:.2f}(n={r['episodes']})" for r in shown)
    return (
        f"[agent {elapsed:5.0f}s] episodes {rec.episodes:4d} | requests {rec.requests} failed {rec.failed} | "
        f"versions seen {len(rec.versions_seen)} | reward by version {per_version}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="trainwire demo agent: learn to answer with digits")
    p.add_argument("--duration", type=float, default=120.0, help="seconds to run (0 = until --episodes)")
    p.add_argument("--episodes", type=int, default=0, help="stop after this many episodes (0 = no limit)")
    p.add_argument("--group-size", type=int, default=8, help="episodes per prompt under one X-Task-Id")
    p.add_argument("--groups-per-round", type=int, default=4, help="prompts asked concurrently per round")
    p.add_argument("--concurrency", type=int, default=8, help="episodes in flight")
    p.add_argument("--turns", type=int, default=2, help="LLM calls per episode")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--model", default="policy")
    p.add_argument(
        "--max-backlog",
        type=int,
        default=0,
        help="hold back while more finished sessions than this wait for the trainer (0 = off)",
    )
    p.add_argument("--log", type=Path, default=None, help="JSON lines of every request and episode")
    p.add_argument("--progress-s", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--admin-key", default=os.environ.get("TRAINWIRE_ADMIN_KEY"))
    args = p.parse_args(argv)

    from openai import OpenAI

    client = OpenAI(max_retries=0, timeout=120)  # OPENAI_BASE_URL / OPENAI_API_KEY from the environment
    root = proxy_root(str(client.base_url))
    rec = Recorder(args.log)
    run_id = uuid.uuid4().hex[:6]
    print(
        f"[agent] policy at {client.base_url}; rewards: curl -X POST {root}/reward "
        '-H \'Content-Type: application/json\' -d \'{"session_id": "...", "reward": R}\'',
        flush=True,
    )
    t_start = time.time()
    last_progress = t_start
    rounds = 0
    stop = threading.Event()
    try:
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            while not stop.is_set():
                elapsed = time.time() - t_start
                if args.duration and elapsed >= args.duration:
                    break
                if args.episodes and rec.episodes >= args.episodes:
                    break
                if args.max_backlog:
                    waited = 0.0
                    while waited < 30 and (b := backlog(root, args.admin_key)) is not None and b > args.max_backlog:
                        time.sleep(0.25)
                        waited += 0.25
                jobs = []
                for g in range(args.groups_per_round):
                    prompt = PROMPTS[(rounds * args.groups_per_round + g) % len(PROMPTS)]
                    task_id = f"digits-{run_id}-r{rounds}-g{g}"
                    jobs += [
                        pool.submit(run_episode, client, rec, root=root, task_id=task_id, prompt=prompt, args=args)
                        for _ in range(args.group_size)
                    ]
                for job in jobs:
                    job.result()
                rounds += 1
                if time.time() - last_progress >= args.progress_s:
                    print(progress_line(rec, time.time() - t_start), flush=True)
                    last_progress = time.time()
    except KeyboardInterrupt:
        stop.set()
    finally:
        rec.close()
    if time.time() - last_progress > 0.5:
        print(progress_line(rec, time.time() - t_start), flush=True)
    return 0 if rec.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

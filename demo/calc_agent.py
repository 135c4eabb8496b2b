"""The calculator agent of `make demo-calc`: the unchanged OpenAI SDK, pointed at trainwire with ``OPENAI_BASE_URL``.

One episode is one trainwire session: the agent asks an arithmetic question (:mod:`demo.calc_task`), offers one
tool, ``calculator``, runs every tool call the model makes and sends the result back as a ``tool`` message, and
accepts the first answer that is not a tool call as the final one (at most ``--max-turns`` model calls). The
episode's reward is its correctness, 1 or 0, posted to ``/reward`` like curl would; a tool call the calculator
cannot run gets an ``Error: ...`` result, which the proxy's ``--air-tool-error`` rule penalises, and one vLLM's
parser could not read as a tool call stays in the answer's text (and the answer is wrong).

    export OPENAI_BASE_URL=http://127.0.0.1:8100/v1 OPENAI_API_KEY=unused
    python -m demo.calc_agent --phase rl --model policy --duration 120 --group-size 8 --log rl.jsonl
    python -m demo.calc_agent --phase eval --model policy --eval 200 --log eval.jsonl

``--eval N`` runs the first N questions of the fixed held-out set, once each, as evaluation calls
(``X-Trainwire-Train: false``: recorded, never trained on) and posts no reward, so no trainer claims them. Without
it the agent asks questions from the training pool, ``--group-size`` episodes per question under one
``X-Task-Id`` (a GRPO group), and posts rewards.

Every episode is one JSON line in ``--log``: the phase, correctness, the number of model calls (turns), tool-call
attempts and how many of them were valid, the policy versions that served it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from demo import calc_task  # noqa: E402
from demo.agent import backlog, post_reward, proxy_root  # noqa: E402


def open_episode(
    q: calc_task.Question, *, prefix: str, agent: str, phase: str, model: str, train: bool, task_id: str | None
) -> tuple[dict, dict]:
    """A new episode record and the trainwire headers of its session (one session per episode)."""
    session_id = f"{prefix}-{phase}-{uuid.uuid4().hex[:12]}"
    headers = {"X-Session-Id": session_id, "X-Agent-Name": agent}
    if task_id:
        headers["X-Task-Id"] = task_id
    if not train:
        headers["X-Trainwire-Train"] = "false"
    episode = {
        "kind": "episode",
        "phase": phase,
        "model": model,
        "session_id": session_id,
        "question": q.text,
        "expected": q.answer,
        "answer": None,
        "turns": 0,
        "attempts": 0,
        "valid": 0,
        "versions": [],
        "ok": True,
        "error": None,
        "t0": time.time(),
    }
    return episode, headers


def close_episode(episode: dict, q: calc_task.Question, *, train: bool, args) -> dict:
    """Grade the episode and, for a training episode, post its reward like curl would."""
    episode["correct"] = episode["ok"] and calc_task.is_correct(q, episode["answer"])
    episode["reward"] = 1.0 if episode["correct"] else 0.0
    if train and episode["ok"]:
        episode["reward_status"] = post_reward(args.root, episode["session_id"], episode["reward"], args.admin_key)
        episode["ok"] = episode["reward_status"] == 200
    episode["t"] = time.time()
    return episode


def run_episode(
    client, q: calc_task.Question, *, phase: str, model: str, train: bool, task_id: str | None, args
) -> dict:
    from openai import APIConnectionError, APIStatusError

    episode, headers = open_episode(
        q, prefix="calc", agent="calculator", phase=phase, model=model, train=train, task_id=task_id
    )
    messages = q.messages()
    for _ in range(args.max_turns):
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=model,
                messages=messages,
                tools=[calc_task.TOOL],
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                extra_headers=headers,
            )
            completion = raw.parse()
        except (APIStatusError, APIConnectionError) as exc:
            episode.update(ok=False, error=str(exc)[:300])
            break
        episode["turns"] += 1
        episode["versions"].append(int(raw.headers.get("x-policy-version", "0")))
        msg = completion.choices[0].message
        if msg.tool_calls:
            messages.append(
                {
                    "role": "assistant",
                    "content": msg.content,
                    "tool_calls": [tc.model_dump(include={"id", "type", "function"}) for tc in msg.tool_calls],
                }
            )
            for tc in msg.tool_calls:
                fn = getattr(tc, "function", None)
                result, valid = calc_task.run_tool(getattr(fn, "name", None), getattr(fn, "arguments", None))
                episode["attempts"] += 1
                episode["valid"] += int(valid)
                messages.append({"role": "tool", "tool_call_id": tc.id, "content": result})
            continue
        text = msg.content or ""
        if "<tool_call>" in text:  # a tool call vLLM's parser could not read: malformed
            episode["attempts"] += 1
        episode["answer"] = text
        break
    return close_episode(episode, q, train=train, args=args)


# ------------------------------------------------------------------------------------------------ numbers


def _sem(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n > 1 else float("nan")


def summarize(episodes: list[dict]) -> dict:
    """Accuracy, tool-call validity (valid calls / attempts) and mean turns, each with its standard error."""
    n = len(episodes)
    if not n:
        return {"n": 0}
    acc = sum(e["correct"] for e in episodes) / n
    attempts = sum(e["attempts"] for e in episodes)
    valid = sum(e["valid"] for e in episodes)
    validity = valid / attempts if attempts else float("nan")
    turns = [e["turns"] for e in episodes]
    mean_turns = sum(turns) / n
    turns_sd = math.sqrt(sum((x - mean_turns) ** 2 for x in turns) / (n - 1)) if n > 1 else float("nan")
    used = sum(1 for e in episodes if e["valid"]) / n
    return {
        "n": n,
        "accuracy": acc,
        "accuracy_sem": _sem(acc, n),
        "attempts": attempts,
        "validity": validity,
        "validity_sem": _sem(validity, attempts) if attempts else float("nan"),
        "tool_use": used,
        "tool_use_sem": _sem(used, n),
        "turns": mean_turns,
        "turns_sem": turns_sd / math.sqrt(n) if n > 1 else float("nan"),
    }


def progress_line(phase: str, episodes: list[dict], elapsed: float, total: int | None) -> str:
    s = summarize(episodes)
    if not s["n"]:
        return f"[calc {phase} {elapsed:5.0f}s] no episodes yet"
    versions = sorted({v for e in episodes for v in e["versions"]})
    shown = f"v{versions[0]}" + (f"..v{versions[-1]}" if len(versions) > 1 else "") if versions else "-"
    validity = f"{s['validity']:.0%} of {s['attempts']}" if s["attempts"] else "no attempts"
    return (
        f"[calc {phase} {elapsed:5.0f}s] episodes {s['n']}{f'/{total}' if total else ''} | accuracy "
        f"{s['accuracy']:.3f} ± {s['accuracy_sem']:.3f} | tool calls valid {validity} | turns {s['turns']:.2f} | "
        f"served by {shown}"
        + (f" | {sum(not e['ok'] for e in episodes)} failed" if any(not e["ok"] for e in episodes) else "")
    )


# ------------------------------------------------------------------------------------------------ main


def openai_client():
    from openai import OpenAI

    return OpenAI(max_retries=0, timeout=120)  # OPENAI_BASE_URL / OPENAI_API_KEY from the environment


def main(
    argv: list[str] | None = None, *, episode=run_episode, make_client=openai_client, name: str = "calculator"
) -> int:
    """The agent's loop: evaluation or training rounds, progress lines, the episode log. ``episode`` runs one
    episode with the client ``make_client`` returns (``demo.real_agent`` passes its OpenAI Agents SDK agent)."""
    p = argparse.ArgumentParser(description=f"trainwire {name} agent")
    p.add_argument("--phase", default="run", help="label of this run in the log and the session ids")
    p.add_argument("--model", default="policy", help="model name to request (policy, or a frozen route)")
    p.add_argument(
        "--eval",
        type=int,
        default=0,
        metavar="N",
        help="evaluate on the first N held-out questions (X-Trainwire-Train: false, no rewards)",
    )
    p.add_argument("--episodes", type=int, default=0, help="training episodes to run (0 = until --duration)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds of training episodes (0 = no limit)")
    p.add_argument("--seed", type=int, default=1, help="which training questions (a seeded draw)")
    p.add_argument("--group-size", type=int, default=1, help="episodes per training question, one X-Task-Id")
    p.add_argument("--groups-per-round", type=int, default=8, help="questions asked concurrently per round")
    p.add_argument("--concurrency", type=int, default=8, help="episodes in flight")
    p.add_argument("--max-turns", type=int, default=3, help="model calls per episode at most")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--max-backlog",
        type=int,
        default=0,
        help="hold back while more finished sessions than this wait for the trainer (0 = off)",
    )
    p.add_argument("--log", type=Path, default=None, help="JSON lines, one per episode")
    p.add_argument("--progress-s", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--admin-key", default=os.environ.get("TRAINWIRE_ADMIN_KEY"))
    args = p.parse_args(argv)

    client = make_client()
    args.root = proxy_root(str(client.base_url))
    episodes: list[dict] = []
    lock = threading.Lock()
    log = open(args.log, "a", buffering=1) if args.log else None
    t_start = last = time.time()
    total = args.eval or args.episodes or None

    def done(ep: dict) -> None:
        nonlocal last
        with lock:
            episodes.append(ep)
            if log:
                log.write(json.dumps(ep) + "\n")
            if time.time() - last >= args.progress_s:
                last = time.time()
                print(progress_line(args.phase, episodes, last - t_start, total), flush=True)

    try:
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            if args.eval:
                jobs = [
                    pool.submit(
                        episode, client, q, phase=args.phase, model=args.model, train=False, task_id=None, args=args
                    )
                    for q in calc_task.eval_set(args.eval)
                ]
                for job in jobs:
                    done(job.result())
            else:
                pool_questions = iter(calc_task.questions(max(args.episodes, 50000), held_out=False, seed=args.seed))
                run_id = uuid.uuid4().hex[:6]
                rounds = 0
                while True:
                    if args.duration and time.time() - t_start >= args.duration:
                        break
                    if args.episodes and len(episodes) >= args.episodes:
                        break
                    if args.max_backlog:
                        waited = 0.0
                        while (
                            waited < 30
                            and (b := backlog(args.root, args.admin_key)) is not None
                            and b > args.max_backlog
                        ):
                            time.sleep(0.25)
                            waited += 0.25
                    jobs = []
                    for g in range(args.groups_per_round):
                        q = next(pool_questions)
                        task = f"calc-{args.phase}-{run_id}-r{rounds}-g{g}" if args.group_size > 1 else None
                        n = args.group_size
                        if args.episodes:
                            n = min(n, args.episodes - len(episodes) - len(jobs))
                        jobs += [
                            pool.submit(
                                episode,
                                client,
                                q,
                                phase=args.phase,
                                model=args.model,
                                train=True,
                                task_id=task,
                                args=args,
                            )
                            for _ in range(max(0, n))
                        ]
                    for job in jobs:
                        done(job.result())
                    rounds += 1
    except KeyboardInterrupt:
        pass
    finally:
        if log:
            log.close()
    print(progress_line(args.phase, episodes, time.time() - t_start, total), flush=True)
    failed = sum(not e["ok"] for e in episodes)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())

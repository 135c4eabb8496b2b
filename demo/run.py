"""`make demo`: the whole trainwire loop on a laptop CPU, with real parts, in a few minutes.

1. a CPU build of vLLM in its own cached venv (scripts/setup_vllm_venv.sh; minutes the first time only),
2. a tiny Llama-style model and tokenizer built locally into .demo/model (no downloads),
3. vLLM serving it (runtime LoRA and dev-mode endpoints on, ``--logprobs-mode processed_logprobs``),
   ``trainwire serve`` in front of it (SQLite in .demo/ unless TRAINWIRE_DATABASE_URL is set) and
   ``trainwire train`` (verl's engine on CPU, publishing each step into the running vLLM),
4. the sample agent (demo/agent.py) on the unchanged OpenAI SDK with ``OPENAI_BASE_URL`` set to the proxy,
   posting rewards the way curl does,
5. progress while it runs, then a reward curve (.demo/reward_curve.png) and the commands to look at the data,
6. every process it started is stopped at the end, on Ctrl-C and on SIGTERM.

    python -m demo.run [--duration 120] [--lora-rank 8] [--keep-serving]

Everything it writes lives in .demo/ (logs in .demo/logs/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.agent import mean_sem, summarize  # noqa: E402
from demo.procs import (  # noqa: E402
    STACK,
    T0,
    Child,
    TrainerEcho,
    ensure_vllm_venv,
    fresh_store,
    port_or_free,
    run_demo,
    say,
    wait_healthy,
)

# ------------------------------------------------------------------------------------------------ results


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def per_version(episodes: list[dict]) -> list[dict]:
    """Mean reward per policy version an episode was served by: {"version", "episodes", "mean", "sem"}."""
    by: dict[int, list[float]] = {}
    for e in episodes:
        by.setdefault(e["policy_version"], []).append(e["reward"])
    return summarize(by)


def first_last(rows: list[dict], min_episodes: int) -> tuple[dict | None, dict | None]:
    """The first version, and the newest one with enough episodes to measure its mean."""
    enough = [r for r in rows if r["episodes"] >= min_episodes]
    if not enough:
        return None, None
    return enough[0], enough[-1]


def version_table(episodes: list[dict], max_rows: int = 10) -> list[dict]:
    """Mean reward per policy version for the console: the base model (v0) on its own row, later versions
    merged into at most ``max_rows - 1`` consecutive ranges holding about the same number of episodes."""
    by: dict[int, list[float]] = {}
    for e in episodes:
        by.setdefault(e["policy_version"], []).append(e["reward"])
    versions = sorted(by)
    head = [[v] for v in versions[:1]]
    rest = versions[1:]
    total = sum(len(by[v]) for v in rest)
    chunks: list[list[int]] = []
    target = total / max(1, max_rows - 1)
    for v in rest:
        if not chunks or sum(len(by[u]) for u in chunks[-1]) >= target:
            chunks.append([])
        chunks[-1].append(v)
    return [
        {"label": f"v{g[0]}" if len(g) == 1 else f"v{g[0]}-v{g[-1]}", **mean_sem([x for v in g for x in by[v]])}
        for g in head + chunks
    ]


def plot(episodes: list[dict], rows: list[dict], out: Path, title: str) -> Path:
    """A reward curve: episodes over time with a moving average and the swaps, and the mean per version."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_plain(rows, out)
    t0 = min(e["t"] for e in episodes)
    xs = [e["t"] - t0 for e in episodes]
    ys = [e["reward"] for e in episodes]
    order = sorted(range(len(xs)), key=xs.__getitem__)
    xs, ys = [xs[i] for i in order], [ys[i] for i in order]
    vs = [episodes[i]["policy_version"] for i in order]
    k = max(8, len(ys) // 25)
    avg = [statistics.fmean(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    a.scatter(xs, ys, s=4, alpha=0.25, color="tab:gray", label="episode reward")
    a.plot(xs, avg, color="tab:blue", lw=2, label=f"moving average ({k} episodes)")
    newest = vs[0]
    for i in range(1, len(vs)):
        if vs[i] > newest:
            newest = vs[i]
            a.axvline(xs[i], color="tab:orange", lw=0.5, alpha=0.35)
    a.plot([], [], color="tab:orange", lw=0.6, label="new policy version served")
    a.set(
        xlabel="seconds since the agent started", ylabel="reward (fraction of digits)", ylim=(-0.02, 1.02), title=title
    )
    a.legend(loc="lower right", fontsize=8)
    b.errorbar(
        [r["version"] for r in rows],
        [r["mean"] for r in rows],
        yerr=[0 if math.isnan(r["sem"]) else 2 * r["sem"] for r in rows],
        fmt="o-",
        capsize=3,
    )
    b.set(
        xlabel="policy version (X-Policy-Version)",
        ylabel="mean reward ± 2 SE",
        ylim=(-0.02, 1.02),
        title="mean reward per policy version",
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_plain(rows: list[dict], out: Path) -> Path:
    """Without matplotlib: a bar per policy version (height = mean reward) as a PNG, standard library only."""
    import struct
    import zlib

    w, h, pad = 640, 320, 20
    img = [[(255, 255, 255)] * w for _ in range(h)]
    n = max(1, len(rows))
    bw = max(2, (w - 2 * pad) // n - 4)
    for i, r in enumerate(rows):
        x0 = pad + i * ((w - 2 * pad) // n)
        top = h - pad - int((h - 2 * pad) * max(0.0, min(1.0, r["mean"])))
        for y in range(top, h - pad):
            for x in range(x0, min(w - pad, x0 + bw)):
                img[y][x] = (31, 119, 180)
    for x in range(pad, w - pad):
        img[h - pad][x] = (0, 0, 0)
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in img)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    out.write_bytes(png)
    return out


# ------------------------------------------------------------------------------------------------ the demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=120.0, help="seconds the agent runs")
    p.add_argument("--workdir", type=Path, default=ROOT / ".demo")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-3 LoRA, 1e-4 full)")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt (one GRPO group)")
    p.add_argument("--groups-per-step", type=int, default=4, help="groups per training step")
    p.add_argument("--vllm-port", type=int, default=8000)
    p.add_argument("--proxy-port", type=int, default=8100)
    p.add_argument(
        "--keep-serving",
        action="store_true",
        help="after the run keep vLLM and the proxy up (Ctrl-C to stop) to look at the data",
    )
    p.add_argument("--agent-log", type=Path, default=None, help="agent JSON lines (default: WORKDIR/agent.jsonl)")
    args = p.parse_args(argv)
    return run_demo(run, args)


def run(args) -> int:
    from demo.tiny_model import build_tiny_model
    from demo.vllm_server import start_vllm

    work = args.workdir.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    trainwire = [sys.executable, "-m", "trainwire.cli"]
    lr = args.lr if args.lr is not None else (1e-3 if args.lora_rank else 1e-4)
    batch = args.group_size * args.groups_per_step

    # 1. vLLM venv (cached) ------------------------------------------------------------------------
    if not ensure_vllm_venv():
        return 1

    # 2. tiny model ---------------------------------------------------------------------------------
    say("building the tiny model into .demo/model (random weights, local tokenizer, no downloads)")
    model = build_tiny_model(work / "model")

    # 3. vLLM, proxy, trainer ---------------------------------------------------------------------------
    vllm_port = port_or_free(args.vllm_port)
    proxy_port = port_or_free(args.proxy_port)
    while proxy_port == vllm_port:
        proxy_port = port_or_free(0)
    say(f"starting vLLM on :{vllm_port} (runtime LoRA, dev mode, processed logprobs; 35-60 s on 2 cores)")
    vllm = start_vllm(model, vllm_port, served_model_name="tiny", lora=True, log_path=logs / "vllm.log", timeout=600)
    STACK.push("vllm", vllm)
    say(f"vLLM ready in {vllm.startup_s:.0f}s at {vllm.url} (log .demo/logs/vllm.log)")

    db_url = fresh_store(work)
    ckpt = work / "checkpoints"
    shutil.rmtree(ckpt, ignore_errors=True)
    env = {**os.environ, "TRAINWIRE_DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1"}
    env.pop("TRAINWIRE_UPSTREAM", None)
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    proxy = Child(
        "proxy",
        [
            *trainwire,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(proxy_port),
            "--upstream",
            vllm.url,
            "--journal-dir",
            str(work / "journal"),
        ],
        env=env,
        log_path=logs / "proxy.log",
    )
    STACK.push("proxy", proxy)
    train_argv = [
        *trainwire,
        "train",
        "--upstream",
        vllm.url,
        "--model",
        str(model),
        "--lora-rank",
        str(args.lora_rank),
        "--lr",
        str(lr),
        "--batch-size",
        str(batch),
        "--group-size",
        str(args.group_size),
        "--group-timeout-s",
        "20",
        "--checkpoint-dir",
        str(ckpt),
        "--settle-s",
        "0.3",
        "--poll-s",
        "0.3",
        "--lora-grace-s",
        "20",
    ]
    # vLLM's CPU engine binds its OpenMP thread to core 0 and spins there while it serves; a trainer whose
    # OpenMP team also wants that core waits on its barriers (steps got 10x slower on 2 cores). One thread.
    trainer_env = {**env, "OMP_NUM_THREADS": env.get("TRAINWIRE_DEMO_TRAINER_THREADS", "1")}
    trainer = Child("trainer", train_argv, env=trainer_env, log_path=logs / "trainer.log", echo=TrainerEcho())
    STACK.push("trainer", trainer)
    if not wait_healthy(f"{proxy_url}/healthz", proxy):
        say(f"the proxy did not start; see {logs / 'proxy.log'}")
        return 1
    say(f"proxy ready at {proxy_url} (store: {db_url}); waiting for the trainer to load verl's engine")
    if not trainer.wait_for_line("waiting for rewarded sessions", timeout=300):
        say(f"the trainer did not start; see {logs / 'trainer.log'}")
        return 1

    # 4. the agent -----------------------------------------------------------------------------------------
    agent_log = (args.agent_log or work / "agent.jsonl").resolve()
    agent_log.unlink(missing_ok=True)
    agent_env = {
        **os.environ,
        "OPENAI_BASE_URL": f"{proxy_url}/v1",
        "OPENAI_API_KEY": "not-needed",
        "PYTHONUNBUFFERED": "1",
    }
    say(
        f"agent: OPENAI_BASE_URL={proxy_url}/v1, {args.duration:.0f}s of episodes, groups of "
        f"{args.group_size} per prompt (X-Task-Id), reward = fraction of digits in the answers"
    )
    agent = Child(
        "agent",
        [
            sys.executable,
            "-m",
            "demo.agent",
            "--duration",
            str(args.duration),
            "--group-size",
            str(args.group_size),
            "--groups-per-round",
            str(args.groups_per_step),
            "--max-backlog",
            str(batch),
            "--log",
            str(agent_log),
        ],
        env=agent_env,
        log_path=logs / "agent.log",
        echo=lambda line: True,
    )
    STACK.push("agent", agent)
    agent.wait()
    STACK.stop("agent")
    say("agent finished; stopping the trainer after its current step")
    STACK.stop("trainer")

    # 5. results ---------------------------------------------------------------------------------------------
    records = read_log(agent_log)
    episodes = [r for r in records if r["kind"] == "episode" and r["ok"]]
    requests = [r for r in records if r["kind"] in ("chat", "reward")]
    failed = [r for r in requests if r["status"] != 200]
    rows = per_version(episodes)
    swaps = [line for line in trainer.seen if "[trainwire train] step" in line]
    print("", flush=True)
    say(
        f"{len(episodes)} episodes, {len(requests)} HTTP requests ({len(failed)} failed), "
        f"{len(swaps)} policy versions published by the trainer"
    )
    print("  policy versions  episodes  mean reward  ± SE", flush=True)
    for r in version_table(episodes):
        print(f"  {r['label']:<15s} {r['episodes']:9d}  {r['mean']:11.3f}  {r['sem']:.3f}", flush=True)
    first, last = first_last(rows, min_episodes=16)
    if first and last and last is not first:
        se = math.hypot(first["sem"], last["sem"])
        gain = last["mean"] - first["mean"]
        say(
            f"mean reward v{first['version']} {first['mean']:.3f} (n={first['episodes']}) -> v{last['version']} "
            f"{last['mean']:.3f} (n={last['episodes']}): {gain:+.3f}, "
            f"{gain / se if se else float('inf'):.1f} standard errors"
        )
    if episodes:
        kind = f"LoRA rank {args.lora_rank}" if args.lora_rank else "full fine-tuning"
        png = plot(episodes, rows, work / "reward_curve.png", f"trainwire demo: {kind}, lr {lr:g}")
        say(f"reward curve: {png}")
    cli = f"{bin_dir / 'trainwire'}"
    print(
        f"""
Look at the recorded data (the proxy reads the store; vLLM is not needed for this):
  {cli} serve --database-url {db_url} --port {proxy_port} &
  curl -s '{proxy_url}/sessions?limit=3' | python -m json.tool
  curl -s {proxy_url}/stats | python -m json.tool
  curl -s '{proxy_url}/sessions/<session id>?tokens=true' | python -m json.tool
  {cli} export --database-url {db_url} --out {work / "calls.jsonl"}
Logs: {logs}/ (vllm, proxy, trainer, agent); TensorBoard: {ckpt / "tensorboard"}
""",
        flush=True,
    )
    if args.keep_serving:
        say(f"--keep-serving: vLLM {vllm.url} and the proxy {proxy_url} stay up; Ctrl-C to stop them")
        while proxy.alive() and vllm.alive():
            time.sleep(1)
    say(f"done in {time.monotonic() - T0:.0f}s; stopping vLLM and the proxy")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())

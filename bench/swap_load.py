"""Weight swaps under load: requests in flight through `trainwire serve` while the trainer's publisher swaps a LoRA
adapter and reloads the full weights of the running vLLM (pause → reload → reset cache → resume).

One vLLM (CPU, the demo's tiny model, runtime LoRA and dev mode) behind one proxy (SQLite); ``--threads`` agents on
the OpenAI SDK send chat requests back to back. After ``--warmup-s`` the publisher (``rl/publish.py``, what
``trainwire train`` runs) alternates a LoRA publish (a new adapter, recorded in the store so the proxy switches to
it) and a full reload (the base weights again, in place), ``--swaps`` of each, ``--gap-s`` apart. Every request is
kept with its start, end, status and the version that served it; a request is "during" a swap when it overlaps
the swap's window. Reported: failures, latency p50/p99/max of requests during each kind of swap against the
requests overlapping no swap, and each swap's own duration (the pause, for a full reload).

    flock /tmp/trainwire-vllm.lock .venv/bin/python -m bench.swap_load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.procs import Child, ensure_vllm_venv, port_or_free, say, wait_healthy  # noqa: E402

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model: Path, out: Path, seed: int) -> Path:
    """A rank-8 PEFT adapter on every linear layer with small random weights (what the trainer exports)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR, init_lora_weights=False))
    peft.save_pretrained(str(out))
    return out


class Load:
    def __init__(self, proxy_url: str, threads: int, max_tokens: int) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=f"{proxy_url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.threads, self.max_tokens = threads, max_tokens
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.requests: list[dict] = []

    def _agent(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            status, version = 200, None
            try:
                r = self.client.chat.completions.with_raw_response.create(
                    model="policy",
                    messages=[{"role": "user", "content": "Count with me."}],
                    max_tokens=self.max_tokens,
                    extra_headers={"X-Session-Id": f"swap-{uuid.uuid4().hex[:10]}"},
                )
                r.parse()
                version = int(r.headers.get("x-policy-version", "0"))
            except Exception as exc:
                status = getattr(exc, "status_code", None) or 0
            with self.lock:
                self.requests.append({"start": t0, "end": time.monotonic(), "status": status, "version": version})

    def start(self) -> list[threading.Thread]:
        ts = [threading.Thread(target=self._agent, daemon=True) for _ in range(self.threads)]
        for t in ts:
            t.start()
        return ts


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def swaps(args, vllm_url: str, model: Path, db_url: str, work: Path) -> list[dict]:
    from trainwire.rl.publish import Publisher
    from trainwire.store.db import make_engine
    from trainwire.store.policy import record_publish

    engine = make_engine(db_url.replace("sqlite:///", "sqlite+aiosqlite:///", 1))
    out = []
    try:
        async with (
            Publisher([vllm_url], kind="lora", policy_name="policy", lora_grace_s=5) as lora,
            Publisher([vllm_url], kind="full", policy_name="policy") as full,
        ):
            version = 0
            for _ in range(args.swaps):
                for kind, pub in (("lora", lora), ("full", full)):
                    await asyncio.sleep(args.gap_s)
                    version += 1
                    path = make_adapter(model, work / f"adapter-v{version}", version) if kind == "lora" else model
                    t0 = time.monotonic()
                    result = await pub.publish(version, str(path))
                    t1 = time.monotonic()
                    if result.reached:
                        await record_publish(
                            engine,
                            version=version,
                            kind=kind,
                            served_model=result.served_model if kind == "lora" else "tiny",
                            path=str(path),
                            train_step=version,
                            reached=result.reached,
                            failed=list(result.failed),
                        )
                    out.append({"kind": kind, "version": version, "start": t0, "end": t1, "failed": result.failed})
                    say(f"{kind} swap to v{version}: {1000 * (t1 - t0):.0f} ms, failed upstreams {result.failed}")
                    await lora.unload_expired()
    finally:
        await engine.dispose()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--warmup-s", type=float, default=10.0)
    p.add_argument("--gap-s", type=float, default=4.0)
    p.add_argument("--swaps", type=int, default=4, help="LoRA swaps and full reloads, each")
    p.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "swap_load")
    args = p.parse_args(argv)
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)

    from demo.tiny_model import build_tiny_model
    from demo.vllm_server import start_vllm

    if not ensure_vllm_venv():
        return 1
    model = build_tiny_model(work / "model")
    vllm = start_vllm(model, port_or_free(0), served_model_name="tiny", lora=True, log_path=work / "logs" / "vllm.log")
    db_url = f"sqlite:///{work / 'trainwire.db'}"
    port = port_or_free(0)
    proxy_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TRAINWIRE_DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1"}
    proxy = Child(
        "proxy",
        [sys.executable, "-m", "trainwire.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        + ["--upstream", vllm.url, "--journal-dir", str(work / "journal"), "--policy-poll-s", "0.2"],
        env=env,
        log_path=work / "logs" / "proxy.log",
    )
    try:
        if not wait_healthy(f"{proxy_url}/healthz", proxy):
            raise RuntimeError("the proxy did not start")
        load = Load(proxy_url, args.threads, args.max_tokens)
        threads = load.start()
        time.sleep(args.warmup_s)
        done = asyncio.run(swaps(args, vllm.url, model, db_url, work))
        time.sleep(args.gap_s)
        load.stop.set()
        for t in threads:
            t.join(60)
    finally:
        proxy.stop()
        vllm.stop()

    reqs = [r for r in load.requests if r["start"] >= load.requests[0]["start"] + 2.0]  # past the cold start

    def during(kind: str | None) -> list[dict]:
        windows = [(s["start"], s["end"]) for s in done if kind is None or s["kind"] == kind]
        hit = [r for r in reqs if any(r["start"] < e and r["end"] > s for s, e in windows)]
        return hit if kind is not None else [r for r in reqs if r not in hit]

    rows = {}
    for label, kind in (("no swap", None), ("LoRA swap", "lora"), ("full reload", "full")):
        rs = during(kind)
        lat = [1000 * (r["end"] - r["start"]) for r in rs]
        rows[label] = {
            "requests": len(rs),
            "failed": sum(r["status"] != 200 for r in rs),
            "p50_ms": pct(lat, 0.5),
            "p99_ms": pct(lat, 0.99),
            "max_ms": max(lat, default=float("nan")),
        }
    swap_ms = {k: [1000 * (s["end"] - s["start"]) for s in done if s["kind"] == k] for k in ("lora", "full")}
    summary = {
        "requests": len(load.requests),
        "failed_total": sum(r["status"] != 200 for r in load.requests),
        "versions_served": sorted({r["version"] for r in load.requests if r["version"] is not None}),
        "by_window": rows,
        "swap_ms": {k: {"median": statistics.median(v), "max": max(v)} for k, v in swap_ms.items() if v},
    }
    (work / "results.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)
    print("| requests | count | failed | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(
            f"| {label} | {r['requests']} | {r['failed']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['max_ms']:.0f} |"
        )
    return 0 if summary["failed_total"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

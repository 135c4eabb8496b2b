"""Two ways to make OpenAI's Responses API trainable, measured side by side on a real vLLM (CPU):

- native: vLLM's own `POST /v1/responses` with `enable_response_messages` (prompt and completion token ids) and
  `include: ["message.output_text.logprobs"]`;
- translated: trainwire's `/v1/responses`, which sends vLLM a chat completion and records its token ids and logprobs.

For each it reports, over the same requests (plain questions and tool turns with `tool_choice: "required"`): the
share of turns with prompt and completion token ids, the share whose logprobs cover every completion token, the
share of tool turns that come back as `function_call` items, and the p50 latency.

    .venv/bin/python -m bench.responses_paths [--vllm URL] [--n 20]

Without --vllm it builds the tiny model and starts vLLM from the cached venv (about a minute).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.ports import free_port  # noqa: E402

TOOLS = [
    {
        "type": "function",
        "name": "calculator",
        "description": "Evaluate an arithmetic expression",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    }
]


def requests(n: int) -> list[dict]:
    out = []
    for i in range(n):
        body = {
            "input": f"What is {i + 3} * {i + 7}?",
            "instructions": "Use the calculator.",
            "tools": TOOLS,
            "max_output_tokens": 48,
        }
        if i % 2:
            body["max_output_tokens"] = 400  # a grammar-decoded tool call from a random model runs long
        if i % 2:
            body["tool_choice"] = "required"
        out.append(body)
    return out


def native(url: str, model: str, body: dict) -> dict:
    payload = {**body, "model": model, "enable_response_messages": True, "include": ["message.output_text.logprobs"]}
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/responses", json=payload, timeout=120).json()
    ms = (time.perf_counter() - t0) * 1000
    ins, outs = r.get("input_messages") or [], r.get("output_messages") or []
    prompt = bool(ins and ins[0].get("tokens"))
    completion = [t for m in outs for t in (m.get("tokens") or [])]
    logprobs = [
        lp for item in r.get("output", []) for part in item.get("content") or [] for lp in part.get("logprobs") or []
    ]
    calls = [item for item in r.get("output", []) if item.get("type") == "function_call"]
    return {
        "ms": ms,
        "ids": prompt and bool(completion),
        "logprobs_cover": bool(completion) and len(logprobs) == len(completion),
        "function_call": bool(calls),
    }


def translated(proxy: str, db: str, body: dict, i: int) -> dict:
    sid = f"bench-resp-{i}"
    t0 = time.perf_counter()
    r = httpx.post(
        f"{proxy}/v1/responses", json={**body, "model": "policy"}, headers={"X-Session-Id": sid}, timeout=120
    ).json()
    ms = (time.perf_counter() - t0) * 1000
    from tests.support import dbread

    (row,) = dbread.wait_calls(db, 1, sid)
    completion = row["completion_token_ids"] or []
    return {
        "ms": ms,
        "ids": bool(row["prompt_token_ids"]) and bool(completion),
        "logprobs_cover": bool(completion) and len(row["logprobs"] or []) == len(completion),
        "function_call": any(item.get("type") == "function_call" for item in r.get("output", [])),
    }


def summary(rows: list[dict], tool_rows: list[dict]) -> dict:
    share = lambda rs, k: sum(r[k] for r in rs) / max(1, len(rs))  # noqa: E731
    return {
        "turns": len(rows),
        "token_ids": share(rows, "ids"),
        "logprobs_cover_completion": share(rows, "logprobs_cover"),
        "tool_turns_as_function_call": share(tool_rows, "function_call"),
        "p50_ms": round(statistics.median(r["ms"] for r in rows), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm", help="a running vLLM (started with demo/vllm_server.py's flags)")
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="trainwire-resp-"))
    vllm = None
    try:
        url = args.vllm
        if url is None:
            from demo.tiny_model import build_tiny_model
            from demo.vllm_server import start_vllm

            vllm = start_vllm(
                build_tiny_model(tmp / "tiny"), free_port(), served_model_name="tiny", log_path=tmp / "vllm.log"
            )
            url = vllm.url
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        db = f"sqlite+aiosqlite:///{tmp}/bench.db"
        port = free_port()
        proxy = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trainwire.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--upstream",
                url,
                "--database-url",
                db,
                "--journal-dir",
                str(tmp / "journal"),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
        )
        try:
            for _ in range(200):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            bodies = requests(args.n)
            results = {}
            for name, run in (
                ("native vLLM /v1/responses", lambda b, i: native(url, model, b)),
                ("trainwire /v1/responses (via chat)", lambda b, i: translated(f"http://127.0.0.1:{port}", db, b, i)),
            ):
                rows = [run(b, i) for i, b in enumerate(bodies)]
                tools = [r for r, b in zip(rows, bodies) if b.get("tool_choice") == "required"]
                results[name] = summary(rows, tools)
                print(f"{name:36} {json.dumps(results[name])}", flush=True)
        finally:
            proxy.terminate()
            proxy.wait(60)
    finally:
        if vllm is not None:
            vllm.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

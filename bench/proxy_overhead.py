"""Proxy overhead: latency (p50/p99) and throughput at 1 and 8 connections, upstream direct vs through
trainwire with logging to Postgres on. Every request must be in the database afterwards.

The upstream is nginx returning a fixed vLLM-shaped completion, so the proxy is what is measured; load comes
from wrk. Both are Debian packages: `apt-get install nginx wrk`.

    .venv/bin/python -m bench.proxy_overhead [--duration 10] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.pgcluster import PgCluster
from tests.support.ports import free_port  # noqa: E402

COMPLETION = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "base-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The answer is 42.", "tool_calls": []},
                 "logprobs": {"content": [{"token": t, "logprob": -0.25, "bytes": [1], "top_logprobs": []}
                                          for t in ["The", " answer", " is", " 42", "."]]},
                 "finish_reason": "stop", "stop_reason": None, "token_ids": [101, 102, 103, 104, 105]}],
    "usage": {"prompt_tokens": 12, "total_tokens": 17, "completion_tokens": 5},
    "prompt_token_ids": list(range(1, 13)),
}
MODELS = {"object": "list", "data": [{"id": "base-model", "object": "model", "parent": None}]}
REQUEST = {"model": "policy", "messages": [{"role": "system", "content": "You are terse."},
                                           {"role": "user", "content": "What is six times seven?"}],
           "max_tokens": 16}


def nginx_conf(port: int, tmp: Path) -> Path:
    def lit(obj) -> str:
        return json.dumps(obj).replace("\\", "\\\\").replace("'", "\\'")

    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    location = /v1/chat/completions {{ default_type application/json; return 200 '{lit(COMPLETION)}'; }}
    location = /v1/models {{ default_type application/json; return 200 '{lit(MODELS)}'; }}
  }}
}}
""")
    return conf


def wrk(url: str, connections: int, duration: int, tmp: Path) -> dict:
    script = tmp / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = [[{json.dumps(REQUEST)}]]\n")
    threads = min(connections, 2)
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--latency",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"connections": connections, "requests": total, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": ms("50"), "p99_ms": ms("99"), "non_2xx": int(errors.group(1)) if errors else 0}


async def count_calls(url: str) -> int:
    from sqlalchemy import func, select

    from trainwire.store.db import make_engine
    from trainwire.store.models import Call

    engine = make_engine(url)
    async with engine.connect() as conn:
        n = (await conn.execute(select(func.count()).select_from(Call))).scalar()
    await engine.dispose()
    return int(n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    ap.add_argument("--workers", type=int, default=1, help="proxy worker processes")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "proxy_overhead.json")
    args = ap.parse_args()
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench: {tool} not found; apt-get install nginx wrk", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="trainwire-bench-"))
    nginx_port, proxy_port = free_port(), free_port()
    procs: list[subprocess.Popen] = []
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                     "duration_s": args.duration, "proxy_workers": args.workers, "runs": []}
    with PgCluster() as pg:
        db = pg.create_database("bench")
        from trainwire.store.migrate import upgrade_head

        upgrade_head(db)
        try:
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            procs.append(subprocess.Popen([nginx, "-c", str(nginx_conf(nginx_port, tmp)), "-p", str(tmp)],
                                          start_new_session=True))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "trainwire.cli", "serve", "--host", "127.0.0.1", "--port", str(proxy_port),
                 "--upstream", f"http://127.0.0.1:{nginx_port}", "--database-url", db, "--workers", str(args.workers),
                 "--log-level", "warning", "--journal-dir", str(tmp / "journal")], start_new_session=True))
            for url in (f"http://127.0.0.1:{nginx_port}/v1/models", f"http://127.0.0.1:{proxy_port}/healthz"):
                for _ in range(100):
                    try:
                        if httpx.get(url, timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.1)
            # warm-up (connections, base-model discovery)
            httpx.post(f"http://127.0.0.1:{proxy_port}/v1/chat/completions", json=REQUEST, timeout=5)
            sent = 1
            for name, port in (("upstream direct", nginx_port), ("through trainwire", proxy_port)):
                for conns in (1, 8):
                    r = wrk(f"http://127.0.0.1:{port}/v1/chat/completions", conns, args.duration, tmp)
                    r["target"] = name
                    results["runs"].append(r)
                    print(f"{name:18} c={conns}: {r['rps']:8.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                          f"p99 {r['p99_ms']:.3f} ms  non-2xx {r['non_2xx']}", flush=True)
                    if port == proxy_port:
                        sent += r["requests"]
        finally:
            for p in reversed(procs):
                os.killpg(p.pid, signal.SIGTERM)  # proxy drains its write queue on SIGTERM
            for p in procs:
                p.wait(120)
        recorded = asyncio.run(count_calls(db))
    results["proxy_requests_completed"] = sent
    results["calls_in_database"] = recorded
    by = {(r["target"], r["connections"]): r for r in results["runs"]}
    added = by[("through trainwire", 1)]["p50_ms"] - by[("upstream direct", 1)]["p50_ms"]
    results["added_p50_ms_at_1"] = round(added, 3)
    print(f"added p50 latency at 1 connection: {added:.3f} ms; "
          f"throughput at 8 connections: {by[('through trainwire', 8)]['rps']:.0f} req/s")
    print(f"requests completed through the proxy: {sent}; calls in Postgres: {recorded} "
          f"({'all recorded' if recorded >= sent else 'MISSING ROWS'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if recorded >= sent else 1


if __name__ == "__main__":
    raise SystemExit(main())

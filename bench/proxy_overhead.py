"""Proxy overhead: latency (p50/p99) and throughput at 1 and 8 connections, upstream direct vs through
trainwire with logging to Postgres on. Every request must be in the database afterwards.

The upstream is nginx returning a fixed vLLM-shaped chat completion, so the proxy is what is measured; load
comes from wrk. Both are Debian packages: `apt-get install nginx wrk`. The Responses and Messages routes are
translated to chat completions by the proxy, so the same upstream serves them (`--routes`).

    .venv/bin/python -m bench.proxy_overhead [--duration 10] [--workers 1] [--routes chat,responses,messages]
        [--journal-fsync none|interval|always] [--compare-with DIR]

Each route also comes streamed (`chat-stream`, `responses-stream`, `messages-stream`): a second nginx server
answers with the same completion as vLLM's SSE chunks, [DONE] last.

`--compare-with DIR` also runs the proxy from another checkout (e.g. `git worktree add /tmp/old REV`), in turns
with this one, in the same run: on a noisy machine only a side-by-side comparison says whether a change is slower.
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
import tomllib
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.pgcluster import PgCluster  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "base-model",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "The answer is 42.", "tool_calls": []},
            "logprobs": {
                "content": [
                    {"token": t, "logprob": -0.25, "bytes": [1], "top_logprobs": []}
                    for t in ["The", " answer", " is", " 42", "."]
                ]
            },
            "finish_reason": "stop",
            "stop_reason": None,
            "token_ids": [101, 102, 103, 104, 105],
        }
    ],
    "usage": {"prompt_tokens": 12, "total_tokens": 17, "completion_tokens": 5},
    "prompt_token_ids": list(range(1, 13)),
}


def _chunk(delta: dict, *, finish=None, logprobs=None, token_ids=None, **extra) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "base-model",
        "choices": [choice],
        **extra,
    }


# The same answer as vLLM streams it: a role chunk with the prompt's token ids, one chunk per token (with its
# logprob and id), the finish chunk, the usage chunk, [DONE].
STREAM = (
    [_chunk({"role": "assistant", "content": ""}, prompt_token_ids=COMPLETION["prompt_token_ids"])]
    + [
        _chunk(
            {"content": lp["token"]},
            logprobs={"content": [lp]},
            token_ids=[COMPLETION["choices"][0]["token_ids"][i]],
        )
        for i, lp in enumerate(COMPLETION["choices"][0]["logprobs"]["content"])
    ]
    + [_chunk({"content": ""}, finish="stop", token_ids=[])]
    + [{**_chunk({}), "choices": [], "usage": COMPLETION["usage"]}]
)
SSE = "".join(f"data: {json.dumps(c)}\n\n" for c in STREAM) + "data: [DONE]\n\n"
MODELS = {"object": "list", "data": [{"id": "base-model", "object": "model", "parent": None}]}
REQUEST = {
    "model": "policy",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is six times seven?"},
    ],
    "max_tokens": 16,
}
# The same question in each API's request shape.
ROUTES = {
    "chat": ("/v1/chat/completions", REQUEST),
    "responses": (
        "/v1/responses",
        {
            "model": "policy",
            "instructions": "You are terse.",
            "input": "What is six times seven?",
            "max_output_tokens": 16,
        },
    ),
    "messages": (
        "/v1/messages",
        {
            "model": "policy",
            "system": "You are terse.",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "What is six times seven?"}],
        },
    ),
}


# Streamed routes: the same requests with "stream": true, against an upstream that streams.
ROUTES.update({f"{name}-stream": (path, {**body, "stream": True}) for name, (path, body) in list(ROUTES.items())})


def nginx_conf(port: int, tmp: Path, stream_port: int) -> Path:
    def lit(obj) -> str:
        text = obj if isinstance(obj, str) else json.dumps(obj)
        return text.replace("\\", "\\\\").replace("'", "\\'")

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
  server {{
    listen 127.0.0.1:{stream_port};
    location = /v1/chat/completions {{ default_type text/event-stream; return 200 '{lit(SSE)}'; }}
    location = /v1/models {{ default_type application/json; return 200 '{lit(MODELS)}'; }}
  }}
}}
""")
    return conf


def wrk(url: str, connections: int, duration: int, tmp: Path, body: dict | None = None) -> dict:
    script = tmp / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [[{json.dumps(body or REQUEST)}]]\n"
    )
    threads = min(connections, 2)
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "connections": connections,
        "requests": total,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


async def count_calls(url: str) -> int:
    from sqlalchemy import func, select

    from trainwire.store.db import make_engine
    from trainwire.store.models import Call

    engine = make_engine(url)
    async with engine.connect() as conn:
        n = (await conn.execute(select(func.count()).select_from(Call))).scalar()
    await engine.dispose()
    return int(n)


def _wait_healthy(url: str) -> None:
    for _ in range(300):
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _proxy(cwd: Path, port: int, upstream: str, db: str, args, tmp: Path, name: str) -> subprocess.Popen:
    """`trainwire serve` from a checkout (its own code: the working directory comes first on sys.path)."""
    if _has_journal(cwd):
        journal = ["--journal-dir", str(tmp / f"journal-{name}"), "--journal-fsync", args.journal_fsync]
    else:  # a checkout from before the journal
        journal = ["--spool-dir", str(tmp / f"spool-{name}")]
    return subprocess.Popen(
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
            upstream,
            "--database-url",
            db,
            "--workers",
            str(args.workers),
            "--log-level",
            "warning",
            *journal,
        ],
        cwd=_own_code(cwd, tmp / f"view-{name}"),
        start_new_session=True,
    )


def _own_code(cwd: Path, view: Path) -> Path:
    """The directory to run a checkout's `trainwire` from (`-m` puts it first on sys.path). A checkout whose
    trainwire/ holds its subpackages (top-level modules, or the committed symlinks trainwire/proxy -> ../proxy)
    runs from itself. An older one that mapped `trainwire.proxy` to `proxy/` only through pyproject's package-dir
    cannot: from it, the editable install would serve this checkout's code instead. It runs from a view of
    symlinks laid out as it installs."""
    if (cwd / "trainwire" / "proxy").exists() or not (cwd / "proxy").is_dir():
        return cwd
    mapping = tomllib.loads((cwd / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(view, ignore_errors=True)
    (view / "trainwire").mkdir(parents=True)
    for entry in (cwd / mapping.get("trainwire", "trainwire")).iterdir():
        os.symlink(entry, view / "trainwire" / entry.name)
    for package, folder in mapping.items():
        if package.startswith("trainwire."):
            os.symlink(cwd / folder, view / package.replace(".", "/"))
    return view


def _serves(cwd: Path, path: str) -> bool:
    apis = cwd / "proxy" / "apis.py"
    return path == "/v1/chat/completions" or (apis.exists() and path in apis.read_text())


def _has_journal(cwd: Path) -> bool:
    return "journal" in (cwd / "trainwire" / "settings.py").read_text()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    ap.add_argument("--workers", type=int, default=1, help="proxy worker processes")
    ap.add_argument(
        "--routes", default="chat", help="comma-separated: chat, responses, messages, and each with -stream"
    )
    ap.add_argument("--journal-fsync", default="none", choices=["none", "interval", "always"])
    ap.add_argument("--compare-with", type=Path, help="another checkout whose proxy runs beside this one's")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "proxy_overhead.json")
    args = ap.parse_args()
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    unknown = set(routes) - set(ROUTES)
    if unknown:
        print(f"bench: unknown route(s) {', '.join(sorted(unknown))}; choose from {', '.join(ROUTES)}", file=sys.stderr)
        return 2
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench: {tool} not found; apt-get install nginx wrk", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="trainwire-bench-"))
    nginx_port, stream_port = free_port(), free_port()
    checkouts = [("trainwire", ROOT)] + (
        [(f"trainwire@{args.compare_with.name}", args.compare_with.resolve())] if args.compare_with else []
    )
    procs: list[subprocess.Popen] = []
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "duration_s": args.duration,
        "proxy_workers": args.workers,
        "journal_fsync": args.journal_fsync,
        "runs": [],
        "recorded": {},
    }
    ok = True
    with PgCluster() as pg:
        try:
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            procs.append(
                subprocess.Popen(
                    [nginx, "-c", str(nginx_conf(nginx_port, tmp, stream_port)), "-p", str(tmp)], start_new_session=True
                )
            )
            _wait_healthy(f"http://127.0.0.1:{nginx_port}/v1/models")
            for conns in (1, 8):
                r = wrk(f"http://127.0.0.1:{nginx_port}/v1/chat/completions", conns, args.duration, tmp)
                r.update(target="upstream direct", route="chat")
                results["runs"].append(r)
                print(
                    f"{'upstream direct':24} chat      c={conns}: {r['rps']:8.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                    f"p99 {r['p99_ms']:.3f} ms",
                    flush=True,
                )
            for route in routes:
                path, body = ROUTES[route]
                for conns in (1, 8):
                    for name, cwd in checkouts:  # in turns, so both see the same machine
                        if not _serves(cwd, path):
                            continue  # an older checkout may not serve the route
                        db = pg.create_database(f"b_{len(results['runs'])}")
                        subprocess.run(
                            [sys.executable, "-m", "trainwire.cli", "migrate", "--database-url", db],
                            cwd=_own_code(cwd, tmp / f"view-{name}"),
                            check=True,
                            capture_output=True,
                        )
                        port = free_port()
                        upstream = f"http://127.0.0.1:{stream_port if body.get('stream') else nginx_port}"
                        proc = _proxy(cwd, port, upstream, db, args, tmp, f"{name}-{route}-{conns}")
                        try:
                            _wait_healthy(f"http://127.0.0.1:{port}/healthz")
                            # warm-up (the first Messages call imports litellm: seconds on a loaded machine)
                            httpx.post(f"http://127.0.0.1:{port}{path}", json=body, timeout=120)
                            r = wrk(f"http://127.0.0.1:{port}{path}", conns, args.duration, tmp, body)
                        finally:
                            os.killpg(proc.pid, signal.SIGTERM)  # the proxy drains its write queue on SIGTERM
                            proc.wait(120)
                        recorded = asyncio.run(count_calls(db))
                        r.update(target=name, route=route, recorded=recorded)
                        results["runs"].append(r)
                        complete = recorded >= r["requests"] + 1 and r["non_2xx"] == 0
                        ok = ok and complete
                        print(
                            f"{name:24} {route:9} c={conns}: {r['rps']:8.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                            f"p99 {r['p99_ms']:.3f} ms  non-2xx {r['non_2xx']}  recorded {recorded}/"
                            f"{r['requests'] + 1}{'' if complete else '  MISSING ROWS'}",
                            flush=True,
                        )
        finally:
            for p in reversed(procs):
                os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                p.wait(60)
    direct = next(r for r in results["runs"] if r["target"] == "upstream direct" and r["connections"] == 1)
    for r in results["runs"]:
        if r["target"] != "upstream direct" and r["connections"] == 1:
            r["added_p50_ms"] = round(r["p50_ms"] - direct["p50_ms"], 3)
            print(f"added p50 at 1 connection, {r['target']} {r['route']}: {r['added_p50_ms']:.3f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

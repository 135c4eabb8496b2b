"""What the OpenTelemetry export (`--otlp-endpoint`) costs the proxy when the collector is up, down or slow,
side by side with no export, in turns in one run (the machine is noisy: only a side-by-side run says anything).

The same setup as bench/proxy_overhead.py: nginx returns a fixed vLLM-shaped chat completion, wrk loads the proxy
at 8 connections, Postgres records every call. The collector is tests/support/otlp_receiver.py in this process:
"up" reads each export request and answers at once (it does not decode, so it takes little of the proxy's CPU), "slow" holds every export request `--slow-s` seconds, "down" is a closed port. Every
request must be answered 2xx and recorded; the proxy's /stats says how many spans it exported and dropped.

    .venv/bin/python -m bench.otel_export [--duration 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.proxy_overhead import _wait_healthy, count_calls, nginx_conf, wrk  # noqa: E402
from tests.support.otlp_receiver import OtlpReceiver  # noqa: E402
from tests.support.pgcluster import PgCluster  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

CONNECTIONS = 8


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and of its children (the export process) so far."""
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _serve(port: int, upstream: str, db: str, tmp: Path, name: str, extra: list[str]) -> subprocess.Popen:
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
            "--log-level",
            "error",
            "--journal-dir",
            str(tmp / f"journal-{name}"),
            *extra,
        ],
        cwd=ROOT,
        start_new_session=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="each collector state this many times, in turns")
    ap.add_argument("--settle-s", type=float, default=4.0, help="wait after the proxy is up, before measuring")
    ap.add_argument("--slow-s", type=float, default=2.0, help="how long the slow collector holds each export")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "otel_export.json")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a kill still stops nginx, Postgres and the proxies
    tmp = Path(tempfile.mkdtemp(prefix="trainwire-bench-otel-"))
    # The collectors read the bodies and answer, without decoding: a real one runs elsewhere, and decoding here
    # would take the proxy's CPU on a small machine.
    up = OtlpReceiver(decode=False).start()
    slow = OtlpReceiver(delay_s=args.slow_s, decode=False).start()
    # "Down": a port bound and never listened on, held for the whole run: connections are refused, and no other
    # process can take the port meanwhile (a closed port was once answered by someone else's server).
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    down_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    configs = {
        "no export": [],
        "collector up": ["--otlp-endpoint", up.url],
        "collector down": ["--otlp-endpoint", down_url],
        f"collector slow ({args.slow_s:g} s)": ["--otlp-endpoint", slow.url],
    }
    runs: list[dict] = []
    ok = True
    nginx_port = free_port()
    with PgCluster() as pg:
        nginx = subprocess.Popen(
            [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(nginx_conf(nginx_port, tmp)), "-p", str(tmp)],
            start_new_session=True,
        )
        try:
            _wait_healthy(f"http://127.0.0.1:{nginx_port}/v1/models")
            for rnd in range(args.rounds):
                for name, extra in configs.items():
                    db = pg.create_database(f"o_{len(runs)}")
                    subprocess.run(
                        [sys.executable, "-m", "trainwire.cli", "migrate", "--database-url", db],
                        cwd=ROOT,
                        check=True,
                        capture_output=True,
                    )
                    port = free_port()
                    proc = _serve(port, f"http://127.0.0.1:{nginx_port}", db, tmp, f"{len(runs)}", extra)
                    try:
                        _wait_healthy(f"http://127.0.0.1:{port}/healthz")
                        # The export process imports the OpenTelemetry SDK and exporter at start (about a second
                        # of CPU): let every configuration settle alike before measuring.
                        time.sleep(args.settle_s)
                        url = f"http://127.0.0.1:{port}/v1/chat/completions"
                        httpx.post(url, json={"model": "policy", "messages": [{"role": "user", "content": "hi"}]})
                        cpu0 = _cpu_s(proc.pid)
                        r = wrk(url, CONNECTIONS, args.duration, tmp)
                        cpu = _cpu_s(proc.pid) - cpu0
                        otlp = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=30).json().get("otlp_export")
                    finally:
                        os.killpg(proc.pid, signal.SIGTERM)
                        proc.wait(120)
                    recorded = asyncio.run(count_calls(db))
                    complete = recorded >= r["requests"] + 1 and r["non_2xx"] == 0
                    ok = ok and complete
                    r.update(
                        config=name,
                        round=rnd,
                        recorded=recorded,
                        otlp_export=otlp,
                        cpu_us_per_request=round(cpu / max(1, r["requests"]) * 1e6, 1),
                    )
                    runs.append(r)
                    print(
                        f"round {rnd} {name:26} {r['rps']:8.0f} req/s  cpu {r['cpu_us_per_request']:6.1f} us/req  "
                        f"p50 {r['p50_ms']:.3f} ms  p99 "
                        f"{r['p99_ms']:.3f} ms  non-2xx {r['non_2xx']}  recorded {recorded}/{r['requests'] + 1}"
                        f"{'' if complete else '  MISSING ROWS'}  spans {otlp}",
                        flush=True,
                    )
        finally:
            os.killpg(nginx.pid, signal.SIGTERM)
            nginx.wait(60)
            up.stop()
            slow.stop()
            closed.close()
    base = statistics.median(r["rps"] for r in runs if r["config"] == "no export")
    summary = {}
    for name in configs:
        rps = [r["rps"] for r in runs if r["config"] == name]
        cpu = [r["cpu_us_per_request"] for r in runs if r["config"] == name]
        summary[name] = {
            "rps_median": round(statistics.median(rps), 1),
            "cpu_us_per_request_median": round(statistics.median(cpu), 1),
            "rps_mean": round(statistics.mean(rps), 1),
            "rps_runs": [round(x) for x in rps],
            "vs_no_export": round(statistics.median(rps) / base - 1, 4),
            "non_2xx": sum(r["non_2xx"] for r in runs if r["config"] == name),
        }
        print(
            f"{name:26} median {summary[name]['rps_median']:8.0f} req/s ({summary[name]['vs_no_export']:+.1%} vs no "
            f"export), CPU {summary[name]['cpu_us_per_request_median']:.0f} us/request (proxy + export process)  "
            f"runs {summary[name]['rps_runs']}  non-2xx {summary[name]['non_2xx']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"connections": CONNECTIONS, "summary": summary, "runs": runs}, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Acknowledged vs stored under faults: how many calls that got a 2xx are in Postgres afterwards.

Agents (threads on the OpenAI SDK) call `trainwire serve` against a static upstream (the scripted one) while:

- `postgres-outage`: Postgres is stopped for --outage-s seconds under load, then started;
- `postgres-down-at-shutdown`: Postgres is stopped, the proxy gets SIGTERM, Postgres comes back, the proxy restarts;
- `sigkill`: the proxy is SIGKILLed under load (with a 2 s write interval, so the queue is full), then restarted;
- `sigkill-every-route`: the same, --kills times in a row (each restart replaying the last one's journal under
  new load), with the agents spread over chat, completions, Responses and Messages, streamed and not (a streamed
  call counts as acknowledged once its client has read the event that ends it).

    .venv/bin/python -m bench.faults [--outage-s 30] [--threads 8] [--kills 5] [--only sigkill-every-route]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import dbread  # noqa: E402
from tests.support.faults import EVERY_ROUTE, Load, start_pg, stop_pg  # noqa: E402
from tests.support.pgcluster import PgCluster  # noqa: E402
from tests.support.proxyproc import ProxyProcess  # noqa: E402
from tests.support.scripted_upstream import ScriptedUpstream  # noqa: E402


def _wait_stored(url: str, acked: set[str], timeout: float = 120) -> set[str]:
    deadline = time.time() + timeout
    while True:
        stored = {r["id"] for r in dbread.calls(url)}
        if acked <= stored or time.time() > deadline:
            return stored


def _every_route(pg: PgCluster, upstream: ScriptedUpstream, tmp: Path, args) -> dict:
    name = "sigkill-every-route"
    url = pg.create_database(name.replace("-", "_"))
    from trainwire.store.migrate import upgrade_head

    upgrade_head(url)
    journal = tmp / f"journal-{name}"
    base = ["--upstream", upstream.url, "--database-url", url, "--journal-dir", str(journal), "--log-level", "warning"]
    extra = ["--write-interval-ms", "2000", "--write-batch-size", "5000"]
    t0 = time.time()
    acked: set[str] = set()
    by_route: dict[str, int] = {}
    waiting = failed = 0
    for k in range(args.kills):
        proxy = ProxyProcess(base + extra, log_path=tmp / f"{name}-{k}.log").start()
        with Load(proxy.url, threads=max(args.threads, len(EVERY_ROUTE)), routes=EVERY_ROUTE) as load:
            # Every route under way first (the first Messages call imports litellm: seconds), then 2 s more.
            deadline = time.time() + 60
            while len(load.by_route) < len(EVERY_ROUTE) and time.time() < deadline:
                time.sleep(0.1)
            time.sleep(2)
            os.killpg(proxy.proc.pid, signal.SIGKILL)
            proxy.proc.wait(10)
        round_acked = set(load.acked)
        waiting += len(round_acked - {r["id"] for r in dbread.calls(url)})
        acked |= round_acked
        failed += load.failed
        for label, ids in load.by_route.items():
            by_route[label] = by_route.get(label, 0) + len(ids)
    again = ProxyProcess(base, log_path=tmp / f"{name}-restart.log").start()
    stored = _wait_stored(url, acked)
    again.stop(signal.SIGTERM)
    return {
        "scenario": name,
        "kills": args.kills,
        "acknowledged": len(acked),
        "by_route": by_route,
        "stored": len(acked & stored),
        "lost": len(acked - stored),
        "waiting_in_journal_before_restart": waiting,
        "failed_requests": failed,
        "seconds": round(time.time() - t0, 1),
    }


def _scenario(name: str, pg: PgCluster, upstream: ScriptedUpstream, tmp: Path, args) -> dict:
    url = pg.create_database(name.replace("-", "_"))
    from trainwire.store.migrate import upgrade_head

    upgrade_head(url)
    journal = tmp / f"journal-{name}"
    base = ["--upstream", upstream.url, "--database-url", url, "--journal-dir", str(journal), "--log-level", "warning"]
    extra = ["--write-interval-ms", "2000", "--write-batch-size", "5000"] if name == "sigkill" else []
    proxy = ProxyProcess(base + extra, log_path=tmp / f"{name}.log").start()
    t0 = time.time()
    with Load(proxy.url, threads=args.threads) as load:
        time.sleep(3)
        if name == "postgres-outage":
            stop_pg(pg)
            time.sleep(args.outage_s)
            start_pg(pg)
            time.sleep(3)
        elif name == "postgres-down-at-shutdown":
            stop_pg(pg)
            time.sleep(2)
        else:
            os.killpg(proxy.proc.pid, signal.SIGKILL)
            proxy.proc.wait(10)
    acked = set(load.acked)
    if name == "postgres-down-at-shutdown":
        proxy.stop(signal.SIGTERM)
        start_pg(pg)
    else:
        proxy.stop(signal.SIGTERM)
    lost_before_restart = len(acked - {r["id"] for r in dbread.calls(url)})
    again = ProxyProcess(base, log_path=tmp / f"{name}-restart.log").start()
    stored = _wait_stored(url, acked)
    again.stop(signal.SIGTERM)
    return {
        "scenario": name,
        "acknowledged": len(acked),
        "stored": len(acked & stored),
        "lost": len(acked - stored),
        "waiting_in_journal_before_restart": lost_before_restart,
        "failed_requests": load.failed,
        "seconds": round(time.time() - t0, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outage-s", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--kills", type=int, default=5, help="sigkill-every-route: how many kills in a row")
    ap.add_argument("--only", help="run only this scenario")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="trainwire-faults-"))
    upstream = ScriptedUpstream().start()
    results = []
    try:
        with PgCluster() as pg:
            for name in ("postgres-outage", "postgres-down-at-shutdown", "sigkill", "sigkill-every-route"):
                if args.only and name != args.only:
                    continue
                if name == "sigkill-every-route":
                    r = _every_route(pg, upstream, tmp, args)
                else:
                    r = _scenario(name, pg, upstream, tmp, args)
                results.append(r)
                print(json.dumps(r), flush=True)
    finally:
        upstream.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["lost"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

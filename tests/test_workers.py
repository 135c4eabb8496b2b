"""`trainwire serve --workers N`: a socket per worker, supervision, metrics summed over workers, and every call
recorded when the supervisor is stopped. Real processes, real Postgres, the OpenAI SDK over real HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from tests.support import dbread
from tests.support.apihelpers import wait_for
from tests.support.ports import free_port


def _pids(proxy, n: int = 48) -> set[int]:
    """Worker pids seen over n fresh connections (the kernel spreads connections, not requests)."""
    pids = set()
    for _ in range(n):
        with httpx.Client() as c:
            pids.add(c.get(f"{proxy.url}/healthz", timeout=5).json()["pid"])
    return pids


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}(?:{{{re.escape(want)}}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _agents(proxy, n_agents: int, calls_each: int) -> list[str]:
    """n agents, each with its own client (so its own keep-alive connection), running at once."""
    ids: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def agent(a: int) -> None:
        try:
            c = openai.OpenAI(base_url=proxy.v1, api_key="x", max_retries=0)
            for i in range(calls_each):
                raw = c.chat.completions.with_raw_response.create(
                    model="policy",
                    messages=[{"role": "user", "content": f"agent {a} turn {i}"}],
                    extra_headers={"X-Session-Id": f"agent-{a}"},
                )
                with lock:
                    ids.append(raw.headers["x-call-id"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(a,)) for a in range(n_agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return ids


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_share_connections_count_together_and_drain_on_sigterm(
    start_proxy, upstream, pg_url, tmp_path, workers
):
    proxy = start_proxy(
        "--workers",
        str(workers),
        "--upstream",
        upstream.url,
        "--database-url",
        pg_url,
        "--journal-dir",
        str(tmp_path / "journal"),
    )
    wait_for(lambda: len(_pids(proxy)) == workers, 30, what="every worker to take connections")
    ids = _agents(proxy, 8, 10)
    assert len(set(ids)) == 80
    # /metrics adds up both workers, whichever of them answers the scrape.
    for _ in range(4):
        text = httpx.get(f"{proxy.url}/metrics", timeout=5).text
        assert _metric(text, "trainwire_requests_total", path="/v1/chat/completions", status="200") == 80
    wait_for(
        lambda: _metric(httpx.get(f"{proxy.url}/metrics", timeout=5).text, "trainwire_calls_written_total") == 80,
        15,
        what="calls_written_total to reach 80",
    )
    # One SIGTERM: the supervisor passes it to each worker once; each drains its queue, and everything is
    # recorded. (A lone uvicorn re-raises the signal after its graceful shutdown.)
    assert proxy.stop(signal.SIGTERM) == (0 if workers > 1 else -signal.SIGTERM)
    rows = dbread.calls(pg_url)
    assert sorted(r["id"] for r in rows) == sorted(ids)
    for a in range(8):  # one agent, one keep-alive connection, one worker: its calls are numbered in order
        assert sorted(r["seq"] for r in rows if r["session_id"] == f"agent-{a}") == list(range(10))


def test_a_killed_worker_is_replaced_and_ctrl_c_drains_once(start_proxy, upstream, pg_url, tmp_path):
    # Batches wait up to 5 s to fill, so the calls below are still queued when the workers are told to stop.
    proxy = start_proxy(
        "--workers",
        "2",
        "--upstream",
        upstream.url,
        "--database-url",
        pg_url,
        "--journal-dir",
        str(tmp_path / "journal"),
        "--write-interval-ms",
        "5000",
    )

    def both_workers(without: int | None = None):
        pids = _pids(proxy)
        return pids if len(pids) == 2 and without not in pids else None

    before = wait_for(both_workers, 30, what="both workers")
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    after = wait_for(lambda: both_workers(without=victim), 60, what="a new worker in place of the killed one")
    assert after & before == before - {victim}
    ids = _agents(proxy, 4, 3)
    assert not {r["id"] for r in dbread.calls(pg_url)} & set(ids), "the calls should still be queued"
    # Ctrl-C in a terminal signals the whole foreground process group: the supervisor stops every worker
    # gracefully, and each drains its write queue before it exits.
    os.killpg(proxy.proc.pid, signal.SIGINT)
    assert proxy.proc.wait(120) == 0
    assert {r["id"] for r in dbread.calls(pg_url)} >= set(ids)
    assert not list((tmp_path / "journal").glob("*.jsonl"))  # all written by the drain: no journal left


def test_workers_drain_and_exit_when_the_supervisor_is_killed(start_proxy, upstream, pg_url, tmp_path):
    proxy = start_proxy(
        "--workers",
        "2",
        "--upstream",
        upstream.url,
        "--database-url",
        pg_url,
        "--journal-dir",
        str(tmp_path / "journal"),
        "--write-interval-ms",
        "5000",
    )
    workers = wait_for(lambda: (lambda p: p if len(p) == 2 else None)(_pids(proxy)), 30, what="both workers")
    ids = _agents(proxy, 4, 2)
    proxy.proc.kill()  # SIGKILL: the supervisor cannot pass anything on
    proxy.proc.wait(10)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A worker that exited stays a zombie until someone reaps it; it is gone all the same.
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] == "Z"

    wait_for(lambda: all(gone(p) for p in workers), 60, what="the orphaned workers to stop")
    assert {r["id"] for r in dbread.calls(pg_url)} >= set(ids)


def test_workers_that_cannot_start_stop_the_supervisor(tmp_path):
    # The database is fine; every worker fails at start-up (its routes file does not exist).
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainwire.cli",
            "serve",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--database-url",
            f"sqlite:///{tmp_path}/t.db",
            "--journal-dir",
            str(tmp_path / "journal"),
            "--routes-file",
            str(tmp_path / "nope.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "during start-up; stopping" in out.stderr


def test_an_unreachable_database_stops_serve_before_any_worker_starts(tmp_path):
    dead_db = f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/nothing"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainwire.cli",
            "serve",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--database-url",
            dead_db,
            "--journal-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("trainwire: error: cannot check the database schema"), out.stderr
    assert "Traceback" not in out.stderr and "worker" not in out.stderr

"""Every call that got a 2xx is in the database, or on its way there, after any fault: Postgres stopped under load
and started again, Postgres down while the proxy shuts down, the proxy SIGKILLed under load and restarted. And a
row the database refuses as data is kept, counted, and written by `trainwire replay-rejected` after a fix.

Real processes: the proxy as `trainwire serve`, a Postgres cluster of the test's own (stopped and started with
pg_ctl), the OpenAI SDK as the client. The upstream is the scripted one: these faults are about the write path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.support import dbread
from tests.support.apihelpers import wait_for
from tests.support.faults import EVERY_ROUTE, Load
from tests.support.faults import start_pg as _start_pg
from tests.support.faults import stop_pg as _stop_pg
from tests.support.pgcluster import PgCluster
from tests.support.scripted_upstream import Script
from trainwire.store.migrate import upgrade_head


def _stored_ids(url: str) -> set[str]:
    return {r["id"] for r in dbread.calls(url)}


@pytest.fixture
def own_pg():
    with PgCluster() as pg:
        url = pg.create_database("faults")
        upgrade_head(url)
        yield pg, url


def _proxy(start_proxy, upstream, url, journal, *extra):
    return start_proxy("--upstream", upstream.url, "--database-url", url, "--journal-dir", str(journal), *extra)


def test_postgres_stopped_under_load_loses_no_acknowledged_call(start_proxy, upstream, own_pg, tmp_path):
    pg, url = own_pg
    proxy = _proxy(start_proxy, upstream, url, tmp_path / "journal", "--write-interval-ms", "20")
    with Load(proxy.url) as load:
        wait_for(lambda: len(load.acked) > 50, 30, what="calls before the outage")
        _stop_pg(pg)
        down_at = len(load.acked)
        time.sleep(6)  # agents keep calling while the database is away
        during = len(load.acked) - down_at
        _start_pg(pg)
        wait_for(lambda: len(load.acked) > down_at + during + 50, 60, what="calls after the outage")
    acked = set(load.acked)
    assert during > 0, "agents must be served while the database is down"
    wait_for(lambda: acked <= _stored_ids(url), 60, what="every acknowledged call in Postgres")
    proxy.stop(signal.SIGTERM)
    assert acked <= _stored_ids(url)
    assert not list((tmp_path / "journal").glob("*.jsonl")), "written calls must leave the journal"
    log = proxy.log_tail()
    assert "rejected" not in log, log  # a database shutting down (57P03) is not the data being refused


def test_postgres_down_while_the_proxy_shuts_down(start_proxy, upstream, own_pg, tmp_path):
    pg, url = own_pg
    journal = tmp_path / "journal"
    args = ("--write-interval-ms", "20")
    proxy = _proxy(start_proxy, upstream, url, journal, *args)
    with Load(proxy.url) as load:
        wait_for(lambda: len(load.acked) > 30, 30, what="calls")
        _stop_pg(pg)
        time.sleep(1.5)
    acked = set(load.acked)
    assert proxy.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert list(journal.glob("journal-*.jsonl")), "what could not be written stays in the journal"
    _start_pg(pg)
    again = _proxy(start_proxy, upstream, url, journal, *args)
    wait_for(lambda: acked <= _stored_ids(url), 60, what="the journal replayed at the next start")
    again.stop(signal.SIGTERM)
    ids = [r["id"] for r in dbread.calls(url)]
    assert len(ids) == len(set(ids))
    counts = {s["id"]: s["n_calls"] for s in dbread.sessions(url)}
    stored = dbread.calls(url)
    for sid, n in counts.items():
        assert n == sum(1 for r in stored if r["session_id"] == sid), "a replay must not count a call twice"


def test_sigkill_under_load_then_restart_keeps_every_acknowledged_call(start_proxy, upstream, own_pg, tmp_path):
    pg, url = own_pg
    journal = tmp_path / "journal"
    # Long write intervals keep hundreds of acknowledged calls in memory only, until the kill.
    args = ("--write-interval-ms", "2000", "--write-batch-size", "5000")
    proxy = _proxy(start_proxy, upstream, url, journal, *args)
    with Load(proxy.url) as load:
        wait_for(lambda: len(load.acked) > 200, 60, what="calls")
        os.killpg(proxy.proc.pid, signal.SIGKILL)
        proxy.proc.wait(10)
    acked = set(load.acked)
    missing_before = acked - _stored_ids(url)
    assert missing_before, "the kill must have caught acknowledged calls that were not written yet"
    again = _proxy(start_proxy, upstream, url, journal, "--write-interval-ms", "20")
    wait_for(lambda: acked <= _stored_ids(url), 60, what="every acknowledged call after the restart")
    again.stop(signal.SIGTERM)
    assert not list(journal.glob("*.jsonl"))


# What each route's client is sent, and the line that ends its stream (the acknowledgement of a streamed call).
_BODIES = {
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, b"data: [DONE]"),
    "completions": ("/v1/completions", {"prompt": "hi"}, b"data: [DONE]"),
    "responses": ("/v1/responses", {"input": "hi"}, b"event: response.completed"),
    "messages": (
        "/v1/messages",
        {"max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]},
        b"event: message_stop",
    ),
}


def _journaled(journal, call_id: str) -> bool:
    return any(call_id.encode() in p.read_bytes() for p in journal.glob("journal-*.jsonl"))


def test_every_call_is_journaled_before_its_acknowledgement_leaves(start_proxy, upstream, db_url, tmp_path):
    """The moment a client holds a whole answer (for a stream: the event that ends it, read off the wire, and no
    byte more), the call is in the journal file, where a SIGKILL of the proxy cannot take it. The upstream keeps
    each stream open for a second after its [DONE], so a record written only when the stream closes is caught."""
    journal = tmp_path / "journal"
    upstream.responder = lambda req: Script(linger_after_done=1.0)
    proxy = _proxy(start_proxy, upstream, db_url, journal)
    ids = {}
    for route, stream in EVERY_ROUTE:
        path, body, end = _BODIES[route]
        body = {"model": "policy", **body, "stream": stream}
        with httpx.stream("POST", f"{proxy.url}{path}", json=body, headers={"X-Session-Id": "ack"}, timeout=30) as r:
            assert r.status_code == 200, r.read()
            call_id = r.headers["x-call-id"]
            if stream:
                ended = False
                for line in r.iter_lines():
                    if line.encode().startswith(end):
                        ended = True
                        break  # the acknowledgement is here; read nothing after it
                assert ended, f"{route} stream had no {end!r}"
            else:
                r.read()
            assert _journaled(journal, call_id), f"{route} (stream={stream}) acknowledged before it was journaled"
        ids[call_id] = (route, stream)
    wait_for(lambda: set(ids) <= _stored_ids(db_url), 30, what="the calls in Postgres")
    aborted = {ids[r["id"]] for r in dbread.calls(db_url) if r["id"] in ids and r["aborted"]}
    assert not aborted, f"streams read to their end are recorded as complete: {aborted}"


ROUNDS = 3


def test_sigkill_on_every_route_and_stream_mode_loses_no_acknowledged_call(start_proxy, upstream, own_pg, tmp_path):
    """SIGKILL under load on chat, completions, Responses and Messages, streamed and not, three times in a row
    (each restart replays the journal of the killed proxy while new load arrives): every id a client read from
    X-Call-Id of a whole answer is in Postgres after the last restart."""
    pg, url = own_pg
    journal = tmp_path / "journal"
    args = ("--write-interval-ms", "2000", "--write-batch-size", "5000")
    acked: set[str] = set()
    caught = 0
    labels = {f"{r}{' stream' if s else ''}" for r, s in EVERY_ROUTE}
    for _ in range(ROUNDS):
        proxy = _proxy(start_proxy, upstream, url, journal, *args)
        with Load(proxy.url, threads=len(EVERY_ROUTE), routes=EVERY_ROUTE) as load:
            wait_for(
                lambda: all(len(load.by_route.get(label, ())) >= 10 for label in labels),
                60,
                what=f"calls on every route ({ {k: len(v) for k, v in load.by_route.items()} })",
            )
            os.killpg(proxy.proc.pid, signal.SIGKILL)
            proxy.proc.wait(10)
        round_acked = set(load.acked)
        caught += len(round_acked - _stored_ids(url))
        acked |= round_acked
    assert caught, "the kills must have caught acknowledged calls that were not written yet"
    again = _proxy(start_proxy, upstream, url, journal, "--write-interval-ms", "20")
    wait_for(lambda: acked <= _stored_ids(url), 60, what="every acknowledged call after the last restart")
    again.stop(signal.SIGTERM)
    assert not list(journal.glob("*.jsonl"))


def test_rejected_rows_are_counted_and_replayed_after_a_fix(start_proxy, upstream, own_pg, tmp_path):
    pg, url = own_pg
    journal = tmp_path / "journal"
    admin = {"Authorization": "Bearer adm"}
    proxy = _proxy(start_proxy, upstream, url, journal, "--admin-key", "adm")
    # calls.finish_reason is varchar(32): an upstream reporting a longer one is refused by Postgres as data.
    upstream.script(text="odd", finish_reason="x" * 40)
    upstream.script(text="fine")
    c = openai.OpenAI(base_url=proxy.v1, api_key="x", max_retries=0, default_headers={"X-Session-Id": "rej"})
    odd = c.chat.completions.with_raw_response.create(model="policy", messages=[{"role": "user", "content": "a"}])
    c.chat.completions.create(model="policy", messages=[{"role": "user", "content": "b"}])
    odd_id = odd.headers["x-call-id"]
    wait_for(lambda: list(journal.glob("rejected-*.jsonl")), 20, what="the rejected row set aside")
    stats = httpx.get(f"{proxy.url}/stats", headers=admin, timeout=10).json()
    assert stats["rejected"]["rows"] == 1, stats.get("rejected")
    assert odd_id not in _stored_ids(url) and len(_stored_ids(url)) == 1  # the good call is not held up
    proxy.stop(signal.SIGTERM)
    cli = [
        sys.executable,
        "-m",
        "trainwire.cli",
        "replay-rejected",
        "--database-url",
        url,
        "--journal-dir",
        str(journal),
    ]
    still = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert still.returncode == 1 and "1 still refused" in still.stdout, still.stdout + still.stderr
    assert len(list(journal.glob("rejected-*.jsonl"))) == 1  # kept, with the new error
    subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(pg.port),
            "-U",
            "postgres",
            "-d",
            "faults",
            "-c",
            "ALTER TABLE calls ALTER COLUMN finish_reason TYPE varchar(64)",
        ],
        check=True,
        capture_output=True,
    )
    fixed = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert fixed.returncode == 0 and "1 rows written, 0 still refused" in fixed.stdout, fixed.stdout + fixed.stderr
    assert odd_id in _stored_ids(url)
    assert not list(journal.glob("rejected-*.jsonl"))

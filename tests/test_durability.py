"""Nothing acknowledged is lost: SIGTERM drains the write queue, and calls that cannot be written because the
database is down stay in the journal and are written at the next start."""

from __future__ import annotations

import concurrent.futures
import signal

import openai

from tests.support import dbread
from tests.support.pgcluster import PgCluster, _bin
from trainwire.store.migrate import upgrade_head


def _calls(proxy, n: int, session: str) -> list[str]:
    c = openai.OpenAI(base_url=proxy.v1, api_key="x", max_retries=0, default_headers={"X-Session-Id": session})

    def one(i: int) -> str:
        raw = c.chat.completions.with_raw_response.create(
            model="policy", messages=[{"role": "user", "content": f"msg {i}"}]
        )
        return raw.headers["x-call-id"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def test_sigterm_drains_the_queue_and_restart_keeps_everything(start_proxy, upstream, pg_url, tmp_path):
    # A long write interval keeps the acknowledged calls in memory when SIGTERM arrives.
    args = (
        "--upstream",
        upstream.url,
        "--database-url",
        pg_url,
        "--write-interval-ms",
        "5000",
        "--write-batch-size",
        "1000",
        "--journal-dir",
        str(tmp_path / "journal"),
    )
    proxy = start_proxy(*args)
    acked = _calls(proxy, 40, "durable")
    assert dbread.calls(pg_url) == []  # still queued: nothing written yet
    assert proxy.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    assert sorted(r["id"] for r in dbread.calls(pg_url)) == sorted(acked)
    again = start_proxy(*args)
    more = _calls(again, 5, "durable")
    again.stop(signal.SIGTERM)
    rows = dbread.calls(pg_url, "durable")
    assert sorted(r["id"] for r in rows) == sorted(acked + more)
    assert [s for s in dbread.sessions(pg_url) if s["id"] == "durable"][0]["n_calls"] == 45


def test_calls_journaled_while_database_is_down_are_written_at_next_start(start_proxy, upstream, tmp_path):
    with PgCluster() as own:
        url = own.create_database("spooltest")
        upgrade_head(url)
        spool = tmp_path / "journal"
        args = (
            "--upstream",
            upstream.url,
            "--database-url",
            url,
            "--write-interval-ms",
            "5000",
            "--write-batch-size",
            "1000",
            "--journal-dir",
            str(spool),
        )
        proxy = start_proxy(*args)
        acked = _calls(proxy, 12, "spooled")
        own._run(_bin("pg_ctl"), "-D", str(own.data), "-m", "fast", "stop")
        assert proxy.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
        assert list(spool.glob("journal-*.jsonl")), "calls must stay in the journal while the database is down"
        opts = f"-p {own.port} -k {own.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        own._run(_bin("pg_ctl"), "-D", str(own.data), "-o", opts, "-l", str(own.dir / "log"), "-w", "start")
        again = start_proxy(*args)
        again.stop(signal.SIGTERM)
        assert sorted(r["id"] for r in dbread.calls(url)) == sorted(acked)
        assert not list(spool.glob("*.jsonl"))


def test_nul_characters_from_the_model_are_stored_on_postgres(proxy, upstream, db_url):
    """A small model can sample byte 0; Postgres refuses NUL in text and jsonb. The call must still be stored
    (NUL shown as U+FFFD there) and must not hold up the calls queued behind it."""
    upstream.script(text="ab\x00cd")
    upstream.script(text="fine")
    c = openai.OpenAI(base_url=proxy.v1, api_key="x", max_retries=0, default_headers={"X-Session-Id": "nul"})
    first = c.chat.completions.create(model="policy", messages=[{"role": "user", "content": "zero\x00byte"}])
    assert first.choices[0].message.content == "ab\x00cd"  # the client gets exactly what the model said
    c.chat.completions.create(model="policy", messages=[{"role": "user", "content": "next"}])
    rows = dbread.wait_calls(db_url, 2, "nul")
    assert len(rows) == 2
    content = rows[0]["response"]["choices"][0]["message"]["content"]
    assert content in ("ab\x00cd", "ab\ufffdcd")  # SQLite keeps NUL; Postgres gets the replacement character
    assert rows[0]["completion_token_ids"] == upstream.tokenize("ab\x00cd")
    assert rows[1]["response"]["choices"][0]["message"]["content"] == "fine"

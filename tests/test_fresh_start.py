"""`trainwire serve` on a machine where nothing was set up: no `trainwire migrate`, no --database-url.

In an empty directory `serve` makes its own embedded SQLite schema (./trainwire.db) and the first SDK call is
recorded there; on a Postgres database without the schema (or with an older one) it refuses to start, with one
line that says to run `trainwire migrate` and no traceback. The proxy is the real `trainwire` console script, run
the way a user runs it, against the scripted upstream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from alembic import command

from tests.support import dbread
from tests.support.ports import free_port
from trainwire.store.migrate import alembic_config, head_revision

TRAINWIRE = str(Path(sys.executable).parent / "trainwire")


def clean_env() -> dict[str, str]:
    """The caller's environment without TRAINWIRE_* settings, so only what the test passes configures serve."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")}


class Serve:
    def __init__(self, cwd: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cwd.parent / f"{cwd.name}-serve-{self.port}.log"
        self.proc = subprocess.Popen(
            [TRAINWIRE, "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=cwd,
            env=clean_env(),
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 60) -> "Serve":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"serve did not become healthy:\n{self.output()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def test_serve_in_an_empty_directory_makes_its_sqlite_schema_and_records(tmp_path, upstream):
    from openai import OpenAI

    cwd = tmp_path / "fresh"
    cwd.mkdir()
    server = Serve(cwd, "--upstream", upstream.url).wait_healthy()
    try:
        assert "created the schema of sqlite+aiosqlite:///./trainwire.db" in server.output()
        assert (cwd / "trainwire.db").is_file()
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
        raw = client.chat.completions.with_raw_response.create(
            model="policy",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=8,
            extra_headers={"X-Session-Id": "fresh-1"},
        )
        assert raw.status_code == 200 and raw.parse().choices[0].message.content == "Hello there, friend."
        call_id = raw.headers["x-call-id"]
    finally:
        assert server.stop() in (0, -signal.SIGTERM), (
            server.output()
        )  # uvicorn re-raises SIGTERM after a clean shutdown
    assert "Traceback" not in server.output()
    db = f"sqlite+aiosqlite:///{cwd / 'trainwire.db'}"
    (row,) = dbread.calls(db, "fresh-1")  # SIGTERM drained the write queue into ./trainwire.db
    assert (row["id"], row["kind"], row["status_code"], row["seq"]) == (call_id, "chat", 200, 0)
    assert row["completion_token_ids"] and len(row["logprobs"]) == len(row["completion_token_ids"])
    assert sorted(p.name for p in cwd.iterdir() if p.name != "trainwire-journal") == ["trainwire.db"]

    # Started again on the same directory: the schema is current, nothing is re-created, the call is still there.
    again = Serve(cwd, "--upstream", upstream.url).wait_healthy()
    try:
        assert "created the schema" not in again.output() and "upgraded" not in again.output()
        r = httpx.get(f"{again.url}/sessions/fresh-1", timeout=10)
        assert r.status_code == 200, r.text
    finally:
        assert again.stop() in (0, -signal.SIGTERM), again.output()
    assert [c["id"] for c in dbread.calls(db, "fresh-1")] == [call_id]


def _refused(tmp_path: Path, url: str) -> str:
    cwd = tmp_path / "pg"
    cwd.mkdir(exist_ok=True)
    server = Serve(cwd, "--upstream", "http://127.0.0.1:9", "--database-url", url)
    try:
        code = server.proc.wait(60)
    except subprocess.TimeoutExpired:
        server.stop()
        raise AssertionError(f"serve started on a database without the schema:\n{server.output()}") from None
    out = server.output()
    assert code != 0, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == lines[-1], out  # one error line, the last thing it says
    assert "trainwire migrate" in errors[0], out
    assert not (cwd / "trainwire.db").exists()  # it did not fall back to SQLite
    return errors[0]


def test_serve_refuses_postgres_without_schema(tmp_path, pg):
    url = pg.create_database("t_" + uuid.uuid4().hex[:12])  # no upgrade_head
    line = _refused(tmp_path, url)
    assert line.startswith("trainwire: error:") and "has no trainwire schema" in line
    assert "postgres@" in line or "127.0.0.1" in line  # says which database


def test_serve_refuses_postgres_with_an_older_schema(tmp_path, pg):
    url = pg.create_database("t_" + uuid.uuid4().hex[:12])
    command.upgrade(alembic_config(url), "0001")
    head = head_revision()
    assert head != "0001"
    line = _refused(tmp_path, url)
    assert f"is at schema revision 0001, not {head}" in line


@pytest.mark.parametrize("password", ["s3cret-pw"])
def test_refusal_line_does_not_print_the_password(tmp_path, pg, password):
    """The one line names the database but not its credentials."""
    url = pg.create_database("t_" + uuid.uuid4().hex[:12]).replace("postgres@", f"postgres:{password}@")
    line = _refused(tmp_path, url)  # trust auth: the password is accepted and ignored
    assert password not in line


def test_refusal_is_the_only_output(tmp_path, pg):
    """Nothing else is printed before it (no migration chatter: nothing was migrated)."""
    url = pg.create_database("t_" + uuid.uuid4().hex[:12])
    _refused(tmp_path, url)
    (log,) = tmp_path.glob("pg-serve-*.log")
    out = log.read_text()
    assert len([line for line in out.splitlines() if line.strip()]) == 1, out

"""One trainer per store: the trainer lease.

A second trainer on the same store would not corrupt claims (they are exclusive), but it would train a second set
of weights from the same checkpoint line, publish version numbers the first one also publishes, and load them into
the same vLLM. So a trainer takes the store's lease before it builds its engine, and a second one refuses to start
with one line (exit 2).

The lease is a lock the database (or, for SQLite, the kernel) holds for the trainer's process, so it goes away the
moment that process dies, however it dies: no heartbeat to miss and no timeout to wait out.
- Postgres: a session-level advisory lock (`pg_try_advisory_lock`) on a connection of its own, named
  `trainwire-train <host>:<pid>` (its `application_name`), which is how a refused trainer can name the holder.
  The connection lives as long as the trainer. If the database drops it (a restart), `keep()` takes the lease again
  at the trainer's next check; if another trainer took it meanwhile, `keep()` says so and the trainer stops.
- SQLite (one machine): `flock` on `<database file>.trainer-lock`, which holds the holder's `<host>:<pid>`.

Holding the lease also says who claimed what: sessions still `claimed` when a trainer takes the lease were
claimed by a trainer that is gone, and are given back at once (store/claims.release_stale_claims with age 0),
not after --claim-timeout-s."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("trainwire.store.lease")

# pg_try_advisory_lock's key: any constant of our own ("trainwire" as a 64-bit number, truncated).
LEASE_KEY = int.from_bytes(b"trainwir", "big") >> 1
APP_PREFIX = "trainwire-train "


class LeaseHeld(Exception):
    """Another trainer holds the store's lease; the message names it."""


class TrainerLease:
    def __init__(self, engine: AsyncEngine, holder: str) -> None:
        self.engine = engine
        self.holder = holder
        self._conn = None  # asyncpg connection (Postgres)
        self._fd: int | None = None  # lock file (SQLite)

    async def acquire(self) -> None:
        """Take the lease, or raise LeaseHeld naming who holds it."""
        if self.engine.dialect.name == "postgresql":
            await self._acquire_pg()
        else:
            self._acquire_file()

    async def keep(self) -> None:
        """Still ours? Postgres: re-take it on a new connection after the database dropped ours; raises LeaseHeld
        when another trainer took it meanwhile, and the database errors of a database still away."""
        if self.engine.dialect.name != "postgresql":
            return
        if self._conn is not None and not self._conn.is_closed():
            try:
                await self._conn.fetchval("SELECT 1")
                return
            except Exception:
                await self._close_pg()
        await self._acquire_pg()
        log.warning("the trainer lease was lost with its database connection and is held again")

    async def release(self) -> None:
        await self._close_pg()
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    # --- Postgres -------------------------------------------------------------------------------------------
    def _pg_url(self) -> str:
        return self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    async def _acquire_pg(self) -> None:
        import asyncpg  # type: ignore[import-untyped]  # (no stubs)

        conn = await asyncpg.connect(self._pg_url(), server_settings={"application_name": APP_PREFIX + self.holder})
        try:
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEASE_KEY):
                self._conn = conn
                return
            holder = await conn.fetchval(
                "SELECT a.application_name || ' (connected since ' || to_char(a.backend_start, "
                "'YYYY-MM-DD HH24:MI:SS TZ') || ')' FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.objid = ($1::bigint & 4294967295)::oid "
                "AND l.classid = ($1::bigint >> 32)::oid AND l.database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database()) LIMIT 1",
                LEASE_KEY,
            )
        except BaseException:
            await conn.close()
            raise
        await conn.close()
        raise LeaseHeld(f"another trainer holds this store's trainer lease: {holder or 'a trainer'}")

    async def _close_pg(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=5)
            except Exception:
                conn.terminate()

    # --- SQLite ---------------------------------------------------------------------------------------------
    def _acquire_file(self) -> None:
        database = make_url(str(self.engine.url)).database
        if not database or database == ":memory:":
            return  # a store no other process can open
        path = Path(database).with_name(Path(database).name + ".trainer-lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise LeaseHeld(
                f"another trainer holds this store's trainer lease: {APP_PREFIX}{holder} ({path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.holder.encode(), 0)
        self._fd = fd

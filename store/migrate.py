"""Alembic, driven from code so `trainwire migrate` works from an installed package (no alembic.ini needed)."""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config


def migrations_dir() -> str:
    """The Alembic scripts, found as the package resource `trainwire.migrations` wherever it is installed."""
    return str(files("trainwire.migrations"))


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", migrations_dir())
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_head(url: str) -> None:
    command.upgrade(alembic_config(url), "head")


class SchemaBehind(RuntimeError):
    """The database's schema is missing or older than this trainwire's; the message says what to run."""


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head() or ""


async def current_revision(engine) -> str | None:
    """The database's Alembic revision, or None when it has no trainwire schema."""
    from alembic.runtime.migration import MigrationContext

    async with engine.connect() as conn:
        return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())


async def ensure_schema(engine, url: str) -> str | None:
    """The embedded SQLite database creates or upgrades its own schema: `serve` needs nothing run before it.
    Postgres is shared, and its upgrades are the operator's to run: a missing or older schema raises SchemaBehind
    naming `trainwire migrate`. Returns what was done, for the log, or None."""
    import asyncio
    import logging

    from trainwire.store.db import is_sqlite, redact

    # Alembic's INFO lines (plugin set-up, context) are noise before a proxy's start, not news.
    alembic_log = logging.getLogger("alembic")
    if not alembic_log.isEnabledFor(logging.DEBUG):
        alembic_log.setLevel(logging.WARNING)
    current, head = await current_revision(engine), head_revision()
    if current == head:
        return None
    if is_sqlite(url):
        # Alembic's async environment runs its own event loop: give it a thread without one.
        await asyncio.to_thread(upgrade_head, url)
        return f"created the schema of {redact(url)}" if current is None else f"upgraded {redact(url)} to {head}"
    state = "has no trainwire schema" if current is None else f"is at schema revision {current}, not {head}"
    raise SchemaBehind(f"the database at {redact(url)} {state}: run `trainwire migrate --database-url URL` first")

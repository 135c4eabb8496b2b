"""`trainwire serve`: uvicorn with graceful shutdown (stop accepting, finish in-flight calls, drain the queue)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from trainwire.settings import ProxySettings


def _check_schema(settings: ProxySettings) -> str | None:
    """Before any worker starts: SQLite gets its schema made or upgraded; Postgres must already have it."""
    import asyncio

    from trainwire.store.db import make_engine
    from trainwire.store.migrate import ensure_schema

    async def check() -> str | None:
        engine = make_engine(settings.resolved_database_url)
        try:
            return await ensure_schema(engine, settings.resolved_database_url)
        finally:
            await engine.dispose()

    return asyncio.run(check())


def run(settings: ProxySettings) -> int:
    # Alembic logs INFO lines as it loads (plugin set-up): noise before a proxy's start, not news.
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("alembic").setLevel(logging.WARNING)
    from trainwire.proxy import workers
    from trainwire.store.migrate import SchemaBehind

    try:
        done = _check_schema(settings)
    except SchemaBehind as exc:
        print(f"trainwire: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # unreachable, wrong password, no such database: one line, no traceback
        print(f"trainwire: error: cannot check the database schema: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if done:
        print(f"trainwire: {done}", file=sys.stderr)

    if settings.workers > 1:
        if not workers.reuseport_available():
            print(
                "trainwire: error: --workers > 1 needs SO_REUSEPORT (Linux, macOS, BSD); run one worker per "
                "process behind a load balancer instead",
                file=sys.stderr,
            )
            return 2
        return workers.Supervisor(settings).run()
    from trainwire.proxy.app import create_app

    server = uvicorn.Server(workers.uvicorn_config(create_app(settings), settings))
    server.run()
    return 0 if server.started else 3

"""Which database errors mean "the database is away, try again" and which mean "it refused this data".

By SQLSTATE class, as Postgres documents them: connection exceptions (08), transaction rollbacks such as
serialization failures and deadlocks (40), insufficient resources (53), program limits hit by load (54 is not:
a statement too complex stays so), operator intervention such as a shutdown or a restart in progress (57), system
errors (58) and internal errors (XX) come and go; everything else (22 data exceptions, 23 integrity violations, 42
syntax or missing objects, ...) is about the statement or its data and fails the same way again. asyncpg reports a
server shutting down (57P03) as a plain DBAPIError, so the class, not the exception type, decides."""

from __future__ import annotations

TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58", "XX"})
# SQLite reports a busy or locked database, and an unreachable file, as OperationalError without a code.
_SQLITE_TRANSIENT = ("database is locked", "database is busy", "unable to open database", "disk i/o error")


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error, looked for on the exception and on what it wraps."""
    seen = 0
    while exc is not None and seen < 5:
        for attr in ("sqlstate", "pgcode"):
            code = getattr(exc, attr, None)
            if isinstance(code, str) and len(code) == 5:
                return code
        exc = getattr(exc, "orig", None) or exc.__cause__  # type: ignore[assignment]
        seen += 1
    return None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the database is away, busy or restarting. Not: it refused the statement or the data."""
    from sqlalchemy import exc as sa_exc

    code = sqlstate(exc)
    if code is not None:
        return code[:2] in TRANSIENT_CLASSES
    if isinstance(exc, (OSError, ConnectionError, TimeoutError, sa_exc.TimeoutError, sa_exc.DisconnectionError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated or isinstance(exc, sa_exc.InterfaceError):
            return True
        if isinstance(exc, sa_exc.OperationalError):
            text = str(exc).lower()
            return any(s in text for s in _SQLITE_TRANSIENT) or "sqlite" not in type(exc.orig).__module__
        return False
    # Not a database error at all (a bug, a value no driver could send): retrying cannot help.
    return False

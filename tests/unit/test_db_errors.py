"""Which database errors the write path retries (the database is away) and which it sets aside as data refused."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

from trainwire.store.db_errors import is_transient, sqlstate


def _wrapped(driver_error: Exception) -> sa_exc.DBAPIError:
    """As SQLAlchemy's asyncpg dialect raises them: a DBAPIError whose .orig carries the driver's SQLSTATE."""

    class Adapted(Exception):
        def __init__(self, err):
            super().__init__(str(err))
            self.sqlstate = err.sqlstate
            self.__cause__ = err

    return sa_exc.DBAPIError("INSERT ...", {}, Adapted(driver_error))


@pytest.mark.parametrize(
    "err, transient",
    [
        (asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"), True),  # 57P03
        (asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"), True),  # 57P01
        (asyncpg.exceptions.SerializationError("could not serialize access"), True),  # 40001
        (asyncpg.exceptions.DeadlockDetectedError("deadlock detected"), True),  # 40P01
        (asyncpg.exceptions.TooManyConnectionsError("too many clients"), True),  # 53300
        (asyncpg.exceptions.ConnectionFailureError("connection failure"), True),  # 08006
        (asyncpg.exceptions.StringDataRightTruncationError("value too long for type character varying(32)"), False),
        (asyncpg.exceptions.UntranslatableCharacterError("unsupported Unicode escape sequence"), False),  # 22P05
        (asyncpg.exceptions.UniqueViolationError("duplicate key"), False),  # 23505
        (asyncpg.exceptions.UndefinedColumnError("column does not exist"), False),  # 42703
    ],
)
def test_sqlstate_classes_decide(err, transient):
    wrapped = _wrapped(err)
    assert sqlstate(wrapped) == err.sqlstate
    assert is_transient(wrapped) is transient


def test_without_a_code():
    assert is_transient(ConnectionRefusedError(111, "refused"))
    assert is_transient(sa_exc.TimeoutError("pool timeout"))
    assert not is_transient(ValueError("a bug, not the database"))
    sqlite_busy = sa_exc.OperationalError("INSERT", {}, __import__("sqlite3").OperationalError("database is locked"))
    assert is_transient(sqlite_busy)
    sqlite_data = sa_exc.OperationalError("INSERT", {}, __import__("sqlite3").OperationalError("no such column: x"))
    assert not is_transient(sqlite_data)

"""Call and session ids: 128 random bits as 32 hex digits, like uuid4().hex.

Drawn from a buffer of `os.urandom` refilled every 256 ids: uuid4 makes one getrandom syscall per id, which was
3% of the proxy's time per call under load. The bits are the same kind (the OS's CSPRNG), so a generated session
id is just as hard to guess."""

from __future__ import annotations

import os

_BATCH = 256
_pool: list[str] = []


def _refill() -> None:
    raw = os.urandom(16 * _BATCH).hex()
    _pool.extend(raw[i : i + 32] for i in range(0, len(raw), 32))


def random_hex() -> str:
    if not _pool:
        _refill()
    return _pool.pop()


# A forked child must not hand out the ids its parent already buffered.
os.register_at_fork(after_in_child=_pool.clear)

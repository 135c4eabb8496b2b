"""`trainwire serve`: uvicorn with graceful shutdown (stop accepting, finish in-flight calls, drain the queue)."""

from __future__ import annotations

import uvicorn

from trainwire.settings import Settings


def run(settings: Settings) -> int:
    if settings.workers > 1:
        # Each worker process builds its own app (and write queue) from the environment.
        import os

        os.environ.update({f"TRAINWIRE_{k.upper()}": _env(v) for k, v in settings.model_dump().items()
                           if v is not None})
        uvicorn.run("proxy.server:app_from_env", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_level=settings.log_level.lower(), timeout_graceful_shutdown=60,
                    access_log=False)
        return 0
    from proxy.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                timeout_graceful_shutdown=60, access_log=False)
    return 0


def _env(value) -> str:
    import json

    return json.dumps([str(v) for v in value]) if isinstance(value, list) else str(value)


def app_from_env():
    from proxy.app import create_app

    return create_app(Settings())

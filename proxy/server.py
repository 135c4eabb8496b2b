"""`trainwire serve`: uvicorn with graceful shutdown (stop accepting, finish in-flight calls, drain the queue)."""

from __future__ import annotations

import sys

import uvicorn

from trainwire.settings import ProxySettings


def run(settings: ProxySettings) -> int:
    from trainwire.proxy import workers

    if settings.workers > 1:
        if not workers.reuseport_available():
            print("trainwire: error: --workers > 1 needs SO_REUSEPORT (Linux, macOS, BSD); run one worker per "
                  "process behind a load balancer instead", file=sys.stderr)
            return 2
        return workers.Supervisor(settings).run()
    from trainwire.proxy.app import create_app

    server = uvicorn.Server(workers.uvicorn_config(create_app(settings), settings))
    server.run()
    return 0 if server.started else 3

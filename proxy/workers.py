"""`trainwire serve --workers N`: N uvicorn processes, each accepting on its own SO_REUSEPORT socket.

Why not uvicorn's own `--workers`: its workers share one listening socket, and the worker that wakes first
accepts every connection waiting. Agents and load generators open their keep-alive connections together, so
in the benchmark one worker took all 8 connections and ran at 99% CPU while the other idled at 0.3%. With a
socket per worker, the kernel spreads connections over the workers as they arrive.

The supervisor starts the workers, restarts one that dies after it was serving (its socket stays open in the
supervisor, so connections wait in its backlog meanwhile), stops everything if one cannot start, and on SIGTERM
or SIGINT passes one SIGTERM to each worker. Workers run in process groups of their own: a terminal's Ctrl-C
(once or twice) must not reach a worker as a second SIGINT, which makes uvicorn skip the shutdown that drains
the write queue. Metrics are summed over workers through PROMETHEUS_MULTIPROC_DIR (proxy/metrics.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time

import uvicorn

from trainwire import plugins
from trainwire.settings import ProxySettings

log = logging.getLogger("trainwire.workers")

DRAIN_S = 120.0  # how long a stopping worker may take: in-flight calls, then the write queue


def reuseport_available() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def listen_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """n listening sockets on one address; with port 0 the first picks it and the others join it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    for _ in range(n):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        port = sock.getsockname()[1]
        sock.listen(2048)
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


def uvicorn_config(app, settings: ProxySettings) -> uvicorn.Config:
    # No proxy_headers: trainwire never reads the client address, and the middleware costs time on every call.
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=60,
        access_log=False,
        proxy_headers=False,
    )


class _Server(uvicorn.Server):
    """Tells the supervisor when it is serving: a worker that dies before that could not start at all."""

    def __init__(self, config: uvicorn.Config, ready) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            self.ready.set()


def _worker(settings: ProxySettings, sock: socket.socket, parent: int, ready) -> None:
    os.setpgid(0, 0)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    )
    threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()
    # A spawned process starts bare: the user's plugins register their reward rules before the app reads them.
    plugins.load(settings.plugin, command="serve")
    from trainwire.proxy.app import create_app

    server = _Server(uvicorn_config(create_app(settings), settings), ready)
    server.run(sockets=[sock])
    if not server.started:
        raise SystemExit(3)  # start-up failed (uvicorn logged why)


def _stop_when_orphaned(parent: int) -> None:
    """The supervisor was killed without passing a signal on: stop the way SIGTERM would, draining the queue."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.sockets = listen_sockets(settings.host, settings.port, settings.workers)
        self.metrics_dir = _metrics_dir()
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess | None] = [None] * settings.workers
        self.ready = [self.ctx.Event() for _ in range(settings.workers)]
        self.stopping = threading.Event()

    def _start(self, i: int) -> None:
        self.ready[i].clear()
        proc = self.ctx.Process(
            target=_worker,
            args=(self.settings, self.sockets[i], os.getpid(), self.ready[i]),
            name=f"trainwire-worker-{i}",
        )
        proc.start()
        self.procs[i] = proc
        log.info("worker %d started (pid %d)", i, proc.pid)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self.stopping.set())
        host, port = self.sockets[0].getsockname()[:2]
        log.info("serving on http://%s:%d with %d workers, one SO_REUSEPORT socket each", host, port, len(self.sockets))
        for i in range(len(self.procs)):
            self._start(i)
        code = 0
        while not self.stopping.wait(0.5):
            for i, proc in enumerate(self.procs):
                assert proc is not None  # every slot was started above
                if proc.is_alive():
                    continue
                if not self.ready[i].is_set():
                    log.error("worker %d exited with %s during start-up; stopping", i, proc.exitcode)
                    code = 1
                    self.stopping.set()
                    break
                log.warning("worker %d (pid %d) exited with %s; starting a new one", i, proc.pid, proc.exitcode)
                self._forget(proc)
                self._start(i)
        self._stop_all()
        return code

    def _stop_all(self) -> None:
        live = [p for p in self.procs if p is not None and p.is_alive()]
        for proc in live:
            if proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_S
        for proc in live:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker pid %d did not stop within %.0fs; killing it", proc.pid, DRAIN_S)
                proc.kill()
                proc.join()
        for sock in self.sockets:
            sock.close()
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _forget(self, proc) -> None:
        """A dead worker's queue depth and policy versions are no longer live values."""
        from prometheus_client import multiprocess as mp

        mp.mark_process_dead(proc.pid)


def _metrics_dir() -> str | None:
    """Where the workers keep their metric values (see proxy/metrics.py): a fresh directory, set in the
    environment the workers inherit. One the user set is used as is, after clearing what an earlier run left."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):
            if name.endswith(".db"):
                os.unlink(os.path.join(given, name))
        return None
    path = tempfile.mkdtemp(prefix="trainwire-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path

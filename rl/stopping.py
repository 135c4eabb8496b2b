"""SIGTERM and SIGINT stop the trainer at any moment, promptly, with exit code 0 and no claim left to expire.

What the first signal does depends on what the trainer is doing, which the worker declares:

* **synchronous work that may be dropped** (importing torch and verl, building the engine, loading the checkpoint,
  the agreement pass, the optimizer step, the export): inside :meth:`Stopper.interruptible` the handler raises
  :class:`StopRequested` right there. Nothing of it has reached vLLM, the store or the checkpoint, so it is
  thrown away; the worker gives the step's claims back and the sessions are trained by the next run.
* **waiting** (polling for sessions, claiming, talking to vLLM at start-up): the worker's task is cancelled at
  the point where it waits (:meth:`Stopper.attach`); a claim interrupted half-way is given back by the claim
  itself.
* **what must finish once begun** (publishing into vLLM, recording the version, the checkpoint, marking the
  sessions trained): inside :meth:`Stopper.protected` the signal only sets :attr:`Stopper.requested`; the worker
  stops as soon as the part is done. Stopping in the middle would leave a published version without the
  checkpoint that made it, or trained sessions still claimed.

A signal during synchronous code outside either kind of part (building samples, a few milliseconds) cancels the
task at its next wait. A second signal aborts at once (exit code 128 + the signal's number), whatever runs.

Under torchrun only rank 0 interrupts a step (the other ranks are in the same collective calls and must finish
them together); their part is the start-up and waiting for rank 0, which tells them to stop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["StopRequested", "Stopper"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """A stop signal arrived during interruptible work. A BaseException, like KeyboardInterrupt, so the
    ``except Exception`` of a failed step (which reports and gives claims back as a failure) does not take it."""


def _abort(signum: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


class Stopper:
    def __init__(self, say: Callable[[str], None] = print, abort: Callable[[int], None] = _abort) -> None:
        self.say = say
        self.abort = abort
        self.requested = False
        self.signal_name: str | None = None
        self._sync = 0
        self._protected = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._previous: dict[int, object] = {}

    # ------------------------------------------------------------------ set-up

    def install(self) -> Stopper:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def attach(self) -> None:
        """Waits of the running task are where a signal cancels it; call from inside that task."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()

    def detach(self) -> None:
        self._loop = self._task = None

    # ------------------------------------------------------------------ the parts

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Synchronous work a signal interrupts where it is (raising StopRequested)."""
        if self.requested:
            raise StopRequested(self.signal_name)
        self._sync += 1
        try:
            yield
        finally:
            self._sync -= 1

    @contextmanager
    def protected(self) -> Iterator[None]:
        """Work a signal lets finish; :attr:`requested` says to stop afterwards."""
        self._protected += 1
        try:
            yield
        finally:
            self._protected -= 1

    # ------------------------------------------------------------------ the handler

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            self.say(f"second {name}: aborting now (claims of a step in progress are released after --claim-timeout-s)")
            self.abort(signum)
            return
        self.requested, self.signal_name = True, name
        if self._sync:
            self.say(f"{name}: stopping now")
            raise StopRequested(name)
        if self._protected:
            self.say(f"{name}: stopping when the step's publish and checkpoint are done ({name} again to abort)")
            return
        self.say(f"{name}: stopping ({name} again to abort)")
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._cancel)
            except RuntimeError:  # the loop has closed: nothing is waiting
                pass

    def _cancel(self) -> None:
        # Runs in the loop, between steps of the task: a part the task has entered since the signal is respected.
        if self._task is not None and not self._protected and not self._task.done():
            self._task.cancel()

"""SIGTERM/SIGINT handling of the trainer (rl/stopping.py), with real signals sent to this process: synchronous work
is interrupted where it is, a waiting task is cancelled where it waits, a protected part finishes first, and a
second signal aborts. The handlers are restored after every test."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from trainwire.rl.stopping import Stopper, StopRequested


@pytest.fixture
def stopper():
    said: list[str] = []
    aborted: list[int] = []
    s = Stopper(say=said.append, abort=aborted.append).install()
    s.said, s.aborted = said, aborted
    try:
        yield s
    finally:
        s.uninstall()


def send_later(sig: int = signal.SIGTERM, after: float = 0.2) -> threading.Timer:
    timer = threading.Timer(after, os.kill, (os.getpid(), sig))
    timer.start()
    return timer


def busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(1000))  # pure Python: the handler runs between bytecodes


def test_synchronous_work_is_interrupted_where_it_is(stopper):
    send_later()
    t0 = time.monotonic()
    with pytest.raises(StopRequested):
        with stopper.interruptible():
            busy(10)
    assert time.monotonic() - t0 < 3
    assert stopper.requested and stopper.signal_name == "SIGTERM"
    assert stopper.said == ["SIGTERM: stopping now"]
    # once asked, the next interruptible part does not even begin
    with pytest.raises(StopRequested):
        with stopper.interruptible():
            raise AssertionError("not reached")


def test_a_waiting_task_is_cancelled_where_it_waits(stopper):
    async def main():
        stopper.attach()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "cancelled"
        finally:
            stopper.detach()
        return "slept"

    send_later(signal.SIGINT)
    t0 = time.monotonic()
    assert asyncio.run(main()) == "cancelled"
    assert time.monotonic() - t0 < 3
    assert stopper.signal_name == "SIGINT" and stopper.said == ["SIGINT: stopping (SIGINT again to abort)"]


def test_a_protected_part_finishes_and_the_stop_is_left_to_the_caller(stopper):
    async def main():
        stopper.attach()
        with stopper.protected():
            await asyncio.sleep(0.6)  # the signal arrives at 0.2 s
            done = "publish finished"
        await asyncio.sleep(0.3)  # no cancel was left pending for after the part
        return done

    send_later()
    assert asyncio.run(main()) == "publish finished"
    assert stopper.requested
    assert stopper.said == [
        "SIGTERM: stopping when the step's publish and checkpoint are done (SIGTERM again to abort)"
    ]


def test_interruptible_work_inside_a_protected_part_is_still_interrupted(stopper):
    send_later()
    with stopper.protected():
        with pytest.raises(StopRequested):
            with stopper.interruptible():
                busy(10)


def test_a_second_signal_aborts(stopper):
    send_later(signal.SIGINT, 0.1)
    send_later(signal.SIGINT, 0.4)
    with stopper.protected():
        busy(1.0)
    assert stopper.aborted == [signal.SIGINT]
    assert stopper.said[-1].startswith("second SIGINT: aborting now")


def test_a_signal_after_the_loop_closed_is_harmless(stopper):
    async def main():
        stopper.attach()  # and never detached

    asyncio.run(main())
    send_later(after=0.05)
    busy(0.5)
    assert stopper.requested


def test_uninstall_restores_the_previous_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    s = Stopper().install()
    assert signal.getsignal(signal.SIGTERM) == s._on_signal
    s.uninstall()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

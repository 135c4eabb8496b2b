"""What the demos share: processes they start and stop (also on Ctrl-C and SIGTERM), ports, the vLLM venv, the
store, progress lines. Standard library only.

``run_demo(body, args, tag)`` runs a demo's body with SIGINT/SIGTERM turned into KeyboardInterrupt and, whatever
happens, stops everything pushed on :data:`STACK` in reverse order, ignoring further signals while it does.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T0 = time.monotonic()
_TAG = ["demo"]


def say(msg: str) -> None:
    print(f"[{_TAG[0]} {time.monotonic() - T0:5.0f}s] {msg}", flush=True)


def port_or_free(preferred: int) -> int:
    """``preferred`` when it is free, else (or for 0) any free port."""
    if preferred:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(*preferred: int) -> list[int]:
    """One distinct free port per entry (each the preferred one when it is free)."""
    out: list[int] = []
    for p in preferred:
        port = port_or_free(p)
        while port in out:
            port = port_or_free(0)
        out.append(port)
    return out


# --------------------------------------------------------------------------------------------- processes


class Child:
    """A process started in its own session (process group): stop() reaches everything it started."""

    def __init__(
        self, name: str, argv: list[str], *, env: dict | None = None, log_path: Path, echo=None, cwd: Path = ROOT
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.echo = echo  # line -> bool: print this line on the console
        self.seen: list[str] = []
        self.lines = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            bufsize=1,
            text=True,
            errors="replace",
        )
        self.reader = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                line = line.rstrip("\n")
                with self.lines:
                    self.seen.append(line)
                    self.lines.notify_all()
                if self.echo and self.echo(line):
                    print(line, flush=True)

    def wait_for_line(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.lines:
            while True:
                if any(needle in line for line in self.seen):
                    return True
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    return False
                self.lines.wait(0.5)

    def wait(self) -> int:
        """Wait for the process to end and its output to be read; its exit code."""
        code = self.proc.wait()
        self.reader.join(5)
        return code

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.reader.join(2)


class Stack:
    """What the demo started, stopped in reverse order exactly once (normal end, Ctrl-C, SIGTERM, atexit)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def push(self, name: str, item) -> None:
        with self.lock:
            self.items.append((name, item))

    def stop(self, name: str) -> None:
        with self.lock:
            found = [(n, i) for n, i in self.items if n == name]
            self.items = [(n, i) for n, i in self.items if n != name]
        for _, item in found:
            item.stop()  # type: ignore[attr-defined]

    def stop_all(self) -> None:
        with self.lock:
            items, self.items = self.items[::-1], []
        for name, item in items:
            try:
                item.stop()  # type: ignore[attr-defined]
            except Exception as exc:  # keep stopping the others
                print(f"[{_TAG[0]}] could not stop {name}: {exc}", file=sys.stderr, flush=True)


STACK = Stack()
atexit.register(STACK.stop_all)


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_demo(body: Callable[..., int], args, tag: str = "demo") -> int:
    """Run ``body(args)``; Ctrl-C and SIGTERM stop it; everything on :data:`STACK` is stopped at the end."""
    _TAG[0] = tag
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        return body(args)
    except KeyboardInterrupt:
        print("", flush=True)
        say("interrupted: stopping everything the demo started")
        return 130
    finally:
        # Ignore further Ctrl-C while the children shut down, so none is left behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        STACK.stop_all()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --------------------------------------------------------------------------------------------- set-up


def ensure_vllm_venv() -> bool:
    """scripts/setup_vllm_venv.sh (cached after the first run); exports TRAINWIRE_VLLM_VENV. False on failure."""
    say("preparing the CPU vLLM venv (scripts/setup_vllm_venv.sh; cached after the first run)")
    setup = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup_vllm_venv.sh")], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    if setup.returncode != 0:
        say("setting up the vLLM venv failed (see the messages above)")
        return False
    os.environ["TRAINWIRE_VLLM_VENV"] = setup.stdout.strip().splitlines()[-1]
    return True


def fresh_store(work: Path) -> str:
    """TRAINWIRE_DATABASE_URL when set, else a new SQLite file in ``work``; migrated."""
    db_url = os.environ.get("TRAINWIRE_DATABASE_URL")
    if not db_url:
        for f in work.glob("trainwire.db*"):
            f.unlink()
        db_url = f"sqlite:///{work / 'trainwire.db'}"
    env = {**os.environ, "TRAINWIRE_DATABASE_URL": db_url}
    subprocess.run(
        [sys.executable, "-m", "trainwire.cli", "migrate"],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return db_url


def wait_healthy(url: str, child: Child, timeout: float = 60.0) -> bool:
    """Poll ``url`` until it answers 200 (False when ``child`` died or the time ran out)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        if not child.alive() or time.monotonic() > deadline:
            return False
        time.sleep(0.2)


class TrainerEcho:
    """The trainer's own progress lines on the console, a step line at most every few seconds (it can publish
    a version a second here); the rest of its output is in the trainer's log."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self.last = 0.0

    def __call__(self, line: str) -> bool:
        if not line.startswith("[trainwire train]"):
            return False
        if "] step " not in line:
            return True
        now = time.monotonic()
        if now - self.last < self.every_s:
            return False
        self.last = now
        return True

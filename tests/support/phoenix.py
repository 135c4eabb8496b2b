"""Arize Phoenix, a tracing backend teams run, from its cached venv (scripts/setup_phoenix_venv.sh): started on free
loopback ports with a throwaway working directory, queried through its REST API."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port


def phoenix_venv() -> Path:
    return Path(os.environ.get("TRAINWIRE_PHOENIX_VENV", Path.home() / ".cache/trainwire/phoenix-venv"))


def require_phoenix() -> None:
    """Skips the calling test without the venv, or fails when TRAINWIRE_REQUIRE_PHOENIX is set."""
    if (phoenix_venv() / ".trainwire-phoenix-complete").exists():
        return
    if os.environ.get("TRAINWIRE_REQUIRE_PHOENIX"):
        raise RuntimeError(f"TRAINWIRE_REQUIRE_PHOENIX is set but there is no Phoenix venv at {phoenix_venv()}")
    pytest.skip(f"no Phoenix venv at {phoenix_venv()} (run scripts/setup_phoenix_venv.sh)")


class Phoenix:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PHOENIX_WORKING_DIR": str(workdir),
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_PORT": str(self.port),
            "PHOENIX_GRPC_PORT": str(free_port()),
        }
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "phoenix.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(phoenix_venv() / "bin/phoenix"), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 120) -> Phoenix:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"phoenix exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/projects", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"phoenix not ready in {timeout}s: {self.log.read_text()[-3000:]}")

    def spans(self, project: str = "default") -> list[dict]:
        out: list[dict] = []
        cursor = None
        while True:
            params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
            r = httpx.get(f"{self.url}/v1/projects/{project}/spans", params=params, timeout=30)
            r.raise_for_status()
            body = r.json()
            out += body["data"]
            cursor = body.get("next_cursor")
            if not cursor:
                return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

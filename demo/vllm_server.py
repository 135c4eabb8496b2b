"""Start and stop a real vLLM OpenAI-compatible server (CPU build) as a subprocess.

Standard library only, so it can be imported from any Python (the project
venv, CI scripts); vLLM itself runs from the cached venv created by
``scripts/setup_vllm_venv.sh`` (``$TRAINWIRE_VLLM_VENV``, default
``~/.cache/trainwire/vllm-venv``).

    from demo.vllm_server import start_vllm
    with start_vllm(model_dir, 8000, served_model_name="tiny", lora=True,
                    log_path=Path("vllm.log")) as vllm:
        print(vllm.url)          # http://127.0.0.1:8000

CLI (foreground until Ctrl-C)::

    python -m demo.vllm_server MODEL_DIR --port 8000 [--lora] [--served-model-name tiny]

See docs/vllm-cpu.md for the endpoints and response shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

DEFAULT_VENV = Path.home() / ".cache" / "trainwire" / "vllm-venv"
MAX_MODEL_LEN = 1024
MAX_LORA_RANK = 16
MAX_LORAS = 2


class VllmStartError(RuntimeError):
    pass


def vllm_venv() -> Path:
    return Path(os.environ.get("TRAINWIRE_VLLM_VENV") or DEFAULT_VENV)


def vllm_python() -> Path:
    return vllm_venv() / "bin" / "python"


def venv_ready() -> bool:
    """True when scripts/setup_vllm_venv.sh has completed for the venv."""
    return (vllm_venv() / ".trainwire-vllm-complete").is_file() and vllm_python().exists()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(could not read {path}: {e})"
    return "\n".join(lines[-n:])


class VllmProcess:
    """A running vLLM server. ``stop()`` kills its whole process group."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path, argv: list[str]):
        self.proc = proc
        self.url = url
        self.log_path = log_path
        self.argv = argv
        self.startup_s: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        return _tail(self.log_path, n)

    def wait_healthy(self, timeout: float = 300.0) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise VllmStartError(
                    f"vLLM exited with code {self.proc.returncode} during start-up; "
                    f"log {self.log_path}, last lines:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - t0
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise VllmStartError(
                    f"vLLM not healthy after {timeout:.0f} s; log {self.log_path}, last lines:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def warmup(self, model: str, timeout: float = 120.0) -> None:
        """Send one small request with logprobs.

        The first request that asks for logprobs triggers a torch.compile of
        vLLM's logprob-rank helper (2-3 s warm, ~18 s with a cold cache);
        doing it here keeps later per-call latency steady.
        """
        body = {"model": model, "prompt": "hello", "max_tokens": 2, "temperature": 0, "logprobs": 1}
        req = urllib.request.Request(
            self.url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                r.read()
        except (urllib.error.URLError, OSError) as e:
            raise VllmStartError(f"vLLM warm-up request failed: {e}; last log lines:\n{self.log_tail()}") from e

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it has not exited."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # vLLM spawns an engine-core child in the same group; make sure nothing
        # of the group survives even when the leader is already gone.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "VllmProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"VllmProcess(pid={self.proc.pid}, url={self.url!r}, alive={self.alive()})"


def build_argv(
    model_dir: Path | str,
    port: int,
    *,
    served_model_name: str | None = None,
    lora: bool = False,
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
) -> list[str]:
    argv = [
        str(vllm_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--logprobs-mode",
        "processed_logprobs",
        "--max-logprobs",
        "20",
        "--disable-log-stats",
    ]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if lora:
        argv += ["--enable-lora", "--max-lora-rank", str(MAX_LORA_RANK), "--max-loras", str(MAX_LORAS)]
    argv += list(extra_args)
    return argv


def vllm_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_SERVER_DEV_MODE": "1",
            "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "PYTHONUNBUFFERED": "1",
            # No network here: never try the HF hub.
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
    )
    # The project venv must not leak into the vLLM venv's interpreter.
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    return env


def start_vllm(
    model_dir: Path | str,
    port: int,
    *,
    served_model_name: str | None = None,
    lora: bool = False,
    log_path: Path | str | None = None,
    extra_args: Sequence[str] = (),
    host: str = "127.0.0.1",
    timeout: float = 300.0,
    wait: bool = True,
    warmup: bool = True,
) -> VllmProcess:
    """Start vLLM and (by default) wait until ``/health`` answers 200.

    With ``warmup`` (default) one small logprobs request is sent before
    returning, so the first real request is not slowed by a lazy compile.
    ``startup_s`` on the result holds the measured time to healthy (+warm-up).
    """
    t0 = time.monotonic()
    if not vllm_python().exists():
        raise VllmStartError(
            f"no vLLM venv at {vllm_venv()}; run scripts/setup_vllm_venv.sh (or set TRAINWIRE_VLLM_VENV)"
        )
    if log_path is None:
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-{port}.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = build_argv(
        model_dir, port, served_model_name=served_model_name, lora=lora, host=host, extra_args=extra_args
    )
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=vllm_env(),
            start_new_session=True,  # own process group, so stop() reaches every child
        )
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    vp = VllmProcess(proc, f"http://{client_host}:{port}", log_path, argv)
    if wait:
        try:
            vp.wait_healthy(timeout)
            if warmup:
                vp.warmup(served_model_name or str(model_dir))
        except BaseException:
            vp.stop()
            raise
        vp.startup_s = time.monotonic() - t0
    return vp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a vLLM OpenAI server (CPU) in the foreground.")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--lora", action="store_true", help="enable runtime LoRA adapters")
    p.add_argument("--log", type=Path, default=None, help="log file (default: /tmp/vllm-PORT.log)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="extra vLLM args after --")
    args = p.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    t0 = time.monotonic()
    print(f"starting vLLM on {args.host}:{args.port} (log: {args.log or f'/tmp/vllm-{args.port}.log'})", flush=True)
    vp = start_vllm(
        args.model_dir,
        args.port,
        served_model_name=args.served_model_name,
        lora=args.lora,
        log_path=args.log,
        extra_args=extra,
        host=args.host,
        timeout=args.timeout,
    )
    print(f"vLLM ready at {vp.url} after {time.monotonic() - t0:.1f} s (pid {vp.pid}); Ctrl-C to stop", flush=True)
    try:
        while vp.alive():
            time.sleep(1)
        print(f"vLLM exited with code {vp.proc.returncode}; last log lines:\n{vp.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping vLLM", flush=True)
        return 0
    finally:
        vp.stop()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    sys.exit(main())

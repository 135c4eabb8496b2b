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

    python -m demo.vllm_server MODEL_DIR --port 8000 [--lora] [--served-model-name tiny] [--max-model-len N]
        [--chat-template FILE] [--kv-cache-gb N] [-- EXTRA_VLLM_ARGS]

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
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

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


def _default_log(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"vllm-{port}.log"


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(could not read {path}: {e})"
    return "\n".join(lines[-n:])


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # the command name (field 2) may contain spaces; fields after ")" are fixed
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(pid: int) -> set[int]:
    """All live descendants of ``pid`` (Linux /proc; empty elsewhere)."""
    if not os.path.isdir("/proc"):
        return set()
    children = _children_map()
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except OSError:
        return False


def _signal_all(leader: int, pids: set[int], sig: int) -> None:
    try:
        os.killpg(leader, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


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

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate vLLM and every process it started.

        vLLM's engine-core / worker processes do not always stay in the
        server's process group (the multiprocessing helpers give them their
        own), so besides the group we signal every descendant found in /proc.
        SIGTERM first (vLLM shuts its children down itself), SIGKILL after
        ``timeout``.
        """
        tree = _descendants(self.proc.pid)
        if self.proc.poll() is None:
            _signal_all(self.proc.pid, tree, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        tree |= _descendants(self.proc.pid)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_all(self.proc.pid, {p for p in tree if _alive(p)}, signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        """SIGKILL the server and every process it started at once, as a crash or an OOM kill would."""
        _signal_all(self.proc.pid, _descendants(self.proc.pid), signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
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
    tool_parser: str | None = "hermes",
    extra_args: Sequence[str] = (),
    max_model_len: int = MAX_MODEL_LEN,
    chat_template: Path | str | None = None,
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
        str(max_model_len),
        "--logprobs-mode",
        "processed_logprobs",
        "--max-logprobs",
        "20",
        "--disable-log-stats",
    ]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if chat_template:
        argv += ["--chat-template", str(chat_template)]
    if lora:
        argv += ["--enable-lora", "--max-lora-rank", str(MAX_LORA_RANK), "--max-loras", str(MAX_LORAS)]
    if tool_parser:
        # Without this, any request that carries "tools" (tool_choice defaults
        # to "auto") is refused with 400.  The tiny model's chat template
        # renders calls as <tool_call>{"name":..,"arguments":..}</tool_call>,
        # which is the hermes format.
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", tool_parser]
    argv += list(extra_args)
    return argv


def vllm_env(base: dict[str, str] | None = None, kv_cache_gb: int | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if kv_cache_gb is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
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
    tool_parser: str | None = "hermes",
    timeout: float = 300.0,
    wait: bool = True,
    warmup: bool = True,
    max_model_len: int = MAX_MODEL_LEN,
    chat_template: Path | str | None = None,
    kv_cache_gb: int | None = None,
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
    log_path = Path(log_path) if log_path is not None else _default_log(port)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = build_argv(
        model_dir,
        port,
        served_model_name=served_model_name,
        lora=lora,
        host=host,
        tool_parser=tool_parser,
        extra_args=extra_args,
        max_model_len=max_model_len,
        chat_template=chat_template,
    )
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=vllm_env(kv_cache_gb=kv_cache_gb),
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
    p.add_argument("--log", type=Path, default=None, help="log file (default: $TMPDIR/vllm-PORT.log)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--tool-parser", default="hermes", help="vLLM tool-call parser; 'none' to disable")
    p.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN)
    p.add_argument("--chat-template", type=Path, default=None, help="a Jinja chat template file (vLLM's flag)")
    p.add_argument("--kv-cache-gb", type=int, default=None, help="VLLM_CPU_KVCACHE_SPACE (default 1)")
    # Anything not recognised here (e.g. "-- --max-num-seqs 8") goes to vLLM.
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    log = args.log or _default_log(args.port)
    t0 = time.monotonic()
    print(f"starting vLLM on {args.host}:{args.port} (log: {log})", flush=True)
    try:
        vp = start_vllm(
            args.model_dir,
            args.port,
            served_model_name=args.served_model_name,
            lora=args.lora,
            log_path=log,
            extra_args=extra,
            host=args.host,
            tool_parser=None if args.tool_parser in ("", "none") else args.tool_parser,
            timeout=args.timeout,
            max_model_len=args.max_model_len,
            chat_template=args.chat_template,
            kv_cache_gb=args.kv_cache_gb,
        )
    except KeyboardInterrupt:  # start_vllm already stopped what it started
        print("interrupted during start-up", flush=True)
        return 130
    except VllmStartError as e:
        print(str(e), file=sys.stderr, flush=True)
        return 1
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


def _raise_keyboard_interrupt(*_):
    raise KeyboardInterrupt


if __name__ == "__main__":
    # Explicit handlers: a shell starting us in the background ("... &") sets
    # SIGINT to ignored, and SIGTERM has no Python handler by default.
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    sys.exit(main())

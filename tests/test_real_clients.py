"""Codex CLI and Claude Code, unchanged (pinned npm releases), each running one headless task through the proxy
against real vLLM (CPU build): each exits 0, and every call it made is recorded trainable.

The policy is the tiny random model with a long context (the CLIs' system prompts and tool lists are 25-31k tokens
in its 512-token vocabulary) and, as extra end-of-sequence ids in its generation_config.json, every token with a
space or newline, so that each answer of the random model ends within a few tokens (finish_reason "stop"). What
each CLI needs is only its documented configuration (README, "Every API an agent speaks"): Codex a model provider
with `base_url` and `wire_api = "responses"` (and `web_search = "disabled"`: a hosted tool, refused), Claude Code
ANTHROPIC_BASE_URL and a model name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import dbread
from tests.support.npm_clients import CLAUDE_CODE, CODEX, installed
from tests.support.ports import free_port
from tests.support.vllm_support import require_vllm_venv

pytestmark = pytest.mark.vllm

require_vllm_venv()

CONTEXT = 131072
TASK = "Reply with one word: hello."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer

    from demo.tiny_model import build_tiny_model

    src = build_tiny_model(tmp_path_factory.mktemp("clients") / "tiny")
    out = src.parent / "tiny-long"
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT  # rotary positions: nothing learned per position
    (out / "config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    stops = [i for i in range(5, tok.get_vocab_size()) if any(c in tok.decode([i]) for c in " \n")]
    generation = json.loads((out / "generation_config.json").read_text())
    generation["eos_token_id"] = [2, *stops]
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out


@pytest.fixture(scope="module")
def vllm(model_dir, tmp_path_factory):
    from demo.vllm_server import start_vllm

    log = tmp_path_factory.mktemp("clients-log") / "vllm.log"
    proc = start_vllm(
        model_dir, free_port(), served_model_name="tiny", log_path=log, extra_args=["--max-model-len", str(CONTEXT)]
    )
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def proxy(start_proxy, vllm, pg_url, tmp_path):
    p = start_proxy("--upstream", vllm.url, "--database-url", pg_url, "--journal-dir", str(tmp_path / "journal"))
    p.db_url = pg_url
    return p


def run_cli(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    out = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)
    print(f"{Path(argv[0]).name}: exit {out.returncode} in {time.monotonic() - t0:.1f}s")
    return out


def assert_all_trainable(db_url: str, session: str, kind: str) -> list[dict]:
    calls = dbread.wait_calls(db_url, 1, session)
    assert calls, f"no call recorded in session {session}"
    for call in calls:
        assert (call["kind"], call["status_code"], call["route"]) == (kind, 200, "policy"), call["error"]
        assert call["trainable"] is True and call["untrainable_reason"] is None, call["untrainable_reason"]
        assert call["aborted"] is False
        assert len(call["logprobs"]) == len(call["completion_token_ids"]) > 0
    print(f"{session}: {len(calls)} calls, prompts of {[len(c['prompt_token_ids']) for c in calls]} tokens")
    return calls


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "CODEX_", "CLAUDE_"))}
    env["HOME"] = str(home)
    return env


def test_codex_cli_runs_a_task_through_the_proxy(proxy, tmp_path):
    codex = installed(CODEX)
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    (home / ".codex" / "config.toml").write_text(
        'model = "policy"\n'
        'model_provider = "trainwire"\n'
        'web_search = "disabled"\n'
        "[model_providers.trainwire]\n"
        'name = "trainwire"\n'
        f'base_url = "{proxy.url}/tw/session=codex-e2e/v1"\n'
        'wire_api = "responses"\n'
    )
    env = {**clean_env(home), "CODEX_HOME": str(home / ".codex")}
    out = run_cli([str(codex), "exec", "--skip-git-repo-check", TASK], env, tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    calls = assert_all_trainable(proxy.db_url, "codex-e2e", "responses")
    request = calls[0]["request"]
    assert "client_metadata" in request and request["store"] is False  # the fields of issue 19, as sent
    assert "client_metadata" in calls[0]["sampling"]["ignored"]


def test_claude_code_runs_a_task_through_the_proxy(proxy, tmp_path):
    claude = installed(CLAUDE_CODE)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **clean_env(home),
        "ANTHROPIC_BASE_URL": f"{proxy.url}/tw/session=claude-e2e",
        "ANTHROPIC_API_KEY": "unused",
        "ANTHROPIC_MODEL": "policy",
        "ANTHROPIC_SMALL_FAST_MODEL": "policy",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    out = run_cli([str(claude), "-p", TASK, "--model", "policy"], env, tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    calls = assert_all_trainable(proxy.db_url, "claude-e2e", "messages")
    assert "metadata" in calls[0]["sampling"]["ignored"] and "anthropic-beta" in calls[0]["sampling"]["ignored"]

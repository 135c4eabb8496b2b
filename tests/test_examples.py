"""Each example in examples/ run the way a user runs it (a subprocess with OPENAI_BASE_URL pointing at the proxy).

Against scripted upstreams that answer like a model that has learned the task: the calls must arrive in the store
with the right session, task, agent and order, the tool result must be in the next request, and the episode's
reward must be posted. Against a real vLLM (CPU build, the tiny random model; marked `vllm`): every example's calls
are served and recorded as trainable policy calls in order (seq 0..n-1) with token ids and logprobs, under the
session, task and agent the example gave, and its reward is stored.

AutoGen AgentChat and CrewAI pin versions of protobuf, pydantic and openai the project does not run, so their
examples run from their own cached venv (examples/setup_frameworks_venv.sh, made on first use)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.support import dbread
from tests.support.proxyproc import ProxyProcess
from tests.support.scripted_upstream import Script, ScriptedUpstream
from tests.support.vllm_support import require_vllm_venv, serve, tiny_model
from trainwire.store.migrate import upgrade_head

ROOT = Path(__file__).resolve().parents[1]
# Rewards are stored by proxy/reward_routes.py; before it existed, the reward POST went to a recorder instead.
HAS_REWARD_ROUTE = importlib.util.find_spec("trainwire.proxy.reward_routes") is not None


def _text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")


def policy_model(req: dict) -> Script:
    """The policy, answering like a model that has learned both tasks."""
    messages = req.get("messages") or []
    last = messages[-1] if messages else {}
    if req.get("tools"):  # the calculator agents: call the tool, then answer with its result
        if last.get("role") == "tool":
            return Script(text=f"The answer is {_text(last)}.")
        question = next(_text(m) for m in messages if m.get("role") == "user")
        expression = re.search(r"Compute (.+?)\. Use", question).group(1)
        return Script(tool_calls=[{"name": "calculator", "arguments": json.dumps({"expression": expression})}])
    rules = re.search(r'about (.+?) that uses the word "(\w+)" and has at most (\d+) words', _text(messages[1]))
    topic, word = rules.group(1), rules.group(2)
    if "A reviewer says" in _text(last):  # the writer's revision
        return Script(text=f"A {word} view of {topic}.")
    return Script(text=f"Here is a long and winding sentence about {topic}, which is {word}, " + "very " * 12 + "long.")


def checker_model(req: dict) -> Script:
    """The frozen checker behind a --model-route: OK only for a sentence within the word limit."""
    text = _text(req["messages"][-1])
    limit = int(re.search(r"at most (\d+) words", text).group(1))
    sentence = text.split("Sentence:", 1)[1].strip()
    n = len(sentence.split())
    return Script(text="OK" if n <= limit else f"Too long: {n} words, the limit is {limit}.")


class RewardRecorder:
    """Stands in for POST /reward where the proxy has no reward route yet."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict, dict]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                recorder.posts.append((self.path, dict(self.headers), json.loads(body)))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"object": "reward"}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Scripted policy + scripted checker provider + the proxy (SQLite, as `make demo` runs it)."""
    tmp = tmp_path_factory.mktemp("examples")
    db = f"sqlite+aiosqlite:///{tmp}/trainwire.db"
    upgrade_head(db)
    policy, checker = ScriptedUpstream(), ScriptedUpstream(model="checker-base")
    policy.responder, checker.responder = policy_model, checker_model
    policy.start(), checker.start()
    routes = tmp / "routes.yaml"
    routes.write_text(
        yaml.safe_dump(
            {"checker": {"model": "openai/checker-base", "api_base": f"{checker.url}/v1", "api_key": "unused"}}
        )
    )
    proxy = ProxyProcess(
        [
            "--upstream",
            policy.url,
            "--database-url",
            db,
            "--journal-dir",
            str(tmp / "journal"),
            "--routes-file",
            str(routes),
        ],
        log_path=tmp / "proxy.log",
    )
    proxy.start(timeout=90)
    recorder = None if HAS_REWARD_ROUTE else RewardRecorder()
    yield {"proxy": proxy, "db": db, "policy": policy, "checker": checker, "recorder": recorder}
    proxy.stop()
    policy.stop()
    checker.stop()
    if recorder:
        recorder.stop()


@pytest.fixture(scope="module")
def frameworks_python() -> str:
    """The Python of the AutoGen/CrewAI venv, made by examples/setup_frameworks_venv.sh when it is not there yet
    (about 40 s, cached in ~/.cache/trainwire/frameworks-venv)."""
    out = subprocess.run(
        ["bash", str(ROOT / "examples" / "setup_frameworks_venv.sh")], capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        pytest.skip(f"examples/setup_frameworks_venv.sh failed: {out.stderr[-2000:]}")
    return str(Path(out.stdout.strip().splitlines()[-1]) / "bin" / "python")


def run_example(
    stack, script: str, *args: str, python: str = sys.executable, timeout: float = 180
) -> list[tuple[str, str]]:
    """Run examples/<script> like a user; returns (session id, rest of line) per episode it printed."""
    cmd = [python, str(ROOT / "examples" / script), *args]
    if stack.get("recorder"):
        cmd += ["--proxy-url", stack["recorder"].url]  # the LLM calls still go to OPENAI_BASE_URL
    env = {**os.environ, "OPENAI_BASE_URL": stack["proxy"].v1, "OPENAI_API_KEY": "sk-example"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr + stack["proxy"].log_tail()
    return re.findall(r"^episode \d+: (\S+) (.*)$", out.stdout, re.M)


def assert_rewarded(stack, sessions: list[str], value: float = 1.0) -> None:
    if stack["recorder"]:
        posts = [(path, body) for path, _, body in stack["recorder"].posts if body["session_id"] in sessions]
        assert posts == [("/reward", {"session_id": s, "reward": value}) for s in sessions]
        return
    rewards = [r for r in dbread.rewards(stack["db"]) if r["session_id"] in sessions]
    assert [(r["session_id"], r["value"], r["final"], r["source"]) for r in rewards] == [
        (s, value, True, "user") for s in sessions
    ]


def assert_tool_episode(stack, session: str, task_id: str | None = None, agent: str | None = None) -> None:
    """Two policy calls in order: the first asks for the calculator, the second carries the tool's result."""
    rows = dbread.wait_calls(stack["db"], 2, session)
    assert [(r["seq"], r["route"], r["trainable"], r["status_code"]) for r in rows] == [
        (0, "policy", True, 200),
        (1, "policy", True, 200),
    ]
    assert [r["agent_name"] for r in rows] == [agent, agent]
    assert len({r["task_id"] for r in rows}) == 1 and rows[0]["task_id"].startswith("calc-")
    if task_id:
        assert rows[0]["task_id"] == task_id
    question = [m for m in rows[0]["request"]["messages"] if m["role"] == "user"][0]
    expression = re.search(r"Compute (.+?)\. Use", _text(question)).group(1)
    assert rows[0]["request"]["tools"][0]["function"]["name"] == "calculator"
    tool_call = rows[0]["response"]["choices"][0]["message"]["tool_calls"][0]
    assert json.loads(tool_call["function"]["arguments"]) == {"expression": expression}
    tool_msgs = [m for m in rows[1]["request"]["messages"] if m["role"] == "tool"]
    assert len(tool_msgs) == 1 and tool_msgs[0]["tool_call_id"] == tool_call["id"]
    assert _text(tool_msgs[0]) == str(eval(expression))  # noqa: S307 - the test's own integer expression
    assert rows[1]["request"]["messages"][: len(rows[0]["request"]["messages"])] == rows[0]["request"]["messages"]
    assert rows[1]["response"]["choices"][0]["message"]["content"] == f"The answer is {_text(tool_msgs[0])}."
    assert rows[0]["completion_token_ids"] and rows[1]["logprobs"]  # trainable: token data recorded


def test_openai_sdk_agent(stack):
    episodes = run_example(stack, "openai_sdk_agent.py", "--episodes", "2", "--group-size", "2")
    assert len(episodes) == 2 and all(rest.endswith("reward 1.0") for _, rest in episodes)
    sessions = [s for s, _ in episodes]
    tasks = {re.search(r"task (\S+)", rest).group(1) for _, rest in episodes}
    assert len(set(sessions)) == 2 and len(tasks) == 1  # one GRPO group: two episodes of the same task
    for session in sessions:
        assert_tool_episode(stack, session, next(iter(tasks)))
    assert_rewarded(stack, sessions)


def test_multi_agent_writer_and_routed_checker(stack):
    episodes = run_example(stack, "multi_agent.py", "--episodes", "1", "--checker-model", "checker")
    assert len(episodes) == 1 and episodes[0][1].endswith("reward 1.0")
    session = episodes[0][0]
    rows = dbread.wait_calls(stack["db"], 4, session)
    assert [(r["seq"], r["agent_name"], r["model_requested"], r["route"], r["trainable"]) for r in rows] == [
        (0, "writer", "policy", "policy", True),
        (1, "checker", "checker", "frozen", False),
        (2, "writer", "policy", "policy", True),
        (3, "checker", "checker", "frozen", False),
    ]
    assert len({r["task_id"] for r in rows}) == 1
    draft = rows[0]["response"]["choices"][0]["message"]["content"]
    assert draft in _text(rows[1]["request"]["messages"][-1])  # the checker saw the writer's draft
    feedback = rows[1]["response"]["choices"][0]["message"]["content"]
    assert feedback.startswith("Too long")
    assert _text(rows[2]["request"]["messages"][-1]) == f"A reviewer says: {feedback}\nRewrite the sentence."
    assert rows[3]["response"]["choices"][0]["message"]["content"] == "OK"
    assert rows[1]["model_served"] == "checker-base" and rows[1]["completion_token_ids"] is None
    assert_rewarded(stack, [session])


def test_langchain_agent(stack):
    episodes = run_example(stack, "langchain_agent.py", "--episodes", "1")
    assert len(episodes) == 1 and episodes[0][1].endswith("reward 1.0")
    assert_tool_episode(stack, episodes[0][0])
    assert_rewarded(stack, [episodes[0][0]])


def test_agents_sdk_agent(stack):
    episodes = run_example(stack, "agents_sdk_agent.py", "--episodes", "1")
    assert len(episodes) == 1 and episodes[0][1].endswith("reward 1.0")
    assert_tool_episode(stack, episodes[0][0])
    assert_rewarded(stack, [episodes[0][0]])


# The base URL is the only change these agents make: the /tw/session=.../task=.../agent=solver/v1 form of it.


def _tw_episode(stack, script: str, python: str = sys.executable) -> str:
    episodes = run_example(stack, script, "--episodes", "1", python=python)
    assert len(episodes) == 1 and episodes[0][1].endswith("reward 1.0"), episodes
    session = episodes[0][0]
    assert_tool_episode(stack, session, agent="solver")
    assert_rewarded(stack, [session])
    return session


def test_langgraph_agent(stack):
    assert _tw_episode(stack, "langgraph_agent.py").startswith("lg-")


def test_autogen_agent(stack, frameworks_python):
    session = _tw_episode(stack, "autogen_agent.py", frameworks_python)
    rows = dbread.calls(stack["db"], session)
    # AutoGen reflects on the tool's result with the tools still offered.
    assert [r["request"]["tool_choice"] for r in rows] == ["auto", "auto"]


def test_crewai_agent(stack, frameworks_python):
    session = _tw_episode(stack, "crewai_agent.py", frameworks_python)
    rows = dbread.calls(stack["db"], session)
    assert "Current Task: Compute" in _text(rows[0]["request"]["messages"][1])  # CrewAI's own prompt


# --- against a real vLLM ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The tiny random model on real vLLM, and the proxy in front of it (SQLite, as `make demo` runs it)."""
    require_vllm_venv()
    model_dir = tiny_model(tmp_path_factory, "examples-vllm")
    vllm = serve(model_dir, tmp_path_factory, "examples-vllm", "tiny")
    tmp = tmp_path_factory.mktemp("examples-vllm-proxy")
    db = f"sqlite+aiosqlite:///{tmp}/trainwire.db"
    proxy = ProxyProcess(
        ["--upstream", vllm.url, "--database-url", db, "--journal-dir", str(tmp / "journal")],
        log_path=tmp / "proxy.log",
    )
    try:
        proxy.start(timeout=90)
        yield {"proxy": proxy, "db": db, "vllm": vllm}
    finally:
        proxy.stop()
        vllm.stop()


# (script, venv, agent name it gives, extra arguments): the random model rarely stops by itself, so answers are
# bounded where the example lets them be.
REAL_EXAMPLES = [
    ("openai_sdk_agent.py", "project", None, ("--max-tokens", "48")),
    ("langchain_agent.py", "project", None, ()),
    ("agents_sdk_agent.py", "project", None, ()),
    ("multi_agent.py", "project", ("writer", "checker"), ()),
    ("langgraph_agent.py", "project", "solver", ("--max-tokens", "48")),
    ("autogen_agent.py", "frameworks", "solver", ("--max-tokens", "48")),
    ("crewai_agent.py", "frameworks", "solver", ("--max-tokens", "48")),
]


@pytest.mark.vllm
@pytest.mark.parametrize(
    "script,venv,agent,extra", REAL_EXAMPLES, ids=[e[0].removesuffix(".py") for e in REAL_EXAMPLES]
)
def test_example_against_real_vllm(real, request, script, venv, agent, extra):
    python = request.getfixturevalue("frameworks_python") if venv == "frameworks" else sys.executable
    t0 = time.monotonic()
    episodes = run_example(real, script, "--episodes", "1", *extra, python=python, timeout=300)
    print(f"{script}: {time.monotonic() - t0:.1f}s")
    assert len(episodes) == 1, episodes
    session, rest = episodes[0]
    reward = float(re.search(r"reward (\S+)$", rest).group(1))
    rows = dbread.calls(real["db"], session)
    assert rows, f"no calls recorded for {session}; proxy log:\n{real['proxy'].log_tail()}"
    assert [r["seq"] for r in rows] == list(range(len(rows)))  # in order, none missing
    assert {r["session_id"] for r in rows} == {session}
    if isinstance(agent, tuple):  # the writer/checker pair: writer first, then turns alternate
        assert [r["agent_name"] for r in rows] == [agent[i % 2] for i in range(len(rows))]
    else:
        assert {r["agent_name"] for r in rows} == {agent}
    tasks = {r["task_id"] for r in rows}
    assert len(tasks) == 1
    for r in rows:
        assert (r["kind"], r["path"], r["route"], r["status_code"]) == ("chat", "/v1/chat/completions", "policy", 200)
        assert r["trainable"] is True and r["untrainable_reason"] is None and r["model_served"] == "tiny"
        assert r["prompt_token_ids"] and r["completion_token_ids"]
        assert len(r["logprobs"]) == len(r["completion_token_ids"])
        assert r["usage"]["completion_tokens"] == len(r["completion_token_ids"])
    rewards = [x for x in dbread.rewards(real["db"]) if x["session_id"] == session]
    assert [(x["value"], x["source"]) for x in rewards if x["final"]] == [(reward, "user")]
    # The proxy's automatic reward for an answer cut off at max_tokens, on exactly those calls.
    truncated = {r["id"] for r in rows if r["finish_reason"] == "length"}
    assert {x["call_id"] for x in rewards if not x["final"]} == truncated
    assert all(x["source"] == "truncated" for x in rewards if not x["final"])

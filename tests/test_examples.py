"""Each example in examples/ run the way a user runs it (a subprocess with OPENAI_BASE_URL pointing at the proxy),
against scripted upstreams that answer like a model that has learned the task: the calls must arrive in the
store with the right session, task, agent and order, the tool result must be in the next request, and the
episode's reward must be posted."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from trainwire.store.migrate import upgrade_head
from tests.support import dbread
from tests.support.proxyproc import ProxyProcess
from tests.support.scripted_upstream import Script, ScriptedUpstream

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
    routes.write_text(yaml.safe_dump({"checker": {"model": "openai/checker-base", "api_base": f"{checker.url}/v1",
                                                  "api_key": "unused"}}))
    proxy = ProxyProcess(["--upstream", policy.url, "--database-url", db, "--journal-dir", str(tmp / "journal"),
                          "--routes-file", str(routes)], log_path=tmp / "proxy.log")
    proxy.start(timeout=90)
    recorder = None if HAS_REWARD_ROUTE else RewardRecorder()
    yield {"proxy": proxy, "db": db, "policy": policy, "checker": checker, "recorder": recorder}
    proxy.stop()
    policy.stop()
    checker.stop()
    if recorder:
        recorder.stop()


def run_example(stack, script: str, *args: str) -> list[tuple[str, str]]:
    """Run examples/<script> like a user; returns (session id, rest of line) per episode it printed."""
    cmd = [sys.executable, str(ROOT / "examples" / script), *args]
    if stack["recorder"]:
        cmd += ["--proxy-url", stack["recorder"].url]  # the LLM calls still go to OPENAI_BASE_URL
    env = {**os.environ, "OPENAI_BASE_URL": stack["proxy"].v1, "OPENAI_API_KEY": "sk-example"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr + stack["proxy"].log_tail()
    return re.findall(r"^episode \d+: (\S+) (.*)$", out.stdout, re.M)


def assert_rewarded(stack, sessions: list[str], value: float = 1.0) -> None:
    if stack["recorder"]:
        posts = [(path, body) for path, _, body in stack["recorder"].posts if body["session_id"] in sessions]
        assert posts == [("/reward", {"session_id": s, "reward": value}) for s in sessions]
        return
    rewards = [r for r in dbread.rewards(stack["db"]) if r["session_id"] in sessions]
    assert [(r["session_id"], r["value"], r["final"], r["source"]) for r in rewards] == [
        (s, value, True, "user") for s in sessions]


def assert_tool_episode(stack, session: str, task_id: str | None = None) -> None:
    """Two policy calls in order: the first asks for the calculator, the second carries the tool's result."""
    rows = dbread.wait_calls(stack["db"], 2, session)
    assert [(r["seq"], r["route"], r["trainable"], r["status_code"]) for r in rows] == [
        (0, "policy", True, 200), (1, "policy", True, 200)]
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
        (0, "writer", "policy", "policy", True), (1, "checker", "checker", "frozen", False),
        (2, "writer", "policy", "policy", True), (3, "checker", "checker", "frozen", False)]
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

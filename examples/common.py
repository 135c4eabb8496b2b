"""What the example agents share and that has nothing to do with their framework: the arithmetic tasks, the
calculator the agent runs itself, where the proxy is, and posting a reward the way curl would:

    curl -X POST http://localhost:8100/reward -H 'content-type: application/json' \\
         -d '{"session_id": "calc-1a2b3c", "reward": 1.0}'
"""

from __future__ import annotations

import ast
import json
import operator
import os
import random
import re
import urllib.parse
import urllib.request

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}

CALCULATOR_DOC = "Evaluate an arithmetic expression such as '(12 + 7) * 3' and return the result."
# The calculator as an OpenAI tool definition, for clients that take raw JSON schemas.
CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": CALCULATOR_DOC,
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}


def safe_eval(expression: str) -> float | int:
    """Numbers, + - * / // % ** and parentheses; nothing else (no names, calls or attributes)."""

    def ev(node: ast.AST):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 100:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported expression: {ast.dump(node)[:60]}")

    return ev(ast.parse(expression.strip(), mode="eval"))


def calculator(expression: str) -> str:
    """The tool, as the agent runs it: a result, or a message starting with 'Error' (which trainwire's
    automatic intermediate rewards recognise as a failed tool call)."""
    try:
        value = safe_eval(expression)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError) as exc:
        return f"Error: {exc}"
    return str(int(value) if float(value).is_integer() else round(value, 6))


def make_task(rng: random.Random) -> tuple[str, str, int]:
    """(task id, question, true answer). Small integer expressions a tiny model can learn to delegate."""
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
    op1, op2 = rng.choice("+-*"), rng.choice("+-*")
    expression = f"({a} {op1} {b}) {op2} {c}"
    name = {"+": "p", "-": "m", "*": "x"}  # task ids allow letters, digits and ._:@/+=- only
    question = f"Compute {expression}. Use the calculator tool, then reply with only the final number."
    return f"calc-{a}{name[op1]}{b}{name[op2]}{c}", question, int(safe_eval(expression))


def final_number(text: str | None) -> float | None:
    """The last number in the agent's answer."""
    found = re.findall(r"-?\d+(?:\.\d+)?", (text or "").replace(",", ""))
    return float(found[-1]) if found else None


def score(answer: str | None, truth: int) -> float:
    """The calculator examples' reward: 1 when the answer's last number is the true result, else 0."""
    value = final_number(answer)
    return 1.0 if value is not None and abs(value - truth) < 1e-6 else 0.0


def endpoints(proxy_url: str | None = None) -> tuple[str, str]:
    """(base URL for the OpenAI client, proxy root for rewards). The client uses OPENAI_BASE_URL when set, else
    --proxy-url + /v1; rewards go to --proxy-url, else to OPENAI_BASE_URL without its /v1."""
    base = os.environ.get("OPENAI_BASE_URL") or (
        f"{proxy_url.rstrip('/')}/v1" if proxy_url else "http://localhost:8100/v1"
    )
    base = base.rstrip("/")
    root = proxy_url.rstrip("/") if proxy_url else (base[: -len("/v1")] if base.endswith("/v1") else base)
    return base, root


def context_url(proxy: str, **values: str | None) -> str:
    """trainwire's base URL that says what the headers would (for frameworks that take a base URL but no headers):

        context_url("http://localhost:8100", session="ep-7", task="calc-1", agent="solver")
        -> "http://localhost:8100/tw/session=ep-7/task=calc-1/agent=solver/v1"

    Keys: session, task, agent, train; a '/' inside a value is sent as %2F."""
    parts = [f"{key}={urllib.parse.quote(value, safe='')}" for key, value in values.items() if value is not None]
    return f"{proxy.rstrip('/')}/tw/{'/'.join(parts)}/v1"


def post_reward(proxy: str, session_id: str, reward: float) -> dict:
    """POST /reward with a JSON body, exactly what the curl line above sends. TRAINWIRE_ADMIN_KEY, when the
    proxy was started with --admin-key, goes in the Authorization header."""
    headers = {"content-type": "application/json"}
    if os.environ.get("TRAINWIRE_ADMIN_KEY"):
        headers["authorization"] = f"Bearer {os.environ['TRAINWIRE_ADMIN_KEY']}"
    body = json.dumps({"session_id": session_id, "reward": reward}).encode()
    request = urllib.request.Request(f"{proxy}/reward", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text.strip() else {}

"""The calculator task of `make demo-calc`: questions, the held-out split, the tool, and how an answer is graded.

Standard library only: the agent, the scripted teacher server, the model builder and the tests all import it.

A question asks for the value of an expression with three two-digit operands, e.g. ``What is 37*48+29?``, whose
value has four digits (1000 to 9999), so it cannot be guessed (and a tiny model cannot multiply in its head): the
way to be right is to call the ``calculator`` tool with the expression and report what it returns. Every
expression and every answer has the same length in tokens: that keeps what the model must copy (the expression
into the tool call, the tool's result into the answer) at fixed distances, which a model this small learns in a
few hundred steps.

Questions are split once, by a hash of the expression, into a training pool and a held-out pool (one in
``HELD_OUT_ONE_IN``). The evaluation set is a fixed list drawn from the held-out pool with a fixed seed; no
training episode (teacher or policy) ever asks a held-out question, so evaluation measures the skill on
questions the model never saw.
"""

from __future__ import annotations

import ast
import hashlib
import json
import operator
import random
import re
from dataclasses import dataclass

SYSTEM_PROMPT = "Use the calculator."
TOOL_NAME = "calculator"
TOOL = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}
# The shapes of the expressions, each with three two-digit operands (10..99); only those worth 1000..9999.
FORMS = ("{a}*{b}+{c}", "{a}*{b}-{c}", "{a}+{b}*{c}")
PHRASES = ("What is {e}?", "Compute {e}.", "Calculate {e}.")
HELD_OUT_ONE_IN = 8


@dataclass(frozen=True)
class Question:
    expression: str
    text: str
    answer: int

    @property
    def id(self) -> str:
        return hashlib.sha256(self.expression.encode()).hexdigest()[:12]

    def messages(self) -> list[dict]:
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": self.text}]


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts`` (the same on every machine and Python)."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(expression: str) -> bool:
    return int(hashlib.sha256(("split:" + expression).encode()).hexdigest(), 16) % HELD_OUT_ONE_IN == 0


def _draw(rng: random.Random) -> Question:
    while True:
        form = rng.choice(FORMS)
        a, b, c = (rng.randint(10, 99) for _ in range(3))
        expression = form.format(a=a, b=b, c=c)
        answer = calculate(expression)
        if 1000 <= answer <= 9999:
            return Question(expression=expression, text=rng.choice(PHRASES).format(e=expression), answer=answer)


def questions(n: int, *, held_out: bool, seed: int) -> list[Question]:
    """``n`` distinct questions of the held-out pool or of the training pool, drawn with ``seed``."""
    rng = random.Random(f"calc:{seed}:{held_out}")
    out: list[Question] = []
    seen: set[str] = set()
    while len(out) < n:
        q = _draw(rng)
        if is_held_out(q.expression) == held_out and q.expression not in seen:
            seen.add(q.expression)
            out.append(q)
    return out


def eval_set(n: int) -> list[Question]:
    """The fixed held-out evaluation questions (the first ``n`` of one fixed draw)."""
    return questions(n, held_out=True, seed=0)


# ------------------------------------------------------------------------------------------------ the tool

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculate(expression: str) -> int:
    """The value of an expression of integers, ``+``, ``-``, ``*`` and parentheses; ValueError otherwise."""
    if not isinstance(expression, str) or len(expression) > 64:
        raise ValueError("expression must be a short string")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"unsupported expression {expression!r}")

    return value(tree)


def run_tool(name: str | None, arguments: str | None) -> tuple[str, bool]:
    """What the agent sends back for a tool call, and whether the call was valid (the calculator, a JSON object
    with a string ``expression`` it can evaluate). An invalid call gets an ``Error: ...`` answer, which the proxy's
    ``--air-tool-error`` rule penalises."""
    if name != TOOL_NAME:
        return f"Error: unknown tool {name!r}", False
    try:
        args = json.loads(arguments or "")
    except ValueError:
        return "Error: arguments are not JSON", False
    if not isinstance(args, dict) or not isinstance(args.get("expression"), str):
        return 'Error: expected {"expression": "..."}', False
    try:
        return str(calculate(args["expression"])), True
    except ValueError as exc:
        return f"Error: {exc}", False


_LAST_INT = re.compile(r"-?\d+")


def final_number(text: str | None) -> int | None:
    """The number an answer gives: the last integer in it, or None."""
    found = _LAST_INT.findall(text or "")
    return int(found[-1]) if found else None


def is_correct(question: Question, answer_text: str | None) -> bool:
    return final_number(answer_text) == question.answer


def estimate(answer: int) -> int:
    """The teacher's answer when it does not use the tool: the value rounded to tens (right one time in ten)."""
    return int(round(answer, -1))


def teacher_uses_tool(question_text: str, *, direct_share: float, seed: int = 0) -> bool:
    """Whether the scripted teacher calls the calculator for this question: a fixed share ``direct_share`` of
    questions (by a seeded hash of the question) it answers directly, with an estimate."""
    return _unit("teacher", seed, question_text) >= direct_share

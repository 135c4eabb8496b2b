"""The scripted teacher of `make demo-calc`: a small OpenAI-compatible chat server that is good but not perfect.

It stands for a bigger model an agent already runs on. trainwire reaches it through a frozen route (litellm,
``--routes-file`` with ``teacher: {model: openai/teacher, api_base: http://127.0.0.1:PORT/v1}``), records its calls
like any other, and ``trainwire train --objective sft --sft-from teacher`` distills them into the policy.

How it answers a chat request (deterministic: the same question always gets the same answer):

* the last message is a **tool result**: it answers with that result (the calculator's value);
* the last message is a **question** and the request offers tools: for most questions it calls
  ``calculator`` with the question's expression (a correct tool call); for a fixed share of them
  (``--direct-share``, chosen per question by a seeded hash) it answers at once with an estimate, the value
  rounded to tens, which is right one time in ten. That is what RL later fixes: the student copies the teacher,
  skipping the tool sometimes, until the correctness reward teaches it that the tool pays.

Both ``stream: true`` (SSE chunks, as OpenAI sends them) and plain JSON answers; ``GET /v1/models``. Standard
library only.

    python -m demo.teacher_server --port 8300 [--direct-share 0.3] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from demo import calc_task  # noqa: E402

MODEL = "teacher"
_EXPRESSION = re.compile(r"[0-9][0-9+\-*() ]*[0-9)]")


def _text(content) -> str:
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def answer(body: dict, *, direct_share: float, seed: int) -> tuple[dict, str]:
    """The assistant message for a chat request, and its finish reason."""
    messages = body.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    if last.get("role") == "tool":
        result = _text(last.get("content")).strip()
        text = result if not result.startswith("Error") else "I cannot compute that."
        return {"role": "assistant", "content": text}, "stop"
    question = next(
        (_text(m.get("content")) for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), ""
    )
    found = _EXPRESSION.findall(question)
    if not found:
        return {"role": "assistant", "content": "Please ask me an arithmetic question."}, "stop"
    expression = max(found, key=len).strip()
    try:
        value = calc_task.calculate(expression)
    except ValueError:
        return {"role": "assistant", "content": "I cannot compute that."}, "stop"
    if body.get("tools") and calc_task.teacher_uses_tool(question, direct_share=direct_share, seed=seed):
        call = {
            "id": f"call_{uuid.uuid4().hex[:12]}",
            "type": "function",
            "function": {"name": calc_task.TOOL_NAME, "arguments": json.dumps({"expression": expression})},
        }
        return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    return {"role": "assistant", "content": str(calc_task.estimate(value))}, "stop"


class _Handler(BaseHTTPRequestHandler):
    server_version = "teacher/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the proxy records every call
        pass

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "demo"}]})
        else:
            self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
            return
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._json(404, {"error": {"message": "only chat completions", "type": "invalid_request_error"}})
            return
        opts = self.server.options  # type: ignore[attr-defined]
        message, finish = answer(body, direct_share=opts["direct_share"], seed=opts["seed"])
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time())
        words = len(json.dumps(message)) // 4
        usage = {
            "prompt_tokens": sum(len(json.dumps(m)) for m in body.get("messages") or []) // 4,
            "completion_tokens": words,
            "total_tokens": 0,
        }
        usage["total_tokens"] = usage["prompt_tokens"] + words
        if not body.get("stream"):
            self._json(
                200,
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": MODEL,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
                },
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

        def chunk(delta: dict, finish_reason: str | None = None, **extra) -> None:
            payload = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": MODEL,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                **extra,
            }
            self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

        chunk({"role": "assistant", "content": ""})
        if message.get("tool_calls"):
            for i, tc in enumerate(message["tool_calls"]):
                chunk({"tool_calls": [{"index": i, **tc}]})
        else:
            chunk({"content": message["content"]})
        chunk({}, finish)
        if (body.get("stream_options") or {}).get("include_usage"):
            payload = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": MODEL,
                "choices": [],
                "usage": usage,
            }
            self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


def serve(port: int, *, host: str = "127.0.0.1", direct_share: float = 0.3, seed: int = 0) -> ThreadingHTTPServer:
    """Start the server in a background thread; ``shutdown()`` stops it."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    server.options = {"direct_share": direct_share, "seed": seed}  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, name="teacher", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8300)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--direct-share", type=float, default=0.3, help="share of questions answered without the tool, with an estimate"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    server = serve(args.port, host=args.host, direct_share=args.direct_share, seed=args.seed)
    print(
        f"teacher ready on http://{args.host}:{server.server_address[1]}/v1 (answers "
        f"{args.direct_share:.0%} of questions without the tool)",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

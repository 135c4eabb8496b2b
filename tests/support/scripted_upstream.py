"""A scripted stand-in for vLLM's OpenAI server, for protocol edge cases and exact byte comparison.

It answers in vLLM's shapes (token ids, logprobs and usage only when asked), remembers every request it got
and every byte it sent, and can be told what to answer next (text, tool calls, an error, a slow stream)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from tests.support.ports import free_port


@dataclass
class Script:
    text: str = "Hello there, friend."
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    status: int = 200
    error_body: dict[str, Any] | None = None
    delay_per_chunk: float = 0.0
    chunks: int | None = None  # how many content chunks a stream uses (default: one per token)
    delay: float = 0.0  # seconds to wait before answering at all
    linger_after_done: float = 0.0  # seconds a stream stays open after its [DONE]


@dataclass
class Sent:
    request: dict[str, Any]
    path: str
    headers: dict[str, str]
    body: bytes = b""


class ScriptedUpstream:
    def __init__(self, model: str = "base-model") -> None:
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.scripts: list[Script] = []
        self.sent: list[Sent] = []
        self.adapters: list[str] = []
        self.loads: list[tuple[str, str]] = []  # (adapter name, sha256 of its weights), every load
        self.load_requests = 0
        self.hold_loads = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.aborted = 0
        # Optional: decides the answer from the request when no queued script is left (an agent's "model").
        self.responder: Callable[[dict[str, Any]], Script] | None = None

    # --- control ---------------------------------------------------------------------------------
    def script(self, **kw) -> None:
        self.scripts.append(Script(**kw))

    def _next(self, req: dict[str, Any] | None = None) -> Script:
        if self.scripts:
            return self.scripts.pop(0)
        if self.responder is not None and req is not None:
            return self.responder(req)
        return Script()

    # --- responses -------------------------------------------------------------------------------
    @staticmethod
    def tokenize(text: str) -> list[int]:
        return [ord(c) % 500 + 3 for c in text]

    def _prompt_ids(self, req: dict[str, Any]) -> list[int]:
        if "messages" in req:
            text = "".join(str(m.get("content") or "") for m in req["messages"])
        else:
            text = str(req.get("prompt", ""))
        return self.tokenize(text)

    def _pieces(self, text: str) -> list[str]:
        return [text[i : i + 3] for i in range(0, len(text), 3)] or [""]

    def _logprob(self, i: int) -> float:
        return -0.125 * ((i % 7) + 1)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        req = await request.json()
        sent = Sent(request=req, path=request.path, headers=dict(request.headers))
        self.sent.append(sent)
        sc = self._next(req)
        if sc.delay:
            await asyncio.sleep(sc.delay)
        if sc.status != 200:
            body = orjson.dumps(
                sc.error_body
                or {
                    "object": "error",
                    "message": "scripted failure",
                    "type": "BadRequestError",
                    "param": None,
                    "code": sc.status,
                }
            )
            sent.body = body
            return web.Response(body=body, status=sc.status, content_type="application/json")
        if req.get("model") not in [self.model, *self.adapters]:
            body = orjson.dumps(
                {
                    "object": "error",
                    "message": f"The model `{req.get('model')}` does not exist.",
                    "type": "NotFoundError",
                    "param": None,
                    "code": 404,
                }
            )
            sent.body = body
            return web.Response(body=body, status=404, content_type="application/json")
        if req.get("stream"):
            return await self._stream(request, req, sc, kind, sent)
        body = orjson.dumps(self._full(req, sc, kind))
        sent.body = body
        return web.Response(body=body, content_type="application/json")

    def _full(self, req, sc: Script, kind: str) -> dict[str, Any]:
        pieces = self._pieces(sc.text)
        ids = [t for p in pieces for t in self.tokenize(p)]
        choice: dict[str, Any] = {"index": 0}
        if kind == "chat":
            msg: dict[str, Any] = {
                "role": "assistant",
                "content": sc.text if not sc.tool_calls else None,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": [
                    {"id": f"chatcmpl-tool-{i}", "type": "function", "function": tc}
                    for i, tc in enumerate(sc.tool_calls or [])
                ],
                "reasoning_content": None,
            }
            choice["message"] = msg
            choice["logprobs"] = (
                {
                    "content": [
                        {"token": f"t{t}", "logprob": self._logprob(i), "bytes": [t], "top_logprobs": []}
                        for i, t in enumerate(ids)
                    ]
                }
                if req.get("logprobs")
                else None
            )
        else:
            choice["text"] = sc.text
            choice["logprobs"] = (
                {
                    "text_offset": list(range(len(ids))),
                    "token_logprobs": [self._logprob(i) for i in range(len(ids))],
                    "tokens": [f"t{t}" for t in ids],
                    "top_logprobs": [{f"t{t}": self._logprob(i)} for i, t in enumerate(ids)],
                }
                if req.get("logprobs") is not None
                else None
            )
        choice["finish_reason"] = sc.finish_reason or ("tool_calls" if sc.tool_calls else "stop")
        choice["stop_reason"] = None
        if req.get("return_token_ids"):
            choice["token_ids"] = ids
            if kind == "completion":
                choice["prompt_token_ids"] = self._prompt_ids(req)
        prompt = self._prompt_ids(req)
        body: dict[str, Any] = {
            "id": "chatcmpl-123" if kind == "chat" else "cmpl-123",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": 1700000000,
            "model": req["model"],
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": {
                "prompt_tokens": len(prompt),
                "total_tokens": len(prompt) + len(ids),
                "completion_tokens": len(ids),
                "prompt_tokens_details": None,
            },
            "prompt_logprobs": None,
        }
        if req.get("return_token_ids") and kind == "chat":
            body["prompt_token_ids"] = prompt
        return body

    async def _stream(self, request, req, sc: Script, kind: str, sent: Sent) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        want_ids = bool(req.get("return_token_ids"))
        want_lp = bool(req.get("logprobs")) if kind == "chat" else req.get("logprobs") is not None
        want_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": "chatcmpl-123" if kind == "chat" else "cmpl-123",
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": 1700000000,
            "model": req["model"],
        }
        events: list[dict[str, Any]] = []
        prompt = self._prompt_ids(req)
        if kind == "chat":
            first = {
                **base,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                ],
            }
            if want_ids:
                first["prompt_token_ids"] = prompt
            events.append(first)
        pieces = self._pieces(sc.text) if not sc.tool_calls else []
        n = 0
        for piece in pieces:
            ids = self.tokenize(piece)
            choice: dict[str, Any] = {"index": 0}
            if kind == "chat":
                choice["delta"] = {"content": piece}
                choice["logprobs"] = (
                    {
                        "content": [
                            {"token": f"t{t}", "logprob": self._logprob(n + j), "bytes": [t], "top_logprobs": []}
                            for j, t in enumerate(ids)
                        ]
                    }
                    if want_lp
                    else None
                )
            else:
                choice["text"] = piece
                choice["logprobs"] = (
                    {
                        "text_offset": [n + j for j in range(len(ids))],
                        "token_logprobs": [self._logprob(n + j) for j in range(len(ids))],
                        "tokens": [f"t{t}" for t in ids],
                        "top_logprobs": [{f"t{t}": self._logprob(n + j)} for j, t in enumerate(ids)],
                    }
                    if want_lp
                    else None
                )
            choice["finish_reason"] = None
            if want_ids:
                choice["token_ids"] = ids
                if kind == "completion" and n == 0:
                    choice["prompt_token_ids"] = prompt
            n += len(ids)
            events.append({**base, "choices": [choice]})
        for i, tc in enumerate(sc.tool_calls or []):
            args = tc.get("arguments", "")
            halves = [args[: len(args) // 2], args[len(args) // 2 :]]
            ids = self.tokenize(tc["name"] + args)
            events.append(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {
                                "tool_calls": [
                                    {
                                        "id": f"chatcmpl-tool-{i}",
                                        "type": "function",
                                        "index": i,
                                        "function": {"name": tc["name"], "arguments": halves[0]},
                                    }
                                ]
                            },
                            "logprobs": {
                                "content": [
                                    {"token": f"t{t}", "logprob": -0.5, "bytes": [t], "top_logprobs": []} for t in ids
                                ]
                            }
                            if want_lp
                            else None,
                            "finish_reason": None,
                            **({"token_ids": ids} if want_ids else {}),
                        }
                    ],
                }
            )
            events.append(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"tool_calls": [{"index": i, "function": {"arguments": halves[1]}}]},
                            "logprobs": None,
                            "finish_reason": None,
                            **({"token_ids": []} if want_ids else {}),
                        }
                    ],
                }
            )
            n += len(ids)
        last: dict[str, Any] = {
            "index": 0,
            "finish_reason": sc.finish_reason or ("tool_calls" if sc.tool_calls else "stop"),
            "stop_reason": None,
        }
        if kind == "chat":
            last = {"index": 0, "delta": {"content": ""}, "logprobs": None, **last}
        else:
            last = {"index": 0, "text": "", "logprobs": None, **last}
        if want_ids:
            last["token_ids"] = []
        events.append({**base, "choices": [last]})
        if want_usage:
            events.append(
                {
                    **base,
                    "choices": [],
                    "usage": {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + n, "completion_tokens": n},
                }
            )
        out = []
        try:
            for ev in events:
                data = b"data: " + orjson.dumps(ev) + b"\n\n"
                out.append(data)
                await resp.write(data)
                if sc.delay_per_chunk:
                    await asyncio.sleep(sc.delay_per_chunk)
            out.append(b"data: [DONE]\n\n")
            await resp.write(b"data: [DONE]\n\n")
            if sc.linger_after_done:
                await asyncio.sleep(sc.linger_after_done)
        except (ConnectionResetError, asyncio.CancelledError):
            self.aborted += 1
            raise
        finally:
            sent.body = b"".join(out)
        await resp.write_eof()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": self.model, "object": "model", "created": 1, "owned_by": "vllm", "root": self.model, "parent": None}
        ]
        data += [
            {
                "id": a,
                "object": "model",
                "created": 1,
                "owned_by": "vllm",
                "root": f"/adapters/{a}",
                "parent": self.model,
            }
            for a in self.adapters
        ]
        return web.json_response({"object": "list", "data": data})

    async def load_lora(self, request: web.Request) -> web.Response:
        """vLLM's runtime LoRA loading: remembers (name, sha256 of the adapter's weights) of every load; while
        `hold_loads` is set, a load waits (a test kills the trainer in the middle of its publish)."""
        import hashlib
        from pathlib import Path

        req = await request.json()
        self.load_requests += 1
        while self.hold_loads.is_set():
            await asyncio.sleep(0.05)
        name = req["lora_name"]
        if name in self.adapters:
            return web.Response(status=400, text=f"The lora adapter '{name}' has already been loaded.")
        weights = Path(req["lora_path"]) / "adapter_model.safetensors"
        self.loads.append((name, hashlib.sha256(weights.read_bytes()).hexdigest()))
        self.adapters.append(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        name = (await request.json())["lora_name"]
        if name not in self.adapters:
            return web.Response(status=404, text=f"The lora adapter '{name}' cannot be found.")
        self.adapters.remove(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def tokenize_route(self, request: web.Request) -> web.Response:
        req = await request.json()
        self.sent.append(Sent(request=req, path=request.path, headers=dict(request.headers)))
        toks = self.tokenize(req.get("prompt", ""))
        return web.json_response({"count": len(toks), "max_model_len": 1024, "tokens": toks})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "ScriptedUpstream":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self.chat)
            app.router.add_post("/v1/completions", self.completions)
            app.router.add_get("/v1/models", self.models)
            app.router.add_post("/tokenize", self.tokenize_route)
            app.router.add_post("/v1/load_lora_adapter", self.load_lora)
            app.router.add_post("/v1/unload_lora_adapter", self.unload_lora)
            app.router.add_get("/health", self.health)
            self._runner = web.AppRunner(app, shutdown_timeout=0.2)
            self._loop.run_until_complete(self._runner.setup())
            self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop and self._runner:
            fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            try:
                fut.result(3)
            except Exception:
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(5)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.time() + timeout
        while len(self.sent) < n and time.time() < deadline:
            time.sleep(0.01)

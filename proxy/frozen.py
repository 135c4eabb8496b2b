"""Frozen agents: requests for a model that is not the policy go through litellm's router to the provider
configured for that name, are recorded like policy calls (route 'frozen', never trainable) and never trained on.

Routes come from `--model-route NAME=litellm-model-string` (repeatable) and/or a YAML file (`--routes-file`):

    checker: openai/gpt-4o-mini                      # a litellm model string
    judge:                                           # or litellm params
      model: hosted_vllm/Qwen/Qwen3-8B
      api_base: http://judge-vllm:8000/v1
      api_key: os.environ/JUDGE_KEY                  # litellm resolves os.environ/NAME itself
    pool: [{model: openai/a, api_base: ...}, {model: openai/b, api_base: ...}]   # several deployments, balanced

A `--model-route` flag replaces a file entry of the same name. Flags carry only the model string; the provider's
address and key then come from litellm's usual environment (OPENAI_BASE_URL, OPENAI_API_KEY, HOSTED_VLLM_API_BASE,
ANTHROPIC_API_KEY...). This module is imported, and litellm with it,
only when routes are configured, so the policy hot path never pays for litellm.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
from starlette.responses import Response

from trainwire.proxy.assemble import StreamAssembler, tokens_of
from trainwire.proxy.errors import TYPES
from trainwire.proxy.forward import RecordedStream
from trainwire.proxy.litellm_json import drop_none

log = logging.getLogger("trainwire.frozen")

# OpenAI request fields handed to litellm as arguments. Everything else a client sends goes to the provider
# as `extra_body`, so a request can never set litellm's own arguments (api_base, api_key, mock_response...).
_OPENAI_PARAMS = frozenset(
    {
        "audio",
        "best_of",
        "echo",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "modalities",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream_options",
        "suffix",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
    }
)
# Fields litellm adds to its response objects that OpenAI's format does not have.
_LITELLM_EXTRAS = ("provider_specific_fields", "citations", "moderation", "obfuscation")


class RouteConfigError(ValueError):
    pass


def parse_routes(model_route: list[str], routes_file: Path | None, policy_model: str) -> dict[str, list[dict]]:
    """NAME -> litellm params of each deployment, in configuration order (file first, then flags)."""
    routes: dict[str, list[dict]] = {}
    if routes_file is not None:
        import yaml

        try:
            data = yaml.safe_load(Path(routes_file).read_text()) or {}
        except OSError as exc:
            raise RouteConfigError(f"routes file {routes_file}: {exc}") from None
        except yaml.YAMLError as exc:
            raise RouteConfigError(f"routes file {routes_file} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise RouteConfigError(f"routes file {routes_file} must map model names to litellm models")
        for name, value in data.items():
            routes[str(name)] = _deployments(str(name), value, f"routes file {routes_file}")
    for spec in model_route:
        name, sep, target = spec.partition("=")
        name, target = name.strip(), target.strip()
        if not sep or not name or not target:
            raise RouteConfigError(
                f"--model-route {spec!r}: expected NAME=litellm-model-string, e.g. checker=openai/gpt-4o-mini"
            )
        routes[name] = _deployments(name, target, "--model-route")
    if policy_model in routes:
        raise RouteConfigError(
            f"model route {policy_model!r} has the policy model's name; "
            f"the policy is always served by the upstream vLLM"
        )
    return routes


def _deployments(name: str, value: Any, where: str) -> list[dict]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str) and item.strip():
            out.append({"model": item.strip()})
        elif isinstance(item, dict) and isinstance(item.get("model"), str) and item["model"].strip():
            out.append(dict(item))
        else:
            raise RouteConfigError(
                f"{where}: route {name!r} must be a litellm model string or a mapping with a 'model' key; got {item!r}"
            )
    if not out:
        raise RouteConfigError(f"{where}: route {name!r} has no deployment")
    return out


class _Once:
    """Hands exactly one record to the write path, whatever path the call ends on."""

    __slots__ = ("submit", "done")

    def __init__(self, submit: Callable[[dict], Any]) -> None:
        self.submit, self.done = submit, False

    def __call__(self, record_factory: Callable[[], dict]) -> None:
        if not self.done:
            self.done = True
            self.submit(record_factory())


class FrozenRoutes:
    def __init__(self, routes: dict[str, list[dict]], timeout_s: float) -> None:
        # No network at import: litellm would otherwise fetch its model price list from GitHub (with retries).
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        litellm.suppress_debug_info = True
        if not log.isEnabledFor(logging.DEBUG):  # litellm logs two INFO lines per call; ours is enough
            for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
                logging.getLogger(name).setLevel(logging.WARNING)
        self.routes = routes
        model_list = [
            {"model_name": name, "litellm_params": params}
            for name, deployments in routes.items()
            for params in deployments
        ]
        # No retries and no cooldowns: retrying a generation can run it twice, and a cooled-down deployment
        # would turn one provider hiccup into minutes of errors for a frozen agent.
        self.router = litellm.Router(model_list=model_list, num_retries=0, disable_cooldowns=True, timeout=timeout_s)
        self._where = {
            name: ", ".join(d.get("api_base") or d["model"] for d in deployments)
            for name, deployments in routes.items()
        }
        log.info(
            "model routes: %s", ", ".join(f"{n} -> {', '.join(d['model'] for d in ds)}" for n, ds in routes.items())
        )

    @classmethod
    def from_settings(cls, settings) -> "FrozenRoutes":
        routes = parse_routes(settings.model_route, settings.routes_file, settings.policy_model)
        return cls(routes, settings.upstream_timeout_s)

    def knows(self, model: str) -> bool:
        return model in self.routes

    def names(self) -> list[str]:
        return list(self.routes)

    # --- serving --------------------------------------------------------------------------------------

    async def serve(self, call, submit) -> Response:
        once = _Once(submit)
        body = call.request
        call.upstream = self._where.get(call.model_requested)
        if call.kind == "chat" and not isinstance(body.get("messages"), list):
            return self._reject(call, once, "'messages' is required and must be a list", "messages")
        if call.kind == "completion" and body.get("prompt") is None:
            return self._reject(call, once, "'prompt' is required", "prompt")
        kwargs: dict[str, Any] = {k: v for k, v in body.items() if k in _OPENAI_PARAMS}
        extra = {
            k: v
            for k, v in body.items()
            if k not in _OPENAI_PARAMS and k not in ("model", "messages", "prompt", "stream")
        }
        if extra:
            kwargs["extra_body"] = extra
        # A parameter the route's provider does not take is dropped, not refused: the OpenAI Agents SDK sends
        # ``verbosity`` and ``reasoning_effort`` on every call, and litellm would answer 400 for any model it does
        # not know to take them (a self-hosted teacher, say). The client's request is recorded as it was sent.
        kwargs["drop_params"] = True
        call.t_sent = time.perf_counter()
        try:
            if call.kind == "chat":
                result = await self.router.acompletion(
                    model=call.model_requested, messages=body["messages"], stream=call.stream, **kwargs
                )
            else:
                result = await self.router.atext_completion(
                    model=call.model_requested, prompt=body["prompt"], stream=call.stream, **kwargs
                )
        except asyncio.CancelledError:
            call.t_upstream_done = time.perf_counter()
            once(
                lambda: call.record(
                    status=499, response=None, aborted=True, error="client disconnected before the provider answered"
                )
            )
            raise
        except Exception as exc:  # noqa: BLE001 - every provider failure becomes an OpenAI-format error
            call.t_upstream_done = time.perf_counter()
            return self._provider_error(call, once, exc)
        if call.stream:
            return self._stream(call, once, result)
        call.t_upstream_done = time.perf_counter()
        try:
            hidden = getattr(result, "_hidden_params", None) or {}
            data = _clean(result.model_dump())
            call.model_served = hidden.get("provider_response_model") or data.get("model")
            data["model"] = call.model_requested
        except Exception as exc:  # noqa: BLE001 - an answer litellm cannot represent is still recorded
            return self._provider_error(call, once, exc)
        once(lambda: call.record(status=200, response=data, tokens=tokens_of(data)))
        return Response(orjson.dumps(data), status_code=200, media_type="application/json", headers=call.headers())

    def _stream(self, call, once: _Once, result) -> Response:
        asm = StreamAssembler(call.kind)
        state: dict[str, Any] = {"completed": False, "error": None}

        def finish() -> None:
            call.t_upstream_done = call.t_upstream_done or time.perf_counter()
            assembled = asm.body()
            if call.model_served is None:
                call.model_served = assembled.get("model")
            assembled["model"] = call.model_requested
            aborted = not state["completed"]
            error = state["error"] or ("client disconnected before the stream ended" if aborted else None)
            once(
                lambda: call.record(
                    status=200,
                    response=assembled,
                    tokens=tokens_of(assembled),
                    aborted=aborted,
                    error=error,
                    usage=assembled.get("usage"),
                )
            )

        async def events() -> AsyncIterator[bytes]:
            try:
                async for chunk in result:
                    now = time.perf_counter()
                    if call.t_first is None:
                        call.t_first = now
                    data = _clean(chunk.model_dump(), delta=True)
                    asm.feed(data)
                    call.model_served = call.model_served or data.get("model")
                    data["model"] = call.model_requested
                    out = b"data: " + orjson.dumps(data) + b"\n\n"
                    call.processing_s += time.perf_counter() - now
                    yield out
                call.t_upstream_done = time.perf_counter()
                state["completed"] = True
                finish()  # journaled before the event that acknowledges the stream leaves
                yield b"data: [DONE]\n\n"
            except Exception as exc:  # noqa: BLE001 - a provider failing mid-stream: tell the client in-band
                call.t_upstream_done = time.perf_counter()
                status, err = _error_of(exc)
                state["error"] = f"provider stream broke ({status}): {err['message']}"
                finish()
                yield b"data: " + orjson.dumps({"error": err}) + b"\n\n"

        async def close() -> None:
            finish()  # the record first: nothing below may keep it from the write path
            aclose = getattr(result, "aclose", None)
            if aclose is not None:
                try:
                    await asyncio.wait_for(aclose(), 2)
                except Exception:  # noqa: BLE001 - closing a dead provider stream must not mask anything
                    pass

        return RecordedStream(events(), close, status_code=200, media_type="text/event-stream", headers=call.headers())

    def _provider_error(self, call, once: _Once, exc: Exception) -> Response:
        status, err = _error_of(exc)
        log.info("frozen route %r failed with %s: %s", call.model_requested, status, err["message"])
        once(lambda: call.record(status=status, response={"error": err}, error=err["message"]))
        return Response(
            orjson.dumps({"error": err}), status_code=status, media_type="application/json", headers=call.headers()
        )

    def _reject(self, call, once: _Once, message: str, param: str) -> Response:
        err = {"message": message, "type": TYPES[400], "param": param, "code": "invalid_value"}
        once(lambda: call.record(status=400, response={"error": err}, error=message))
        return Response(
            orjson.dumps({"error": err}), status_code=400, media_type="application/json", headers=call.headers()
        )


def _clean(obj: dict[str, Any], delta: bool = False) -> dict[str, Any]:
    """litellm's response object as OpenAI would have sent it: no litellm-only fields; in stream deltas only
    the keys that carry something, as OpenAI sends them."""
    for key in _LITELLM_EXTRAS:
        obj.pop(key, None)
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        choice.pop("provider_specific_fields", None)
        if choice.get("reasoning_content") is None:
            choice.pop("reasoning_content", None)
        if "text" in choice and choice["text"] is None:
            choice["text"] = ""  # litellm's last completions chunk; OpenAI's text is always a string
        for key in ("delta", "message"):
            msg = choice.get(key)
            if isinstance(msg, dict):
                msg.pop("provider_specific_fields", None)
                if key == "delta" and delta:
                    choice[key] = drop_none(msg)
    return obj


def _error_of(exc: Exception) -> tuple[int, dict[str, Any]]:
    """The provider's status and OpenAI-format error. Without a provider answer: 504 on a timeout, 502 when the
    provider could not be reached, litellm's own status (e.g. 400 for a parameter it refuses) otherwise."""
    provider_status = getattr(exc, "provider_status_code", None)
    status = getattr(exc, "status_code", None)
    timeout = isinstance(exc, asyncio.TimeoutError) or any(
        c.__name__ in ("Timeout", "APITimeoutError") for c in type(exc).__mro__
    )
    if isinstance(provider_status, int) and provider_status >= 400:
        status = provider_status
    elif timeout:
        status = 504
    elif not isinstance(status, int) or status < 400 or status >= 500:
        status = 502
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if isinstance(body, dict) and body.get("message"):
        message = str(body["message"])
        param, code, etype = body.get("param"), body.get("code"), body.get("type")
    else:
        message = str(getattr(exc, "message", None) or exc).split("\n\nLiteLLM:")[0].strip()
        message = re.sub(r"^(?:(?:litellm\.)?[A-Za-z]+(?:Error|Exception): )+", "", message)
        param, code, etype = None, None, None
        if status == 502:
            code = "upstream_unavailable"
        elif status == 504:
            code = "upstream_timeout"
    if not (isinstance(etype, str) and etype.islower() and etype.endswith("_error")):
        etype = TYPES.get(status, "api_error")  # vLLM's "BadRequestError" and the like: OpenAI's names instead
    return status, {
        "message": message or "provider error",
        "type": etype,
        "param": param,
        "code": code if isinstance(code, (str, type(None))) else str(code),
    }

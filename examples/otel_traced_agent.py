"""An agent that already traces itself with OpenTelemetry, pointed at trainwire and at its own collector.

The agent code is ordinary OpenInference-instrumented code: the OpenAI SDK instrumented by
`openinference-instrumentation-openai`, and its tools declared with OpenInference's `@tracer.tool` (a raised
exception makes the tool span's status ERROR). Its HTTP requests carry the W3C `traceparent` of the current span,
so trainwire's span of each call lands inside this trace and trainwire can tell which session a tool span belongs
to: `opentelemetry-instrumentation-httpx` does that for clients on httpx, but the openai SDK installed here sends
through `httpx2`, which it does not patch, so a one-line request hook injects the context (`_traceparent`). The
only trainwire-specific lines are the endpoints: the base URL, and one more span exporter, to trainwire's
`/v1/traces`, beside the collector the team already runs (`--collector`, e.g. Phoenix at http://localhost:6006).
trainwire turns each failed tool span into an automatic reward on the call that asked for the tool
(`--air-tool-span-error`).

Each episode: one model turn that should produce the tool's arguments, the tool, a second model turn with the
tool's result. Episodes alternate between a `calculator` tool that parses its arguments as a JSON object (it fails
on anything else) and a `clock` tool that cannot fail. One JSON line per episode on stdout.

    trainwire serve --upstream http://localhost:8000 --otlp-endpoint http://localhost:6006 &
    python examples/otel_traced_agent.py --proxy http://localhost:8100 --collector http://localhost:6006
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

import httpx
from openai import DefaultHttpxClient, OpenAI
from openinference.instrumentation import OITracer, TraceConfig
from openinference.instrumentation.openai import OpenAIInstrumentor
from opentelemetry import propagate
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

SYSTEM = "Reply with the calculator's arguments as a JSON object, nothing else."


def tracing(proxy: str, collector: str | None, api_key: str | None) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "otel-traced-agent"}))
    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    # trainwire: the tool spans become training signal (it keeps only those)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{proxy}/v1/traces", headers=headers)))
    if collector:  # and the team's own collector gets everything, as before
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{collector}/v1/traces")))
    OpenAIInstrumentor().instrument(tracer_provider=provider)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    return provider


def _traceparent(request) -> None:
    propagate.inject(request.headers)  # W3C trace context of the current span on every request


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxy", default="http://localhost:8100")
    ap.add_argument("--collector", default=None, help="the team's own OTLP/HTTP collector (base URL)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default="policy")
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--task", default="otel-calc")
    args = ap.parse_args()

    provider = tracing(args.proxy, args.collector, args.api_key)
    tracer = OITracer(provider.get_tracer("otel_traced_agent"), config=TraceConfig())

    @tracer.tool(name="calculator", description="Evaluate a JSON object of arguments")
    def calculator(arguments: str) -> str:
        parsed = json.loads(arguments)  # the model's text: anything but a JSON object fails, as with real tools
        if not isinstance(parsed, dict):
            raise TypeError(f"arguments must be a JSON object, not {type(parsed).__name__}")
        return str(sorted(parsed))

    @tracer.tool(name="clock", description="The current time")
    def clock(arguments: str) -> str:
        return time.strftime("%H:%M:%S")

    client = OpenAI(
        base_url=f"{args.proxy}/v1",
        api_key=args.api_key or "unused",
        max_retries=0,
        timeout=120,
        http_client=DefaultHttpxClient(event_hooks={"request": [_traceparent]}),
    )
    for i in range(args.episodes):
        session = f"otel-{uuid.uuid4().hex[:12]}"
        headers = {"X-Session-Id": session, "X-Task-Id": args.task}
        tool = calculator if i % 2 == 0 else clock
        with tracer.start_as_current_span("invoke_agent solver", openinference_span_kind="agent") as agent:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Add {i} and {i + 1}."}]
            first = client.chat.completions.create(
                model=args.model, messages=messages, max_tokens=args.max_tokens, extra_headers=headers
            )
            text = first.choices[0].message.content or ""
            try:
                result, ok = tool(text), True
            except Exception as exc:  # the span already says ERROR; the agent carries on, as agents do
                result, ok = f"Error: {exc}", False
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"Tool result: {result}"}]
            second = client.chat.completions.create(
                model=args.model, messages=messages, max_tokens=args.max_tokens, extra_headers=headers
            )
            trace_id = f"{agent.get_span_context().trace_id:032x}"
        httpx.post(
            f"{args.proxy}/reward",
            json={"session_id": session, "reward": 1.0 if ok else 0.0},
            headers={"authorization": f"Bearer {args.api_key}"} if args.api_key else None,
            timeout=30,
        ).raise_for_status()
        print(
            json.dumps(
                {
                    "session": session,
                    "tool": tool.__name__,
                    "tool_ok": ok,
                    "trace_id": trace_id,
                    "response_ids": [first.id, second.id],
                }
            ),
            flush=True,
        )
    provider.shutdown()  # flushes both exporters


if __name__ == "__main__":
    main()

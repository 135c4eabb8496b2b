"""The calculator agent of `make demo-real`, written with the OpenAI Agents SDK and unchanged but for its base URL.

It is the agent a team would write for the task of :mod:`demo.calc_task` (``What is 37*48+29?``): an ``Agent``
with the instructions ``Use the calculator.`` and one ``@function_tool``, ``calculator``, run by ``Runner.run`` on
the SDK's Chat Completions model (``set_default_openai_api("chat_completions")``, what an agent on a self-hosted
vLLM uses). The SDK reads ``OPENAI_BASE_URL`` like any OpenAI client; that variable, pointed at trainwire, is the
only thing that ties it to us. Per episode the run config adds trainwire's session headers (``X-Session-Id``,
``X-Task-Id`` for a GRPO group, ``X-Trainwire-Train: false`` for evaluations) through ``ModelSettings
.extra_headers``, and the episode's reward (1 if the final answer's last number is right, else 0) is posted to
``/reward`` like curl would.

What the SDK does with a bad tool call is what the episode records: a call to an unknown tool or with arguments
that are not JSON ends the run (``ModelBehaviorError``), a calculator that cannot evaluate its expression answers
``Error: ...`` (which the proxy's ``--air-tool-error`` rule penalises), and a ``<tool_call>`` that vLLM's parser
could not read stays in the text of the final answer. ``--max-turns`` bounds the model calls (``MaxTurnsExceeded``
ends the episode, wrong).

The command line, the loop and the episode log are those of :mod:`demo.calc_agent`::

    export OPENAI_BASE_URL=http://127.0.0.1:8120/v1 OPENAI_API_KEY=unused
    python -m demo.real_agent --phase eval-base --model policy --eval 200 --log eval.jsonl
    python -m demo.real_agent --phase rl --model policy --duration 600 --group-size 4 --log rl.jsonl
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from demo import calc_agent, calc_task  # noqa: E402


def base_url() -> SimpleNamespace:
    """What the shared loop needs of a client: the base URL (the proxy's root is derived from it)."""
    return SimpleNamespace(base_url=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))


def build_agent(tool_log: list[bool]):
    """The agent as its author writes it; ``tool_log`` gets one entry per calculator run (whether it was valid)."""
    from agents import Agent, function_tool

    @function_tool
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression."""
        result, valid = calc_task.run_tool(calc_task.TOOL_NAME, json.dumps({"expression": expression}))
        tool_log.append(valid)
        return result

    return Agent(name="calculator", instructions=calc_task.SYSTEM_PROMPT, tools=[calculator])


async def _run(q: calc_task.Question, *, model: str, headers: dict, args, episode: dict) -> None:
    import httpx
    from agents import MaxTurnsExceeded, ModelBehaviorError, ModelSettings, RunConfig, Runner
    from agents.items import ToolCallItem
    from openai import APIConnectionError, APIStatusError, AsyncOpenAI

    async def seen(response: httpx.Response) -> None:  # the policy version that served each model call
        if response.request.url.path.endswith("/chat/completions"):
            episode["turns"] += 1
            episode["versions"].append(int(response.headers.get("x-policy-version", "0")))

    http = httpx.AsyncClient(timeout=120, event_hooks={"response": [seen]})
    client = AsyncOpenAI(max_retries=0, http_client=http)  # OPENAI_BASE_URL / OPENAI_API_KEY from the environment
    tool_log: list[bool] = []
    try:
        from agents import OpenAIChatCompletionsModel

        agent = build_agent(tool_log)
        agent.model = OpenAIChatCompletionsModel(model=model, openai_client=client)
        config = RunConfig(
            model_settings=ModelSettings(
                temperature=args.temperature, max_tokens=args.max_tokens, extra_headers=headers
            ),
            tracing_disabled=True,
        )
        result = await Runner.run(agent, q.text, max_turns=args.max_turns, run_config=config)
        calls = sum(isinstance(item, ToolCallItem) for item in result.new_items)
        text = str(result.final_output or "")
        episode["answer"] = text
        episode["attempts"] += calls + int("<tool_call>" in text)
    except (MaxTurnsExceeded, ModelBehaviorError) as exc:
        # The model's doing: too many calls, or a tool call the SDK could not run. A wrong answer, not a failure.
        episode["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        episode["attempts"] += max(1, len(tool_log))
    except (APIStatusError, APIConnectionError) as exc:
        episode.update(ok=False, error=str(exc)[:300])
    finally:
        await http.aclose()
    episode["valid"] += sum(tool_log)
    episode["attempts"] = max(episode["attempts"], len(tool_log))


def run_episode(client, q: calc_task.Question, *, phase: str, model: str, train: bool, task_id: str | None, args):
    """One episode, one trainwire session (``client`` only carries the base URL: each episode builds its own)."""
    episode, headers = calc_agent.open_episode(
        q, prefix="real", agent="calculator-agents-sdk", phase=phase, model=model, train=train, task_id=task_id
    )
    asyncio.run(_run(q, model=model, headers=headers, args=args, episode=episode))
    return calc_agent.close_episode(episode, q, train=train, args=args)


def main(argv: list[str] | None = None) -> int:
    from agents import set_default_openai_api, set_tracing_disabled

    set_default_openai_api("chat_completions")
    set_tracing_disabled(True)  # the SDK would export its traces to OpenAI's platform otherwise
    return calc_agent.main(argv, episode=run_episode, make_client=base_url, name="calculator (OpenAI Agents SDK)")


if __name__ == "__main__":
    sys.exit(main())

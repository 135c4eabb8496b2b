"""The calculator agent in the OpenAI Agents SDK (`openai-agents`), trained through trainwire.

Stock Agents SDK code: an `Agent` with a `function_tool`, run by `Runner`, on the Chat Completions model. The only
trainwire-specific parts are the client's `base_url` (the proxy) and `default_headers` (the episode's session
and task ids), plus posting the reward when the episode ends. Tracing is off: it would upload to OpenAI.

    trainwire serve --upstream http://localhost:8000 &
    export OPENAI_BASE_URL=http://localhost:8100/v1
    python examples/agents_sdk_agent.py --episodes 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import uuid

import common
from agents import (
    Agent,
    MaxTurnsExceeded,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from common import endpoints, make_task, post_reward, score
from openai import AsyncOpenAI

set_tracing_disabled(True)


@function_tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '(12 + 7) * 3' and return the result."""
    return common.calculator(expression)


async def run_episode(base_url: str, args, task_id: str, question: str) -> tuple[str, str | None]:
    session_id = f"oa-{uuid.uuid4().hex[:12]}"
    client = AsyncOpenAI(
        base_url=base_url,
        api_key=os.environ.get("OPENAI_API_KEY", "unused"),
        default_headers={"X-Session-Id": session_id, "X-Task-Id": task_id},
    )  # trainwire: the episode
    agent = Agent(
        name="calculator",
        instructions="Use the calculator tool for arithmetic.",
        tools=[calculator],
        model=OpenAIChatCompletionsModel(model=args.model, openai_client=client),
        model_settings=ModelSettings(temperature=1.0, max_tokens=256),
    )
    try:
        result = await Runner.run(agent, question, max_turns=args.max_turns)
        return session_id, str(result.final_output)
    except MaxTurnsExceeded:  # no answer within --max-turns: reward 0
        return session_id, None
    finally:
        await client.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--proxy-url", help="trainwire's URL (default: OPENAI_BASE_URL without /v1)")
    parser.add_argument("--model", default="policy")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base_url, proxy = endpoints(args.proxy_url)
    rng = random.Random(args.seed)
    for episode in range(args.episodes):
        task_id, question, truth = make_task(rng)
        session_id, answer = await run_episode(base_url, args, task_id, question)
        reward = score(answer, truth)
        post_reward(proxy, session_id, reward)
        print(f"episode {episode}: {session_id} answer {answer!r} truth {truth} reward {reward}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())

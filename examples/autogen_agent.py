"""The calculator agent in AutoGen AgentChat (`autogen-agentchat`, `autogen-ext[openai]` 0.7), trained through trainwire.

Stock AgentChat: an `AssistantAgent` with a Python function as its tool, on `OpenAIChatCompletionClient`. The only
trainwire-specific part is the client's `base_url`: the proxy's /tw/ form names the episode's session, task and
agent in the URL. AutoGen needs `model_info` for a model name it does not know ("policy"). After a tool call the
agent reflects on the result (a second model call) to give its answer. The reward is posted when the episode ends.

AutoGen pins protobuf 5.x, which the training extra's tensorboard does not accept, so it runs from its own venv:

    examples/setup_frameworks_venv.sh             # once: ~/.cache/trainwire/frameworks-venv
    trainwire serve --upstream http://localhost:8000 &
    export OPENAI_BASE_URL=http://localhost:8100/v1
    ~/.cache/trainwire/frameworks-venv/bin/python examples/autogen_agent.py --episodes 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import uuid

import common
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import TextMessage
from autogen_ext.models.openai import OpenAIChatCompletionClient
from common import context_url, endpoints, make_task, post_reward, score

SYSTEM = "Use the calculator tool for arithmetic, then reply with only the final number."
# What AutoGen must be told about a model it has no entry for.
MODEL_INFO = {
    "vision": False,
    "function_calling": True,
    "json_output": False,
    "family": "unknown",
    "structured_output": False,
}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '(12 + 7) * 3' and return the result."""
    return common.calculator(expression)


async def run_episode(base_url: str, args, task_id: str, question: str) -> tuple[str, str | None]:
    session_id = f"ag-{uuid.uuid4().hex[:12]}"
    url = context_url(base_url.removesuffix("/v1"), session=session_id, task=task_id, agent="solver")  # trainwire
    client = OpenAIChatCompletionClient(
        model=args.model,
        base_url=url,
        model_info=MODEL_INFO,
        api_key=os.environ.get("OPENAI_API_KEY", "unused"),
        temperature=1.0,
        max_tokens=args.max_tokens,
    )
    agent = AssistantAgent(
        "solver",
        model_client=client,
        tools=[calculator],
        system_message=SYSTEM,
        reflect_on_tool_use=True,
        max_tool_iterations=max(args.max_turns - 1, 1),
    )
    try:
        result = await agent.run(task=question)
    finally:
        await client.close()
    last = result.messages[-1] if result.messages else None
    return session_id, last.content if isinstance(last, TextMessage) else None


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--proxy-url", help="trainwire's URL (default: OPENAI_BASE_URL without /v1)")
    parser.add_argument("--model", default="policy")
    parser.add_argument("--max-turns", type=int, default=4, help="model calls per episode at most")
    parser.add_argument("--max-tokens", type=int, default=256)
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

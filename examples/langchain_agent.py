"""The calculator agent in LangChain (`langchain-openai`), trained through trainwire.

Stock LangChain tool calling: `ChatOpenAI(...).bind_tools([...])`, run the tool calls, feed the results back.
The only trainwire-specific parts are `base_url` (the proxy) and `default_headers` (the episode's session and
task ids), plus posting the reward when the episode ends.

    trainwire serve --upstream http://localhost:8000 &
    export OPENAI_BASE_URL=http://localhost:8100/v1
    python examples/langchain_agent.py --episodes 8
"""

from __future__ import annotations

import argparse
import os
import random
import uuid

import common
from common import endpoints, make_task, post_reward, score
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '(12 + 7) * 3' and return the result."""
    return common.calculator(expression)


def run_episode(base_url: str, args, task_id: str, question: str) -> tuple[str, str | None]:
    session_id = f"lc-{uuid.uuid4().hex[:12]}"
    llm = ChatOpenAI(
        model=args.model,
        base_url=base_url,
        api_key=os.environ.get("OPENAI_API_KEY", "unused"),
        default_headers={"X-Session-Id": session_id, "X-Task-Id": task_id},  # trainwire: the episode
        temperature=1.0,
        max_tokens=256,
    )
    agent = llm.bind_tools([calculator])
    messages = [SystemMessage("Use the calculator tool for arithmetic."), HumanMessage(question)]
    for _ in range(args.max_turns):
        ai = agent.invoke(messages)
        messages.append(ai)
        if not ai.tool_calls:
            return session_id, ai.text
        for call in ai.tool_calls:
            messages.append(calculator.invoke(call))  # a ToolMessage answering that call
    return session_id, None


def main() -> None:
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
        session_id, answer = run_episode(base_url, args, task_id, question)
        reward = score(answer, truth)
        post_reward(proxy, session_id, reward)
        print(f"episode {episode}: {session_id} answer {answer!r} truth {truth} reward {reward}", flush=True)


if __name__ == "__main__":
    main()

"""The calculator agent in LangGraph (`langgraph`, `langchain-openai`), trained through trainwire.

Stock LangGraph: `create_react_agent(ChatOpenAI(...), [calculator])`, the prebuilt ReAct loop (model -> tools ->
model ...). The only trainwire-specific part is the model's `base_url`: the proxy's /tw/ form names the episode's
session, task and agent in the URL itself, so nothing else in the graph changes. The reward is posted when the
episode ends.

    trainwire serve --upstream http://localhost:8000 &
    export OPENAI_BASE_URL=http://localhost:8100/v1
    python examples/langgraph_agent.py --episodes 8
"""

from __future__ import annotations

import argparse
import os
import random
import uuid
import warnings

import common
from common import context_url, endpoints, make_task, post_reward, score
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.errors import GraphRecursionError

with warnings.catch_warnings():  # langgraph 1.x points at langchain.agents.create_agent; the prebuilt one still works
    warnings.simplefilter("ignore", DeprecationWarning)
    from langgraph.prebuilt import create_react_agent

SYSTEM = "Use the calculator tool for arithmetic, then reply with only the final number."


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '(12 + 7) * 3' and return the result."""
    return common.calculator(expression)


def run_episode(base_url: str, args, task_id: str, question: str) -> tuple[str, str | None]:
    session_id = f"lg-{uuid.uuid4().hex[:12]}"
    url = context_url(base_url.removesuffix("/v1"), session=session_id, task=task_id, agent="solver")  # trainwire
    llm = ChatOpenAI(
        model=args.model,
        base_url=url,
        api_key=os.environ.get("OPENAI_API_KEY", "unused"),
        temperature=1.0,
        max_completion_tokens=args.max_tokens,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        agent = create_react_agent(llm, [calculator], prompt=SYSTEM)
    try:
        # Each turn is a model step and a tool step: max_turns model calls at most.
        state = agent.invoke({"messages": [("user", question)]}, {"recursion_limit": 2 * args.max_turns})
    except GraphRecursionError:  # no answer within --max-turns: reward 0
        return session_id, None
    return session_id, state["messages"][-1].text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--proxy-url", help="trainwire's URL (default: OPENAI_BASE_URL without /v1)")
    parser.add_argument("--model", default="policy")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
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

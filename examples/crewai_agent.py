"""The calculator agent in CrewAI (`crewai` 1.x), trained through trainwire.

Stock CrewAI: an `Agent` with a `@tool`, one `Task`, a `Crew`, `kickoff()`. The only trainwire-specific part is
the `LLM`'s `base_url`: the proxy's /tw/ form names the episode's session, task and agent in the URL. CrewAI's own
prompts are long (role, goal, backstory, tool descriptions, format rules: several hundred tokens), so give the
policy a context window that holds them plus the answer. Telemetry is off (it would post to CrewAI's servers).
The reward is posted when the episode ends.

CrewAI pins pydantic 2.12 and openai 2.x (trainwire runs newer ones), so it runs from its own venv:

    examples/setup_frameworks_venv.sh             # once: ~/.cache/trainwire/frameworks-venv
    trainwire serve --upstream http://localhost:8000 &
    export OPENAI_BASE_URL=http://localhost:8100/v1
    ~/.cache/trainwire/frameworks-venv/bin/python examples/crewai_agent.py --episodes 8
"""

from __future__ import annotations

import os

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")  # before crewai is imported
os.environ.setdefault("OTEL_SDK_DISABLED", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")

import argparse  # noqa: E402
import random  # noqa: E402
import uuid  # noqa: E402

import common  # noqa: E402
from common import context_url, endpoints, make_task, post_reward, score  # noqa: E402
from crewai import LLM, Agent, Crew, Task  # noqa: E402
from crewai.tools import tool  # noqa: E402


@tool("calculator")
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '(12 + 7) * 3' and return the result."""
    return common.calculator(expression)


def run_episode(base_url: str, args, task_id: str, question: str) -> tuple[str, str | None]:
    session_id = f"crew-{uuid.uuid4().hex[:12]}"
    url = context_url(base_url.removesuffix("/v1"), session=session_id, task=task_id, agent="solver")  # trainwire
    llm = LLM(
        model=f"openai/{args.model}",
        base_url=url,
        api_key=os.environ.get("OPENAI_API_KEY", "unused"),
        temperature=1.0,
        max_tokens=args.max_tokens,
    )
    solver = Agent(
        role="Calculator",
        goal="Answer arithmetic questions exactly.",
        backstory="You use the calculator tool for every computation.",
        tools=[calculator],
        llm=llm,
        max_iter=args.max_turns,
        allow_delegation=False,
        verbose=False,
    )
    job = Task(description=question, expected_output="Only the final number.", agent=solver)
    output = Crew(agents=[solver], tasks=[job], verbose=False).kickoff()
    return session_id, output.raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--proxy-url", help="trainwire's URL (default: OPENAI_BASE_URL without /v1)")
    parser.add_argument("--model", default="policy")
    parser.add_argument("--max-turns", type=int, default=4, help="CrewAI's max_iter")
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

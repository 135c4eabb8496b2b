"""A multi-turn, tool-using agent on the unchanged OpenAI SDK, trained through trainwire.

Each episode asks the policy an arithmetic question; the model may call a `calculator` tool, which this
script runs itself (a safe evaluator, no eval()), and then answers with a number. One episode is one trainwire
session (`X-Session-Id`); episodes of the same question share an `X-Task-Id`, so the trainer can compare them
(GRPO groups). When an episode ends the agent posts its reward, 1 if the answer is right and 0 if not:

    curl -X POST http://localhost:8100/reward -H 'content-type: application/json' \\
         -d '{"session_id": "<episode id>", "reward": 1.0}'

Run it against a proxy in front of vLLM:

    trainwire serve --upstream http://localhost:8000 &
    export OPENAI_BASE_URL=http://localhost:8100/v1      # the only change an agent needs
    python examples/openai_sdk_agent.py --episodes 16 --group-size 4
    trainwire train ...                                   # learns from the rewarded sessions
"""

from __future__ import annotations

import argparse
import json
import os
import random
import uuid

from common import CALCULATOR_TOOL, calculator, endpoints, make_task, post_reward, score
from openai import OpenAI

SYSTEM = "You are a careful assistant. Use the calculator tool for arithmetic."


def run_episode(client: OpenAI, args, task_id: str, question: str) -> tuple[str, str | None]:
    session_id = f"calc-{uuid.uuid4().hex[:12]}"
    headers = {"X-Session-Id": session_id, "X-Task-Id": task_id}  # what makes this call part of an episode
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    for _ in range(args.max_turns):
        response = client.chat.completions.create(
            model=args.model,
            messages=messages,
            tools=[CALCULATOR_TOOL],
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            extra_headers=headers,
        )
        message = response.choices[0].message
        if not message.tool_calls:
            return session_id, message.content
        messages.append(
            {
                "role": "assistant",
                "content": message.content,
                "tool_calls": [tc.model_dump() for tc in message.tool_calls],
            }
        )
        for tool_call in message.tool_calls:
            try:
                expression = json.loads(tool_call.function.arguments or "{}").get("expression", "")
                result = (
                    calculator(str(expression))
                    if tool_call.function.name == "calculator"
                    else f"Error: unknown tool {tool_call.function.name!r}"
                )
            except (json.JSONDecodeError, AttributeError) as exc:
                result = f"Error: arguments are not a JSON object: {exc}"
            messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": result})
    return session_id, None  # out of turns: no answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=1, help="Episodes per question (same X-Task-Id)")
    parser.add_argument("--proxy-url", help="trainwire's URL (default: OPENAI_BASE_URL without /v1)")
    parser.add_argument("--model", default="policy", help="The policy's name on the proxy")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0, help="Keep equal to the trainer's --temperature")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base_url, proxy = endpoints(args.proxy_url)
    client = OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "unused"))
    rng = random.Random(args.seed)
    rewards = []
    for episode in range(args.episodes):
        if episode % args.group_size == 0:
            task_id, question, truth = make_task(rng)
        session_id, answer = run_episode(client, args, task_id, question)
        reward = score(answer, truth)
        post_reward(proxy, session_id, reward)
        rewards.append(reward)
        print(
            f"episode {episode}: {session_id} task {task_id} answer {answer!r} truth {truth} reward {reward}",
            flush=True,
        )
    print(f"mean reward {sum(rewards) / max(len(rewards), 1):.3f} over {len(rewards)} episodes")


if __name__ == "__main__":
    main()

"""Two agents in one episode: a writer (the policy being trained) and a checker that reviews its drafts.

Both talk to trainwire with the unchanged OpenAI SDK, in the same session (`X-Session-Id`); `X-Agent-Name`
says which agent made each call. The writer drafts a sentence under constraints, the checker answers OK or
says what to fix, and the writer revises (up to --rounds drafts). The reward checks the constraints in code,
so it is exact whatever the checker said.

The checker may be another model: give it a name the proxy routes elsewhere with --model-route (through
litellm; such calls are recorded, never trained on). Only the writer is trained:

    trainwire serve --upstream http://localhost:8000 --model-route checker=openai/gpt-4o-mini &
    export OPENAI_BASE_URL=http://localhost:8100/v1
    python examples/multi_agent.py --episodes 8 --checker-model checker
    trainwire train --train-agent writer ...

Without --checker-model the checker uses the policy too; `--train-agent writer` still keeps its calls out of
training.
"""

from __future__ import annotations

import argparse
import os
import random
import uuid

from common import endpoints, post_reward
from openai import OpenAI

TOPICS = ["the sea", "a city at night", "autumn", "a train journey", "coffee", "mountains", "a library"]
WORDS = ["quiet", "bright", "ancient", "gentle", "restless", "golden", "hidden"]


def satisfied(sentence: str, word: str, max_words: int) -> bool:
    words = [w.strip(".,;:!?\"'").lower() for w in sentence.split()]
    return word in words and 0 < len(words) <= max_words


def run_episode(client: OpenAI, args, topic: str, word: str, max_words: int) -> tuple[str, str]:
    session_id = f"write-{uuid.uuid4().hex[:12]}"
    task_id = f"write-{topic.replace(' ', '_')}-{word}-{max_words}"
    rules = f'Write one sentence about {topic} that uses the word "{word}" and has at most {max_words} words.'
    writer = [
        {"role": "system", "content": "You are a writer. Reply with the sentence only."},
        {"role": "user", "content": rules},
    ]
    draft = ""
    for _ in range(args.rounds):
        reply = client.chat.completions.create(
            model=args.model,
            messages=writer,
            temperature=args.temperature,
            max_tokens=80,
            extra_headers={"X-Session-Id": session_id, "X-Task-Id": task_id, "X-Agent-Name": "writer"},
        )
        draft = (reply.choices[0].message.content or "").strip()
        writer.append({"role": "assistant", "content": draft})
        review = client.chat.completions.create(
            model=args.checker_model,
            temperature=0.0,
            max_tokens=80,
            messages=[
                {
                    "role": "system",
                    "content": "You check a sentence against rules. Reply OK if it follows "
                    "all of them, otherwise say in one line what to fix.",
                },
                {"role": "user", "content": f"Rules: {rules}\nSentence: {draft}"},
            ],
            extra_headers={"X-Session-Id": session_id, "X-Task-Id": task_id, "X-Agent-Name": "checker"},
        )
        verdict = (review.choices[0].message.content or "").strip()
        if verdict.upper().startswith("OK"):
            break
        writer.append({"role": "user", "content": f"A reviewer says: {verdict}\nRewrite the sentence."})
    return session_id, draft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--proxy-url", help="trainwire's URL (default: OPENAI_BASE_URL without /v1)")
    parser.add_argument("--model", default="policy", help="The writer's model: the trained policy")
    parser.add_argument("--checker-model", default="policy", help="The checker's model (e.g. a --model-route name)")
    parser.add_argument("--rounds", type=int, default=2, help="Most drafts per episode")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base_url, proxy = endpoints(args.proxy_url)
    client = OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "unused"))
    rng = random.Random(args.seed)
    for episode in range(args.episodes):
        topic, word, max_words = rng.choice(TOPICS), rng.choice(WORDS), rng.randint(6, 12)
        session_id, sentence = run_episode(client, args, topic, word, max_words)
        reward = 1.0 if satisfied(sentence, word, max_words) else 0.0
        post_reward(proxy, session_id, reward)
        print(f"episode {episode}: {session_id} {sentence!r} reward {reward}", flush=True)


if __name__ == "__main__":
    main()

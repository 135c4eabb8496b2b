"""Which recorded calls ``trainwire train --objective sft`` trains on, end to end through a real proxy, on Postgres
and SQLite: ``--sft-from MODEL`` and ``--min-reward R`` select exactly the right calls.

A real ``trainwire serve`` with a scripted policy upstream (vLLM's shapes, token ids and logprobs) and two frozen
routes, ``teacher`` and ``checker``, both served by the calculator demo's scripted teacher (demo/teacher_server.py)
through litellm. The OpenAI SDK records teacher episodes (a tool call, the tool result, the answer; one of them
streamed), a checker episode, an evaluation of the teacher, and a session mixing the policy (one call an evaluation
call) and the teacher; rewards go to
``/reward``. Then the trainer's own path: the store's claim with ``sft_from`` and rl/sft.py's samples with the
calculator model's template. The selected calls are exactly the teacher's calls of the sessions whose final reward
is at least ``min_reward`` and the policy's own trainable calls; never a call of another route, an evaluation call,
or a session without a final reward; a streamed teacher call renders to the same tokens as a non-streamed one, and
both to what vLLM renders for the request the client sent (also from Postgres' JSONB, which reorders keys).
"""

from __future__ import annotations

import asyncio
import importlib.util
import uuid

import httpx
import openai
import pytest
import yaml

from demo import calc_model, calc_task, teacher_server
from tests.support import dbread
from tests.support.ports import free_port
from tests.support.proxyproc import ProxyProcess
from trainwire.rl.retokenize import ChatRenderer
from trainwire.rl.sft import build_sft_samples
from trainwire.store import claims, episodes
from trainwire.store.db import make_engine

if importlib.util.find_spec("litellm") is None:  # imported by the proxy only (importing it here fetches prices)
    pytest.skip("litellm is not installed (pip install -e '.[routes]')", allow_module_level=True)


@pytest.fixture(scope="module")
def teacher():
    server = teacher_server.serve(free_port(), direct_share=0.3)
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture(scope="module")
def renderer(tmp_path_factory) -> ChatRenderer:
    out = tmp_path_factory.mktemp("calc-tokenizer")
    calc_model._train_tokenizer().save_pretrained(out)
    return ChatRenderer.from_pretrained(str(out))


@pytest.fixture
def sft_proxy(upstream, teacher, db_url, tmp_path):
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        yaml.safe_dump(
            {name: {"model": "openai/teacher", "api_base": teacher, "api_key": "x"} for name in ("teacher", "checker")}
        )
    )
    p = ProxyProcess(
        [
            "--upstream",
            upstream.url,
            "--database-url",
            db_url,
            "--journal-dir",
            str(tmp_path / "j"),
            "--routes-file",
            str(routes),
        ],
        log_path=tmp_path / "proxy.log",
    )
    p.start(timeout=90)
    yield p
    p.stop()


def tool_questions(n: int) -> list[calc_task.Question]:
    """Training questions the teacher answers with a tool call."""
    pool = calc_task.questions(200, held_out=False, seed=99)
    return [q for q in pool if calc_task.teacher_uses_tool(q.text, direct_share=0.3)][:n]


def episode(
    proxy, sid: str, q: calc_task.Question, *, model: str = "teacher", stream: bool = False, train: bool = True
) -> list[str]:
    """The calculator agent's episode against ``model``: the call ids of its turns."""
    headers = {"X-Session-Id": sid, **({} if train else {"X-Trainwire-Train": "false"})}
    client = openai.OpenAI(base_url=proxy.v1, api_key="x", max_retries=0, default_headers=headers)
    messages, ids = q.messages(), []
    for _ in range(3):
        kw = dict(model=model, messages=messages, tools=[calc_task.TOOL], max_tokens=32)
        if stream:
            stream_ = client.chat.completions.create(stream=True, **kw)
            ids.append(stream_.response.headers["x-call-id"])
            chunks = list(stream_)
            tool_calls = {}
            content = ""
            for ch in chunks:
                if not ch.choices:
                    continue
                d = ch.choices[0].delta
                content += d.content or ""
                for tc in d.tool_calls or []:
                    tool_calls.setdefault(
                        tc.index,
                        {"id": tc.id, "type": "function", "function": {"name": tc.function.name, "arguments": ""}},
                    )
                    tool_calls[tc.index]["function"]["arguments"] += tc.function.arguments or ""
            msg_tool_calls = list(tool_calls.values())
        else:
            raw = client.chat.completions.with_raw_response.create(**kw)
            ids.append(raw.headers["x-call-id"])
            msg = raw.parse().choices[0].message
            content = msg.content or ""
            msg_tool_calls = [tc.model_dump(include={"id", "type", "function"}) for tc in msg.tool_calls or []]
        if not msg_tool_calls:
            return ids
        messages.append({"role": "assistant", "content": content or None, "tool_calls": msg_tool_calls})
        for tc in msg_tool_calls:
            result, _ = calc_task.run_tool(tc["function"]["name"], tc["function"]["arguments"])
            messages.append({"role": "tool", "tool_call_id": tc["id"], "content": result})
    return ids


def reward(proxy, sid: str, value: float) -> None:
    r = httpx.post(f"{proxy.url}/reward", json={"session_id": sid, "reward": value}, timeout=30)
    assert r.status_code == 200, r.text


async def claim_all(db_url: str, sft_from: list[str]) -> list[episodes.ClaimedSession]:
    engine = make_engine(db_url)
    try:
        return await claims.claim_batch(
            engine, worker_id="w", batch_size=100, settle_s=0.0, group_by_task=False, sft_from=sft_from
        )
    finally:
        await engine.dispose()


def test_sft_from_and_min_reward_select_exactly_the_right_calls(sft_proxy, upstream, db_url, renderer):
    q1, q2, q3, q4, q5 = tool_questions(5)
    tag = uuid.uuid4().hex[:6]
    sid = {name: f"{name}-{tag}" for name in ("right", "streamed", "wrong", "checker", "mixed", "eval", "open")}
    right = episode(sft_proxy, sid["right"], q1)
    streamed = episode(sft_proxy, sid["streamed"], q1, stream=True)  # the same question, streamed
    wrong = episode(sft_proxy, sid["wrong"], q2)
    episode(sft_proxy, sid["checker"], q3, model="checker")
    own = episode(sft_proxy, sid["mixed"], q4, model="policy")  # scripted upstream: text, token ids
    mixed_teacher = episode(sft_proxy, sid["mixed"], q4)
    episode(sft_proxy, sid["mixed"], q4, model="policy", train=False)  # an evaluation call in the same session
    teacher_eval = episode(sft_proxy, sid["eval"], q5, train=False)  # the teacher evaluated: never trained on
    episode(sft_proxy, sid["open"], q5)  # no final reward: never claimed
    assert len(right) == len(streamed) == len(mixed_teacher) == 2 and len(own) == 1
    for name, value in (
        ("right", 1.0),
        ("streamed", 1.0),
        ("wrong", 0.0),
        ("checker", 1.0),
        ("mixed", 1.0),
        ("eval", 1.0),
    ):
        reward(sft_proxy, sid[name], value)

    sessions = asyncio.run(claim_all(db_url, ["teacher"]))
    assert sorted(s.id for s in sessions) == sorted(v for k, v in sid.items() if k != "open")
    loaded = {s.id: [c.id for c in s.calls] for s in sessions}
    # the claim loads the teacher's calls and the policy's trainable ones, nothing else
    assert loaded[sid["right"]] == right and loaded[sid["streamed"]] == streamed and loaded[sid["wrong"]] == wrong
    assert loaded[sid["checker"]] == [] and loaded[sid["eval"]] == teacher_eval
    assert loaded[sid["mixed"]] == own + mixed_teacher

    built = build_sft_samples(sessions, renderer=renderer, sft_from=["teacher"], min_reward=0.5, mode="transition")
    trained = [c for ids in built.call_ids for c in ids]
    assert sorted(trained) == sorted(right + streamed + own + mixed_teacher)
    assert sorted(built.skipped_sessions) == sorted([sid["wrong"], sid["checker"], sid["eval"]])
    assert built.counters["teacher_calls"] == 6 and built.counters["own_calls"] == 1
    assert built.skip_reasons == {"evaluation call (X-Trainwire-Train: false)": len(teacher_eval)}

    # the policy's own call trains on exactly the token ids vLLM (here: the scripted upstream) returned
    (own_row,) = [c for c in dbread.calls(db_url, sid["mixed"]) if c["id"] == own[0]]
    i = trained.index(own[0])
    assert built.samples[i].prompt_ids == list(own_row["prompt_token_ids"])
    assert built.samples[i].response_ids == list(own_row["completion_token_ids"])
    # a streamed teacher call renders to the same tokens as the same call not streamed
    by_call = {ids[0]: s for ids, s in zip(built.call_ids, built.samples)}
    for a, b in zip(right, streamed):
        assert (by_call[a].prompt_ids, by_call[a].response_ids) == (by_call[b].prompt_ids, by_call[b].response_ids)
    # and to what vLLM renders for the request the client sent (on Postgres the store keeps JSONB, which reorders
    # object keys: the calculator model's template writes JSON with sorted keys, so the order does not matter)
    assert by_call[right[0]].prompt_ids == renderer.prompt_ids(q1.messages(), [calc_task.TOOL])
    tool_call = renderer.tokenizer.decode(by_call[right[0]].response_ids)
    assert tool_call == (
        f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{q1.expression}"}}}}</tool_call><|im_end|>'
    )
    assert renderer.tokenizer.decode(by_call[right[1]].response_ids) == f"{q1.answer}<|im_end|>"

"""``--objective sft`` on verl's engine (CPU): the loss of a step is verl's SFT loss, and it is exactly the hand
computation over the trained tokens only.

The samples are a teacher's tool episode as the trainer builds it (demo/calc_model.py's tokenizer and template,
rl/sft.py in trajectory mode: prompt, tool call, tool result, answer) and one own call. HF's forward pass on the
same weights gives each token's log-prob; the expected loss is the mean negative log-likelihood over the tokens
with mask 1 (the tool call and the answer, each with its end-of-turn token), and it differs from the mean over all
response tokens: the tool result and the template's markers are not trained. Then: SFT checkpoints resume under
``--objective rl`` at the RL run's learning rate (not the one the SFT optimizer state carries), the step count
going on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("verl")

from demo.calc_model import build_calc_model  # noqa: E402
from tests.unit.test_rl_sft import CALL, answer, first_request, second_request  # noqa: E402
from trainwire.rl.engine import EngineConfig, PolicyEngine  # noqa: E402
from trainwire.rl.engine.policy import sequence_loss_mask  # noqa: E402
from trainwire.rl.retokenize import ChatRenderer  # noqa: E402
from trainwire.rl.samples import Sample  # noqa: E402
from trainwire.rl.sft import build_sft_samples  # noqa: E402
from trainwire.store.episodes import ClaimedCall, ClaimedSession  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return build_calc_model(tmp_path_factory.mktemp("calc") / "model")


@pytest.fixture(scope="module")
def samples(model_path) -> list[Sample]:
    def frozen(i, request, response):
        return ClaimedCall(
            id=f"c{i}",
            seq=i,
            agent_name="a",
            policy_version=None,
            prompt_token_ids=None,
            completion_token_ids=None,
            logprobs=None,
            finish_reason="stop",
            reward=0.0,
            aborted=False,
            status_code=200,
            route="frozen",
            model_requested="teacher",
            request=request,
            response=response,
        )

    episode = ClaimedSession(
        id="s1",
        task_id=None,
        final_reward=1.0,
        calls=[
            frozen(0, first_request(), answer(tool_calls=[CALL])),
            frozen(1, second_request(), answer(content="1805")),
        ],
    )
    own = ClaimedSession(
        id="s2",
        task_id=None,
        final_reward=1.0,
        calls=[
            ClaimedCall(
                id="c2",
                seq=0,
                agent_name="a",
                policy_version=1,
                prompt_token_ids=[5, 6, 7, 8],
                completion_token_ids=[9, 10, 11],
                logprobs=[-1.0, -1.0, -1.0],
                finish_reason="stop",
                reward=0.0,
                aborted=False,
                status_code=200,
            )
        ],
    )
    built = build_sft_samples(
        [episode, own], renderer=ChatRenderer.from_pretrained(str(model_path)), sft_from=["teacher"], mode="trajectory"
    )
    assert len(built.samples) == 2 and 0 in built.samples[0].response_mask
    return built.samples


def token_logprobs(model_path: Path, sample: Sample) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logp = model(ids).logits.float()[0].log_softmax(-1)
    p = len(sample.prompt_ids)
    return [logp[p - 1 + t, tok].item() for t, tok in enumerate(sample.response_ids)]


def test_sft_loss_is_the_nll_of_the_trained_tokens_only(model_path, samples):
    lps = [token_logprobs(model_path, s) for s in samples]
    trained = [-lp for s, row in zip(samples, lps) for lp, m in zip(row, s.response_mask) if m]
    every = [-lp for row in lps for lp in row]
    want = sum(trained) / len(trained)
    assert abs(want - sum(every) / len(every)) > 1e-3  # the mask matters for this batch (tolerance below: 1e-5)

    engine = PolicyEngine(EngineConfig(model_path=str(model_path), objective="sft", lr=1e-3, micro_batch_size=1))
    td, info = engine.build_train_batch(samples)
    # verl's loss mask: over the whole sequence, 1 exactly on the response tokens with mask 1 (and padding 0)
    got_mask = [row.tolist() for row in td["loss_mask"].unbind()]
    assert got_mask[:2] == [[0] * len(s.prompt_ids) + s.response_mask for s in samples]
    assert all(not any(row) for row in got_mask[2:])
    assert info["tokens"] == len(trained)

    metrics = engine.step(samples)
    assert metrics["loss"] == pytest.approx(want, abs=1e-5)
    assert metrics["tokens"] == len(trained) and metrics["samples"] == 2.0
    after = engine.step(samples)  # it learns: the same batch again has a lower loss
    assert after["loss"] < metrics["loss"]


def test_the_sequence_loss_mask_of_a_padded_batch():
    """Pure layout: left-padded prompts and right-padded responses to verl's no-padding mask."""
    from trainwire.rl.engine.batch import padded_ppo_tensors, to_no_padding

    batch = [Sample([1, 2, 3], [4, 5], [1, 0], [0.0, 0.0], 0.0), Sample([7], [8, 9, 10], [0, 1, 1], [0.0] * 3, 0.0)]
    tensors = padded_ppo_tensors(batch, pad_token_id=0, with_weights=False)
    td = to_no_padding(tensors, 1.0)
    mask = sequence_loss_mask(tensors, td)
    assert [row.tolist() for row in mask.unbind()] == [[0, 0, 0, 1, 0], [0, 0, 1, 1]]


def test_rl_resumes_an_sft_checkpoint_at_its_own_learning_rate(model_path, samples, tmp_path):
    ckpt = str(tmp_path / "state")
    sft = PolicyEngine(
        EngineConfig(
            model_path=str(model_path),
            objective="sft",
            lr=1e-3,
            micro_batch_size=2,
            mini_batch_size=2,
            ppo_epochs=2,
            checkpoint_dir=ckpt,
        )
    )
    m = sft.step(samples)
    assert m["lr"] == pytest.approx(1e-3)
    sft.save_checkpoint()
    weights = sft.state_dict()
    del sft

    rl = PolicyEngine(
        EngineConfig(model_path=str(model_path), objective="rl", lr=1e-4, micro_batch_size=2, checkpoint_dir=ckpt)
    )
    assert rl.load_checkpoint() is not None and rl.global_step == 1
    resumed = rl.state_dict()
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
    lps = rl.logprobs(samples)
    rl_samples = [
        Sample(
            s.prompt_ids,
            s.response_ids,
            s.response_mask,
            [lp if mk else None for lp, mk in zip(row, s.response_mask)],
            advantage=a,
        )
        for s, row, a in zip(samples, lps, (1.0, -1.0))
    ]
    m = rl.step(rl_samples)
    assert m["lr"] == pytest.approx(1e-4) and rl.global_step == 2

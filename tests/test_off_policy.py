"""The sampler-vs-trainer log-prob gap and the truncated importance weights of one-step-async rollouts.

Hand-computed cases for the pure functions; on the module, properties an independent reader can check: an
on-policy batch trains exactly as before whatever log-probs the engine reported, and a uniform weight ``ρ``
scales the loss and its gradient by ``ρ`` (the loss is linear in the token advantage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from egrsd_pl.datamodule import RolloutBatch, RolloutDataModule
from egrsd_pl.losses import (
    ObjectiveInputs,
    compute_objective,
    egrsd_loss,
    logprob_gap,
    truncated_importance_weights,
)
from egrsd_pl.module import EGRSDModule
from egrsd_pl.problem_sources import load_problems
from egrsd_pl.rollout.base import Rollout, RolloutEngine, SamplingConfig
from egrsd_pl.stats import RunningRewardStats

MASK = torch.tensor([[True, True, False]])


def test_gap_and_weights_by_hand() -> None:
    student = torch.tensor([[-1.0, -2.0, float("nan")]])  # padding may hold anything
    sampler = torch.tensor([[-1.5, -1.0, 0.0]])
    # |−1 − (−1.5)| = 0.5, |−2 − (−1)| = 1.0: mean over the 2 tokens 0.75
    assert float(logprob_gap(student, sampler, MASK)) == pytest.approx(0.75, abs=1e-7)
    weights = truncated_importance_weights(student, sampler, MASK, cap=2.0)
    # exp(0.5) = 1.648721, exp(−1.0) = 0.367879; 1 at padding
    torch.testing.assert_close(weights, torch.tensor([[1.648721, 0.367879, 1.0]]), atol=1e-6, rtol=0)
    # exp(−0.1 − (−2.0)) = exp(1.9) = 6.69 > C: capped at 2; below C untouched
    capped = truncated_importance_weights(
        torch.tensor([[-0.1, -3.0]]), torch.tensor([[-2.0, -3.0]]), torch.tensor([[True, True]]), cap=2.0
    )
    assert capped.tolist() == [[2.0, 1.0]]
    assert float(logprob_gap(student, sampler, torch.zeros_like(MASK))) == 0.0  # no token: 0, not NaN
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(student, sampler, MASK, cap=0.0)


def test_weights_multiply_the_token_advantage_and_carry_no_gradient() -> None:
    """GRPO, one rollout of 2 tokens, A = 2, ρ = (1.648721, 0.367879):
    L = −(1/2)·(2·1.648721·(−1) + 2·0.367879·(−2)) = 1.648721 + 0.735759 = 2.384480; dL/dlog p = −A·ρ/2 = −ρ."""
    student = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    weights = truncated_importance_weights(student, torch.tensor([[-1.5, -1.0, 0.0]]), MASK)
    assert not weights.requires_grad
    inputs = ObjectiveInputs(student, MASK, torch.tensor([2.0]), importance_weights=weights)
    loss, _ = compute_objective("grpo", inputs)
    assert float(loss.detach()) == pytest.approx(2.384480, abs=1e-6)
    loss.backward()
    assert student.grad is not None
    torch.testing.assert_close(student.grad, torch.tensor([[-1.648721, -0.367879, 0.0]]), atol=1e-6, rtol=0)


def test_egrsd_with_unit_weights_is_egrsd_and_kl_objectives_refuse_weights() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, generator=generator) - 2
    teacher = torch.randn(2, 4, generator=generator) - 2
    entropy = torch.rand(2, 4, generator=generator) * 3
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    advantages = torch.tensor([0.7, -0.4])
    plain, _ = egrsd_loss(student, teacher, entropy, advantages, mask, gamma=0.3)
    ones, _ = egrsd_loss(
        student, teacher, entropy, advantages, mask, gamma=0.3, importance_weights=torch.ones(2, 4)
    )
    halves, _ = egrsd_loss(
        student, teacher, entropy, advantages, mask, gamma=0.3, importance_weights=torch.full((2, 4), 0.5)
    )
    assert torch.equal(plain, ones)
    torch.testing.assert_close(halves, 0.5 * plain, atol=1e-7, rtol=1e-6)
    kl = ObjectiveInputs(None, mask, token_kl=torch.rand(2, 4), importance_weights=torch.ones(2, 4))
    with pytest.raises(ValueError, match="'opsd' objective has no sampled-token term"):
        compute_objective("opsd", kl)


# ---------------------------------------------------------------------------- on the module

COMPLETIONS = [" 12 + 30 = 42 so \\boxed{42}", " 7", " 3 * 4 = 12, \\boxed{12}"]  # unequal lengths: padding


class FixedCompletions(RolloutEngine):
    def setup(self, model: Any, tokenizer: Any, *, model_path: str, seed: int) -> None:
        self.tokenizer = tokenizer

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        eos = self.tokenizer.eos_token_id
        return [
            Rollout(i, (*self.tokenizer.encode(text, add_special_tokens=False), eos), text, truncated=False)
            for i, text in zip(range(len(prompt_ids)), COMPLETIONS, strict=True)
        ]


class FixedRewards(RolloutDataModule):
    def score(
        self, problems: Sequence[Any], rollouts: Sequence[Rollout]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = torch.tensor([1.25, 0.0, 0.9])  # warm-up baseline: A = r − 0.5 = (.75, −.5, .4)
        return rewards, rewards > 0


@pytest.fixture
def one_thread() -> Any:
    """One torch thread for the test (many times faster than two on a busy 2-core machine), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def module_and_batch(model_dir: Path, objective: str) -> tuple[EGRSDModule, RolloutBatch]:
    module = EGRSDModule(str(model_dir), objective=objective, lora_rank=4, lora_alpha=8)
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero adapter: student and teacher differ
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    module.reward_statistics = RunningRewardStats()
    data = FixedRewards("synthetic:3", batch_size=3, engine=FixedCompletions())
    return module, data.make_batch(load_problems("synthetic:3"), module, step=0, seed=0)


def step(module: EGRSDModule, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, LoRA gradient)`` of one training step, the gradient zeroed afterwards."""
    loss = module.training_step(batch, 0)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}
    module.policy.zero_grad()
    return loss.detach(), grads


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer here
def test_on_policy_batches_train_as_before_and_a_uniform_weight_scales_the_step(
    tiny_model_dir, one_thread
) -> None:  # type: ignore[no-untyped-def]
    """EGRSD on 3 rollouts. The engine's log-probs are the student's minus log 1.5: on-policy the step is
    bit-for-bit the step without them; one step ahead ρ = 1.5 everywhere, so loss and gradient scale by 1.5."""
    module, batch = module_and_batch(tiny_model_dir, "egrsd")
    mask = batch.student.completion_mask
    with torch.no_grad():
        student = module.student_logprobs(batch.student)  # [N, T]
    before = step(module, batch)
    assert float(before[0]) != 0.0
    batch.sampler_logprobs = torch.where(mask, student - math.log(1.5), torch.zeros(()))
    loss, grads = step(module, batch)  # on-policy (--data.async_steps 0): only the gap is logged
    assert torch.equal(loss, before[0]) and all(torch.equal(grads[n], before[1][n]) for n in grads)
    batch.off_policy = True
    loss, grads = step(module, batch)
    torch.testing.assert_close(loss, 1.5 * before[0], atol=1e-6, rtol=1e-5)
    for name, grad in grads.items():  # float32 cancellation: within 1e-5 of the tensor's largest entry
        scale = float(before[1][name].abs().max())
        torch.testing.assert_close(grad, 1.5 * before[1][name], atol=1e-5 * scale, rtol=1e-4)
    inputs = module.token_input_builders()["gated_teacher"](batch, module.sequence_advantages(batch))
    for shift, rho in ((math.log(1.5), 1.5), (math.log(3.0), 2.0)):  # 3 > C = 2: capped
        batch.sampler_logprobs = torch.where(mask, student - shift, torch.zeros(()))
        batch.off_policy = False
        corrected, metrics = module.correct_off_policy(batch, inputs)
        assert corrected.importance_weights is None and "async/is_weight_mean" not in metrics
        assert float(metrics["async/logprob_gap"]) == pytest.approx(shift, abs=1e-5)
        batch.off_policy = True
        corrected, metrics = module.correct_off_policy(batch, inputs)
        assert float(metrics["async/is_weight_mean"]) == pytest.approx(rho, abs=1e-5)
        assert corrected.importance_weights is not None


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_bad_flags_name_themselves() -> None:
    with pytest.raises(ValueError, match=r"^--model.is_cap must be > 0, got 0.0$"):
        EGRSDModule(is_cap=0.0)
    with pytest.raises(
        ValueError, match=r"^--data.async_steps must be 0 \(on-policy\) or 1 \(one step ahead\), got 2$"
    ):
        RolloutDataModule(async_steps=2)
    with pytest.raises(
        ValueError,
        match=r"^--data.async_steps 1 needs an engine that generates apart from the trainer, not HFGenerateEngine",
    ):
        RolloutDataModule(async_steps=1)


# ---------------------------------------------------------------------------- the request one step ahead


def test_the_batch_requested_ahead_is_the_one_the_dataloader_yields_next_across_an_epoch_end() -> None:
    from egrsd_pl.datamodule import ResumableShardSampler
    from egrsd_pl.problem import Problem

    data = RolloutDataModule(batch_size=2)
    data._kept = [Problem(str(i), f"p{i}", "", "") for i in range(5)]  # 2 full batches an epoch, 1 dropped
    data._sampler = ResumableShardSampler(5, seed=3)
    yielded = []
    for epoch in (0, 1):
        data._sampler.set_epoch(epoch)
        order = list(data._sampler)
        yielded += [(epoch, k + 1, [data._kept[i].id for i in order[2 * k : 2 * k + 2]]) for k in range(2)]
    predicted = [
        (e, b, [p.id for p in ps]) for e, b, ps in (data.next_problems(e, b) for e, b, _ in yielded[:-1])
    ]
    assert predicted == yielded[1:]  # (0, 1) -> (0, 2) -> (1, 1) -> (1, 2)


def test_rollouts_requested_for_another_batch_are_refused() -> None:
    from egrsd_pl.rollout.prefetch import RolloutPrefetcher

    prefetcher = RolloutPrefetcher()
    rollout = Rollout(0, (5, 2), "x", False, logprobs=(-0.1, -0.2), policy_version=3)
    prefetcher.submit(lambda: [rollout], epoch=0, batch_in_epoch=2, problem_ids=["a"], seed=7)
    saved = prefetcher.state_dict()  # waits for the request
    assert saved is not None and saved["rollouts"][0]["policy_version"] == 3
    restored = RolloutPrefetcher()
    restored.load_state_dict(saved)
    assert restored.take(epoch=0, batch_in_epoch=2, problem_ids=["a"], seed=7) == [rollout]
    assert restored.take(epoch=0, batch_in_epoch=3, problem_ids=["b"], seed=8) is None  # nothing pending
    restored.load_state_dict(saved)
    with pytest.raises(
        RuntimeError, match=r"for epoch 0 batch 2 \(seed 7\), not this step's epoch 0 batch 2 \(seed 8\)"
    ):
        restored.take(epoch=0, batch_in_epoch=2, problem_ids=["a"], seed=8)
    prefetcher.close()

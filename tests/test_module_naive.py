"""The module's per-token quantities and losses against an independent computation.

The module packs sequences, runs the decoder once per batch, gathers the hidden states at the
completion positions and projects them to the vocabulary in chunks. The reference here runs every
sequence on its own, unpadded, through plain transformers models (the LoRA merged into a copy of the
base for the student; a freshly loaded base for the adapter-disabled teacher), takes the full logits
and ``log_softmax``, and computes each objective's loss from docs/algorithm.md's formulas with plain tensor code.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from egrsd_pl.datamodule import RolloutBatch, RolloutDataModule
from egrsd_pl.losses import OBJECTIVES
from egrsd_pl.module import EGRSDModule
from egrsd_pl.problem import Problem
from egrsd_pl.problem_sources import load_problems
from egrsd_pl.rollout.base import Rollout, RolloutEngine, SamplingConfig
from egrsd_pl.stats import RunningRewardStats

# The reference runs every sequence unpadded through plain transformers in float64 with the LoRA merged. The
# module runs twice: with its backbone in float64 (vocabulary math still accumulated in float32, as in training),
# which isolates its packing, gathering, chunking and loss code: within 3e-5, plus 4e-6 relative for OPSD's 7-nat
# KL, which float32 accumulation over the vocabulary moves by 2e-5 (measured; about 24 float32 ulps; CRISP's
# reverse KL of near-equal distributions cancels in float32 by up to 1.8e-5 on AVX2 kernels, measured); and as in
# training (float32 backbone, LoRA unmerged), where float32 rounding through the decoder alone moves log-probs and
# entropies by up to ~2.5e-5 and a 6.4-nat KL summed over the vocabulary by ~5.7e-5 (measured on the shipped
# testbed): there the bound is 5e-5 + 2e-5 relative. A wrong position, prompt, mask or sign moves them by 0.1 or more.
TOLERANCES = {"float64": (3e-5, 4e-6), "float32": (5e-5, 2e-5)}  # backbone dtype -> (absolute, relative)
REWARDS = [1.25, 0.0, 0.9]  # one per rollout; the warm-up baseline makes A = r - 0.5 = [.75, -.5, .4]
COMPLETIONS = [" 12 + 30 = 42 so \\boxed{42}", " 7", " 3 * 4 = 12, \\boxed{12}"]  # unequal lengths: padding
SETTINGS: dict[str, dict[str, Any]] = {
    "sft": {},
    "grpo": {},
    "opsd": {},
    "rlsd": {},
    "egrsd": {"gamma": 0.3},
    "cl_egrsd": {"gamma": 1.0, "window": 2},
    "crisp": {"teacher": "hard_copy"},  # the teacher adapter starts as the base (LoRA B = 0)
}


def make_module(model_dir: Path, objective: str, backbone: str = "float32") -> EGRSDModule:
    module = EGRSDModule(
        str(model_dir), objective=objective, lora_rank=4, lora_alpha=8, **SETTINGS[objective]
    )
    module.configure_model()
    module.policy.to(getattr(torch, backbone))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at 0 (student = teacher); make the adapter matter
        for name, param in module.policy.named_parameters():
            if "lora_B" in name and ".default." in name:  # the student's; a teacher adapter stays the base
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    module.reward_statistics = RunningRewardStats()  # what callbacks.RewardStatistics hands over
    return module


class FixedCompletions(RolloutEngine):
    """Returns :data:`COMPLETIONS` (then ``<|im_end|>``) for the prompts, in order."""

    def setup(self, model: Any, tokenizer: Any, *, model_path: str, seed: int) -> None:
        self.tokenizer = tokenizer

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        eos = self.tokenizer.eos_token_id
        return [
            Rollout(i, (*self.tokenizer.encode(text, add_special_tokens=False), eos), text, truncated=False)
            for i, text in zip(range(len(prompt_ids)), COMPLETIONS, strict=True)
        ]


class FixedRewards(RolloutDataModule):
    """Scores the rollouts with :data:`REWARDS` (the tiny model's answers are not what is tested here)."""

    def score(
        self, problems: Sequence[Problem], rollouts: Sequence[Rollout]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = torch.tensor(REWARDS[: len(rollouts)])
        return rewards, rewards > 0


def make_batch(module: EGRSDModule) -> RolloutBatch:
    """The DataModule's own packing of 3 problems with the fixed completions (sft: reference solutions)."""
    data = FixedRewards("synthetic:3", batch_size=3, engine=FixedCompletions())
    return data.make_batch(load_problems("synthetic:3"), module, step=0, seed=0)


def naive_log_probs(model: Any, packed: Any) -> list[torch.Tensor]:
    """Per sequence, unpadded: ``[T_i, V]`` full-vocabulary log-probs at the completion positions."""
    rows = []
    for row in range(packed.input_ids.size(0)):
        length = int(packed.attention_mask[row].sum())
        count = int(packed.completion_mask[row].sum())
        with torch.no_grad():
            logits = model(input_ids=packed.input_ids[row : row + 1, :length]).logits[0]  # [L_i, V]
        rows.append(torch.log_softmax(logits[length - count - 1 : length - 1].double(), dim=-1))  # [T_i, V]
    return rows


def padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """``[N, width]`` from per-row vectors, zeros beyond each row."""
    out = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out


def naive_kl(objective: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``[T_i]`` per-token KL from full log-prob rows: opsd ``KL(p_T ‖ p_θ)``, crisp ``KL(p_θ ‖ p_T)``."""
    if objective == "crisp":
        return (student.exp() * (student - teacher)).sum(-1)
    return (teacher.exp() * (teacher - student)).sum(-1)


def naive_loss(
    objective: str, batch: RolloutBatch, student: list[torch.Tensor], teacher: list[torch.Tensor] | None
) -> torch.Tensor:
    """The objective's loss from docs/algorithm.md, token by token (float64)."""
    targets = [batch.student.completion_ids[i, : s.size(0)] for i, s in enumerate(student)]
    logp_s = [s.gather(-1, t[:, None])[:, 0] for s, t in zip(student, targets, strict=True)]
    tokens = sum(x.numel() for x in logp_s)
    if objective == "sft":
        return -sum(x.sum() for x in logp_s) / tokens
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    if objective == "grpo":  # one rollout per prompt: the group is the batch; sample std (Bessel)
        advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        return -sum(a * x.sum() for a, x in zip(advantages, logp_s, strict=True)) / tokens
    assert teacher is not None
    if objective in ("opsd", "crisp"):
        kl = [naive_kl(objective, s, t) for s, t in zip(student, teacher, strict=True)]
        return sum(x.sum() for x in kl) / tokens
    advantages = rewards - 0.5  # warm-up baseline (no earlier steps)
    logp_t = [t.gather(-1, y[:, None])[:, 0] for t, y in zip(teacher, targets, strict=True)]
    entropy = [-(t.exp() * t).sum(-1) for t in teacher]
    gamma = 0.0 if objective == "rlsd" else SETTINGS[objective]["gamma"]
    window = SETTINGS[objective].get("window", 0)
    normaliser = max(max(float(h.max()) for h in entropy), 1.0)  # raw entropies, floored at 1 nat
    total = torch.zeros((), dtype=torch.float64)
    for a, s, t, h in zip(advantages, logp_s, logp_t, entropy, strict=True):
        gated = torch.stack([h[j : j + window + 1].min() for j in range(h.numel())])  # causal window min
        omega = (1 - gamma * gated / normaliser).clamp(0.1, 1.0)
        w = torch.exp(torch.sign(a) * (t - s)).clamp(0.8, 1.2)
        total = total + (a * w * omega * s).sum()
    return -total / tokens


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer here
@pytest.mark.parametrize("backbone", list(TOLERANCES))
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_module_quantities_and_loss_equal_a_naive_unpadded_full_logit_computation(
    tiny_model_dir, objective, backbone
):
    from transformers import AutoModelForCausalLM

    tolerance, relative = TOLERANCES[backbone]
    module = make_module(tiny_model_dir, objective, backbone)
    batch = make_batch(module)
    mask = batch.student.completion_mask  # [N, T]
    spec = module.objective_spec
    inputs = module.token_input_builders()[spec.token_inputs](batch, module.sequence_advantages(batch))
    output = module.training_step(batch, 0)

    student_model = (
        copy.deepcopy(module.policy).double().merge_and_unload()
    )  # plain transformers, LoRA merged, float64
    teacher_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)  # the bare base
    student = naive_log_probs(student_model, batch.student)
    teacher = naive_log_probs(teacher_model, batch.teacher) if batch.teacher is not None else None
    width = mask.size(1)
    targets = [batch.student.completion_ids[i, : s.size(0)] for i, s in enumerate(student)]
    expected_student = padded(
        [s.gather(-1, t[:, None])[:, 0] for s, t in zip(student, targets, strict=True)], width
    )

    def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
        actual = torch.where(mask, actual.detach().double(), torch.zeros((), dtype=torch.float64))
        torch.testing.assert_close(actual, expected, atol=tolerance, rtol=relative)

    if inputs.student_logp is not None:
        close(inputs.student_logp, expected_student)
    quantities = output["token_quantities"]
    assert torch.equal(quantities.mask, mask)
    if inputs.teacher_logp is not None:
        assert teacher is not None and inputs.teacher_entropy is not None
        expected_teacher = padded(
            [t.gather(-1, y[:, None])[:, 0] for t, y in zip(teacher, targets, strict=True)], width
        )
        expected_entropy = padded([-(t.exp() * t).sum(-1) for t in teacher], width)
        close(inputs.teacher_logp, expected_teacher)
        close(inputs.teacher_entropy, expected_entropy)
        close(quantities.teacher_entropy, expected_entropy)
        close(quantities.delta, expected_teacher - expected_student)
    else:
        assert quantities.delta is None and quantities.teacher_entropy is None
    if spec.gated:  # the normaliser the gate divided by: max(raw batch maximum, 1 nat)
        normaliser = max(float(expected_entropy.max()), 1.0)
        assert float(quantities.entropy_max) == pytest.approx(normaliser, abs=tolerance)
    else:
        assert quantities.entropy_max is None
    if inputs.token_kl is not None:
        assert teacher is not None
        close(
            inputs.token_kl,
            padded([naive_kl(objective, s, t) for s, t in zip(student, teacher, strict=True)], width),
        )
    expected_loss = naive_loss(objective, batch, student, teacher)
    torch.testing.assert_close(output["loss"].detach().double(), expected_loss, atol=tolerance, rtol=0)
    assert float(expected_loss) != 0.0  # a loss that could not be told apart from a broken one proves nothing

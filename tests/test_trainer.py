"""End to end on the tiny testbed: every objective trains the LoRA adapter and leaves the base untouched."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from egrsd_pl.callbacks.grad_norm import GradNormMonitor
from egrsd_pl.callbacks.reward_statistics import RewardStatistics
from egrsd_pl.callbacks.teacher_update import TeacherUpdate
from egrsd_pl.datamodule import RolloutDataModule
from egrsd_pl.module import EGRSDModule
from egrsd_pl.problem import Problem
from egrsd_pl.rollout.base import Rollout


class AlternatingRewards(RolloutDataModule):
    """Scores every other rollout correct, so every objective sees non-degenerate advantages
    (a barely trained tiny model is almost never right, and GRPO on equal rewards has no gradient)."""

    def score(
        self, problems: Sequence[Problem], rollouts: Sequence[Rollout]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        correct = torch.arange(len(rollouts)) % 2 == 0
        return correct.float() * 1.25, correct


OBJECTIVES = [
    ("sft", {}),
    ("grpo", {}),
    ("opsd", {}),
    ("rlsd", {}),
    ("egrsd", {"gamma": 0.3}),
    ("cl_egrsd", {"gamma": 1.0, "window": 3}),
    ("crisp", {"teacher": "hard_copy"}),
]


def fit(
    model_dir: Path,
    tmp_path: Path,
    objective: str,
    *,
    accelerator: str = "cpu",
    precision: str = "32-true",
    max_steps: int = 2,
    every_k_steps: int = 20,
    extra_callbacks: Sequence[L.Callback] = (),
    **model_kwargs,
) -> tuple[EGRSDModule, L.Trainer]:
    module = EGRSDModule(
        str(model_dir), objective=objective, lora_rank=4, lora_alpha=8, learning_rate=1e-2, **model_kwargs
    )
    data = AlternatingRewards("synthetic:64", batch_size=4, num_rollouts=2, max_new_tokens=24, max_length=512)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=max_steps,
        gradient_clip_val=0.1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[
            RewardStatistics(),
            GradNormMonitor(),
            TeacherUpdate(model_kwargs.get("teacher", "frozen"), every_k_steps=every_k_steps),
            *extra_callbacks,
        ],
    )
    trainer.fit(module, data)
    return module, trainer


@pytest.mark.slow
@pytest.mark.parametrize(("objective", "kwargs"), OBJECTIVES, ids=[o for o, _ in OBJECTIVES])
def test_objective_trains_the_adapter_only(
    tiny_model_dir: Path, tmp_path: Path, objective: str, kwargs: dict
):
    module, trainer = fit(tiny_model_dir, tmp_path, objective, **kwargs)
    assert_adapter_trained_base_untouched(module, trainer, tiny_model_dir)
    if module.objective_spec.token_inputs == "token_kl":  # opsd, crisp: the loss is the mean token KL
        kl = trainer.callback_metrics["kl/mean"]
        assert torch.isfinite(kl) and float(kl) >= 0
        assert float(kl) == pytest.approx(float(trainer.callback_metrics["train/loss"]), rel=1e-6)


class TeacherProbe(L.Callback):
    """After every optimizer step (and after ``TeacherUpdate``): is the teacher the student, or the base?"""

    def __init__(self) -> None:
        self.teacher_is_student: dict[int, bool] = {}
        self.teacher_is_base: dict[int, bool] = {}
        self.teachers: dict[int, dict[str, torch.Tensor]] = {}
        self.teacher_inputs: list[tuple[list[int], list[int]]] = []  # (packed row, concise prompt + rollout)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        for row, rollout in enumerate(batch.rollouts):
            problem = batch.problems[rollout.prompt_index].problem
            expected = pl_module.prompt_builder.concise_teacher_prompt_ids(problem) + list(
                rollout.completion_ids
            )
            self.teacher_inputs.append((batch.teacher.input_ids[row, : len(expected)].tolist(), expected))
        student, teacher = pl_module.adapter_parameters("default"), pl_module.adapter_parameters("teacher")
        self.teacher_is_student[step] = all(torch.equal(teacher[k], student[k]) for k in student)
        self.teachers[step] = {k: v.detach().clone() for k, v in teacher.items()}
        # The teacher's hidden states on this batch equal the adapter-disabled base's, bit for bit.
        with torch.no_grad():
            with pl_module.teacher.weights():
                as_teacher = pl_module.completion_hidden(batch.teacher)
            with pl_module.policy.disable_adapter():
                as_base = pl_module.completion_hidden(batch.teacher)
        self.teacher_is_base[step] = torch.equal(as_teacher, as_base)


@pytest.mark.slow
def test_crisp_teacher_is_the_base_until_the_first_refresh_then_a_copy_every_m_steps(
    tiny_model_dir: Path, tmp_path: Path
):
    probe = TeacherProbe()
    module, trainer = fit(
        tiny_model_dir,
        tmp_path,
        "crisp",
        teacher="hard_copy",
        max_steps=9,
        every_k_steps=3,
        extra_callbacks=[probe],
    )
    steps = list(range(1, 10))
    assert [s for s in steps if probe.teacher_is_student[s]] == [3, 6, 9]
    assert [s for s in steps if probe.teacher_is_base[s]] == [1, 2]  # then the student of step 3 on
    for refresh in (3, 6):  # between refreshes the teacher stays the copy made at the last one
        for later in (refresh + 1, refresh + 2):
            assert all(torch.equal(probe.teachers[later][k], v) for k, v in probe.teachers[refresh].items())
    assert not all(torch.equal(probe.teachers[6][k], v) for k, v in probe.teachers[3].items())
    assert float(trainer.callback_metrics["teacher/num_updates"]) == 3
    # The teacher read CRISP's prompt (instruction + the student's prompt, no solution) + the rollout's ids.
    assert len(probe.teacher_inputs) == 9 * 8 and all(
        row == expected for row, expected in probe.teacher_inputs
    )
    assert torch.isfinite(trainer.callback_metrics["kl/mean"])


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_bf16_mixed_training_on_cuda(tiny_model_dir: Path, tmp_path: Path, attn: str):
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    module, trainer = fit(
        tiny_model_dir,
        tmp_path,
        "cl_egrsd",
        accelerator="gpu",
        precision="bf16-mixed",
        gamma=0.3,
        window=3,
        dtype="bfloat16",
        attn_implementation=attn,
    )
    assert module.device.type == "cuda"
    assert_adapter_trained_base_untouched(module, trainer, tiny_model_dir)


def assert_adapter_trained_base_untouched(module: EGRSDModule, trainer: L.Trainer, model_dir: Path) -> None:
    assert trainer.global_step == 2
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    assert float(trainer.callback_metrics["grad/norm_preclip"]) > 0
    # LoRA B starts at zero: a trained adapter has moved it.
    lora_b = [p for n, p in module.policy.named_parameters() if "lora_B" in n]
    assert lora_b and max(float(p.detach().abs().max()) for p in lora_b) > 0
    # The base weights are bit-identical to the ones on disk.
    on_disk = load_file(str(model_dir / "model.safetensors"))
    base = module.policy.get_base_model().state_dict()
    checked = 0
    for name, tensor in on_disk.items():
        key = name if name in base else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(base[key].cpu(), tensor.to(base[key].dtype)), name
        checked += 1
    assert checked == len(on_disk)


@pytest.mark.slow
def test_rollout_objectives_log_the_documented_metrics(tiny_model_dir: Path, tmp_path: Path):
    _, trainer = fit(tiny_model_dir, tmp_path, "cl_egrsd", gamma=0.3, window=3)
    metrics = trainer.callback_metrics
    for name in [
        "train/loss",
        "train/reward_mean",
        "train/accuracy",
        "train/completion_len",
        "train/truncated_frac",
        "adv/mean",
        "gate/omega_mean",
        "gate/omega_min",
        "magnitude/clip_frac_high",
        "magnitude/clip_frac_low",
        "entropy/mean",
        "entropy/max",
        "grad/norm_preclip",
        "time/rollout_s",
    ]:
        assert name in metrics, name
    # Alternating rewards 1.25 / 0: mean 0.625, accuracy 0.5 (8 rollouts per step).
    assert float(metrics["train/reward_mean"]) == pytest.approx(0.625)
    assert float(metrics["train/accuracy"]) == pytest.approx(0.5)
    assert 0.1 <= float(metrics["gate/omega_min"]) <= float(metrics["gate/omega_mean"]) <= 1.0

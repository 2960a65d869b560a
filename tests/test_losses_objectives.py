"""The six objectives: hand-computed losses, RLSD/EGRSD/CL-EGRSD properties, registry, validation."""

import math

import pytest
import torch

from egrsd_pl.losses import (
    OBJECTIVES,
    LossStats,
    ObjectiveInputs,
    compute_objective,
    egrsd_loss,
    group_relative_advantages,
)

NAN, INF = float("nan"), float("inf")


def hand_case(requires_grad=True):
    """Two rollouts, T = 3; rollout 1 has one padded position (garbage values)."""
    student_logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -INF]], requires_grad=requires_grad)
    teacher_logp = torch.tensor([[-0.9, -2.5, -0.5], [-1.0, -0.8, NAN]])
    teacher_entropy = torch.tensor([[0.5, 2.0, 1.0], [0.0, 1.0, 5.0]])
    advantages = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return student_logp, teacher_logp, teacher_entropy, advantages, mask


def inputs_of(student_logp, teacher_logp, teacher_entropy, advantages, mask, **extra):
    return ObjectiveInputs(
        student_logp=student_logp,
        mask=mask,
        advantages=advantages,
        teacher_logp=teacher_logp,
        teacher_entropy=teacher_entropy,
        **extra,
    )


def test_egrsd_loss_hand_computed():
    student_logp, teacher_logp, teacher_entropy, advantages, mask = hand_case()
    # Raw masked max H = 2 (the padded 5.0 is excluded). γ = 0.3: ω = 1 - .3 H / 2
    #   row 0: [.925, .7, .85]; row 1: [1, .85].
    # δ = teacher - student: row 0 [.1, -.5, 0] (D = +1); row 1 [0, .2] (D = -1 -> D·δ = [0, -.2]).
    #   w row 0 = clip(exp([.1, -.5, 0]), .8, 1.2) = [1.105171, .8, 1];
    #   w row 1 = exp([0, -.2]) = [1, .818731].
    # Â = A w ω: row 0 [1.022283, .56, .85]; row 1 -.5 [1, .695921] = [-.5, -.347961].
    # L = -(1/5)(-1.022283 - 1.12 - .425 + .5 + .347961) = 0.343865.
    loss, stats = egrsd_loss(student_logp, teacher_logp, teacher_entropy, advantages, mask, gamma=0.3)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.343865), atol=1e-6, rtol=0)
    expected_grad = -torch.tensor([[1.022283, 0.56, 0.85], [-0.5, -0.347961, 0.0]]) / 5  # -Â / Σm
    torch.testing.assert_close(student_logp.grad, expected_grad, atol=1e-6, rtol=0)
    # ω mean (.925 + .7 + .85 + 1 + .85) / 5 = .865; min .7. D·δ = [.1, -.5, 0, 0, -.2]:
    # above ln 1.2 = .1823: none; below ln .8 = -.2231: one (-.5) -> 1/5.
    torch.testing.assert_close(stats.omega_mean, torch.tensor(0.865))
    torch.testing.assert_close(stats.omega_min, torch.tensor(0.7))
    assert stats.clip_frac_high.item() == 0.0
    torch.testing.assert_close(stats.clip_frac_low, torch.tensor(0.2))
    torch.testing.assert_close(stats.entropy_mean, torch.tensor(0.9))  # (.5 + 2 + 1 + 0 + 1) / 5
    assert stats.entropy_max.item() == 2.0
    assert all(not value.requires_grad for value in stats.to_dict().values())


def test_cl_egrsd_loss_hand_computed():
    student_logp, teacher_logp, teacher_entropy, advantages, mask = hand_case()
    # W = 1: H^CL row 0 = [min(.5, 2), min(2, 1), 1] = [.5, 1, 1]; row 1 = [min(0, 1), 1] = [0, 1]
    # (padding excluded). Divided by the raw max 2: ω row 0 [.925, .85, .85], row 1 [1, .85].
    # Â row 0 = [1.022283, .8 * .85 = .68, .85]; row 1 = [-.5, -.347961].
    # L = -(1/5)(-1.022283 - 1.36 - .425 + .5 + .347961) = 0.391865.
    loss, stats = compute_objective("cl_egrsd", inputs_of(*hand_case()), window=1)
    direct, _ = egrsd_loss(student_logp, teacher_logp, teacher_entropy, advantages, mask, gamma=0.3, window=1)
    torch.testing.assert_close(loss, torch.tensor(0.391865), atol=1e-6, rtol=0)
    torch.testing.assert_close(direct, loss)
    torch.testing.assert_close(stats.omega_mean, torch.tensor(0.895))  # (.925+.85+.85+1+.85)/5


def test_sft_grpo_opsd_hand_computed():
    mask = torch.tensor([[True, True], [True, False]])
    student_logp = torch.tensor([[-1.0, -2.0], [-0.5, -INF]], requires_grad=True)
    # sft: -(-1 - 2 - .5) / 3 = 1.166667.
    loss, stats = compute_objective("sft", ObjectiveInputs(student_logp, mask))
    torch.testing.assert_close(loss, torch.tensor(3.5 / 3))
    # grpo, A = [1, -1]: -(1/3)(1(-1) + 1(-2) + (-1)(-.5)) = 2.5 / 3 = .833333.
    loss, stats = compute_objective(
        "grpo", ObjectiveInputs(student_logp, mask, advantages=torch.tensor([1.0, -1.0]))
    )
    torch.testing.assert_close(loss, torch.tensor(2.5 / 3))
    assert stats == LossStats()  # nothing gated, nothing clipped, no teacher
    # opsd: KL [[.1, .3], [.2, padded 9]] -> (.1 + .3 + .2) / 3 = .2; gradient 1/3 on real tokens.
    kl = torch.tensor([[0.1, 0.3], [0.2, 9.0]], requires_grad=True)
    loss, stats = compute_objective("opsd", ObjectiveInputs(None, mask, token_kl=kl))  # no student pass
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.2))
    torch.testing.assert_close(kl.grad, torch.tensor([[1.0, 1.0], [1.0, 0.0]]) / 3)
    assert stats.kl_mean.item() == pytest.approx(0.2) and stats.omega_mean is None
    # crisp: the same masked token mean of the (reverse) KL it is given; rewards never enter.
    kl.grad = None
    loss, stats = compute_objective("crisp", ObjectiveInputs(None, mask, token_kl=kl))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.2))
    torch.testing.assert_close(kl.grad, torch.tensor([[1.0, 1.0], [1.0, 0.0]]) / 3)
    assert stats.kl_mean.item() == pytest.approx(0.2) and stats.omega_mean is None


def random_inputs(seed=0, batch=5, length=30):
    generator = torch.Generator().manual_seed(seed)
    student_logp = -3 * torch.rand(batch, length, generator=generator)
    teacher_logp = student_logp + 0.5 * torch.randn(batch, length, generator=generator)
    teacher_entropy = 3 * torch.rand(batch, length, generator=generator) ** 2
    advantages = torch.randn(batch, generator=generator)
    lengths = torch.randint(0, length + 1, (batch,), generator=generator)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    token_kl = torch.rand(batch, length, generator=generator)
    return inputs_of(
        student_logp.requires_grad_(), teacher_logp, teacher_entropy, advantages, mask, token_kl=token_kl
    )


def egrsd_arguments(inputs):
    return inputs.student_logp, inputs.teacher_logp, inputs.teacher_entropy, inputs.advantages, inputs.mask


def test_rlsd_is_egrsd_at_gamma_zero():
    inputs = random_inputs()
    rlsd, rlsd_stats = compute_objective("rlsd", inputs, gamma=0.7)  # rlsd ignores gamma
    egrsd, _ = compute_objective("egrsd", inputs, gamma=0.0)
    direct, _ = egrsd_loss(*egrsd_arguments(inputs), gamma=0.0)
    assert torch.equal(rlsd, egrsd) and torch.equal(rlsd, direct)
    assert rlsd_stats.omega_min.item() == 1.0


def test_window_zero_is_egrsd():
    inputs = random_inputs(seed=1)
    egrsd, _ = compute_objective("egrsd", inputs, gamma=0.3)
    assert torch.equal(egrsd_loss(*egrsd_arguments(inputs), gamma=0.3, window=0)[0], egrsd)


def test_gradient_flows_only_through_student_logp():
    student_logp, teacher_logp, teacher_entropy, advantages, mask = hand_case()
    teacher_logp.requires_grad_()
    teacher_entropy.requires_grad_()
    advantages.requires_grad_()
    loss, _ = egrsd_loss(student_logp, teacher_logp, teacher_entropy, advantages, mask, gamma=0.3, window=2)
    loss.backward()
    assert student_logp.grad is not None
    assert teacher_logp.grad is None and teacher_entropy.grad is None and advantages.grad is None


def trained_tensor(name, inputs):
    """The input that carries the gradient: the per-token KL for opsd and crisp, log p_θ otherwise."""
    return inputs.token_kl if name in ("opsd", "crisp") else inputs.student_logp


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_all_masked_batch_gives_zero_loss_and_finite_gradients(name):
    inputs = random_inputs(seed=2)._replace(mask=torch.zeros(5, 30, dtype=torch.bool))
    inputs.token_kl.requires_grad_()
    loss, stats = compute_objective(name, inputs, window=3 if name == "cl_egrsd" else 0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(trained_tensor(name, inputs).grad, torch.zeros(5, 30))
    assert all(torch.isfinite(value).all() for value in stats.to_dict().values())


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_appending_padding_changes_nothing(name):
    inputs = random_inputs(seed=3)
    inputs.token_kl.requires_grad_()
    window = 3 if name == "cl_egrsd" else 0
    loss, stats = compute_objective(name, inputs, window=window)
    loss.backward()

    def pad(tensor, value):
        padded = torch.cat([tensor.detach(), torch.full((5, 4), value, dtype=tensor.dtype)], dim=1)
        return padded.requires_grad_(tensor.requires_grad)

    padded = inputs._replace(
        student_logp=pad(inputs.student_logp, -INF),
        mask=pad(inputs.mask, False),
        teacher_logp=pad(inputs.teacher_logp, NAN),
        teacher_entropy=pad(inputs.teacher_entropy, 100.0),
        token_kl=pad(inputs.token_kl, NAN),
    )
    padded_loss, padded_stats = compute_objective(name, padded, window=window)
    padded_loss.backward()
    torch.testing.assert_close(padded_loss, loss, atol=1e-6, rtol=1e-6)  # summation order only
    padded_grad, grad = trained_tensor(name, padded).grad, trained_tensor(name, inputs).grad
    torch.testing.assert_close(padded_grad[:, :30], grad, atol=1e-7, rtol=0)
    assert torch.equal(padded_grad[:, 30:], torch.zeros(5, 4))
    for field, value in stats.to_dict().items():
        torch.testing.assert_close(getattr(padded_stats, field), value, atol=1e-6, rtol=1e-6)


def test_entropy_max_from_other_ranks_changes_the_gate():
    inputs = random_inputs(seed=4)
    local, local_stats = compute_objective("egrsd", inputs)
    same, _ = compute_objective("egrsd", inputs, entropy_max=local_stats.entropy_max)
    larger, larger_stats = compute_objective("egrsd", inputs, entropy_max=torch.tensor(10.0))
    assert torch.equal(local, same)
    assert larger_stats.omega_mean > local_stats.omega_mean  # a larger denominator gates less


def test_objective_registry():
    assert set(OBJECTIVES) == {"sft", "grpo", "opsd", "rlsd", "egrsd", "cl_egrsd", "crisp"}
    assert [name for name, spec in OBJECTIVES.items() if not spec.uses_rollouts] == ["sft"]
    assert {name: spec.token_inputs for name, spec in OBJECTIVES.items()} == {
        "sft": "student_logprobs",
        "grpo": "student_logprobs",
        "opsd": "token_kl",
        "rlsd": "gated_teacher",
        "egrsd": "gated_teacher",
        "cl_egrsd": "gated_teacher",
        "crisp": "token_kl",
    }
    # Only the gated objectives read the entropy maximum (rlsd's gate is 1: nothing to reduce).
    assert [name for name, spec in OBJECTIVES.items() if spec.gated] == ["egrsd", "cl_egrsd"]
    assert {name: spec.advantage for name, spec in OBJECTIVES.items()} == {
        "sft": "none",
        "grpo": "group",
        "opsd": "none",
        "rlsd": "running",
        "egrsd": "running",
        "cl_egrsd": "running",
        "crisp": "none",
    }
    # Only crisp takes the reverse KL, a conciseness-prompted teacher and a teacher that must move.
    assert {name for name, spec in OBJECTIVES.items() if spec.kl_direction == "reverse"} == {"crisp"}
    assert {name for name, spec in OBJECTIVES.items() if spec.teacher_prompt == "concise"} == {"crisp"}
    assert {name for name, spec in OBJECTIVES.items() if spec.moving_teacher} == {"crisp"}
    assert LossStats().to_dict() == {}


def test_group_relative_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5, 2.0])
    group_ids = torch.tensor([7, 7, 7, 3, 3, 9])
    # Group 7: mean 2/3, sample std sqrt(((1/3)² + (2/3)² + (1/3)²) / 2) = sqrt(1/3) = .577350
    #   -> [(1/3)/.57735, (-2/3)/.57735, (1/3)/.57735] = [.577350, -1.154701, .577350].
    # Group 3: zero std -> 0. Group 9: a group of one -> 0.
    advantages = group_relative_advantages(rewards, group_ids, eps=0.0)
    expected = torch.tensor([1 / math.sqrt(3), -2 / math.sqrt(3), 1 / math.sqrt(3), 0.0, 0.0, 0.0])
    torch.testing.assert_close(advantages, expected)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"gamma": -0.1}, "gamma"),
        ({"window": -1}, "window"),
        ({"eps": 0.0}, "eps"),
        ({"eps": 1.0}, "eps"),
        ({"eps": -0.5}, "eps"),
        ({"omega_floor": -0.1}, "omega_floor"),
        ({"entropy_max": torch.ones(2)}, "entropy_max"),
        ({"teacher_logp": torch.zeros(2, 2)}, "teacher_logp"),
        ({"teacher_entropy": torch.zeros(2, 4)}, "teacher_entropy"),
        ({"advantages": torch.zeros(3)}, "advantages"),
        ({"mask": torch.ones(2, 3)}, "mask"),
        ({"student_logp": torch.zeros(6)}, "student_logp"),
    ],
)
def test_egrsd_loss_bad_arguments_raise_value_error_naming_them(kwargs, argument):
    names = ("student_logp", "teacher_logp", "teacher_entropy", "advantages", "mask")
    tensors = dict(zip(names, hand_case(requires_grad=False), strict=True))
    options = {"gamma": 0.3}
    for key, value in kwargs.items():
        (tensors if key in names else options)[key] = value
    with pytest.raises(ValueError, match=argument):
        egrsd_loss(*(tensors[name] for name in names), **options)


@pytest.mark.parametrize(
    ("name", "kwargs", "field", "argument"),
    [
        ("ppo", {}, None, "name"),
        ("egrsd", {"window": 3}, None, "window"),
        ("cl_egrsd", {"window": 0}, None, "window"),
        ("grpo", {"window": 2}, None, "window"),
        ("egrsd", {"gamma": -1.0}, None, "gamma"),
        ("sft", {"eps": 2.0}, None, "eps"),
        ("egrsd", {}, "teacher_entropy", "teacher_entropy"),
        ("rlsd", {}, "teacher_logp", "teacher_logp"),
        ("grpo", {}, "advantages", "advantages"),
        ("opsd", {}, "token_kl", "token_kl"),
        ("crisp", {}, "token_kl", "token_kl"),
        ("crisp", {"window": 1}, None, "window"),
    ],
)
def test_compute_objective_bad_arguments(name, kwargs, field, argument):
    inputs = random_inputs(seed=5)
    if field is not None:
        inputs = inputs._replace(**{field: None})
    with pytest.raises(ValueError, match=argument):
        compute_objective(name, inputs, **kwargs)


def test_group_relative_advantages_bad_arguments():
    with pytest.raises(ValueError, match="group_ids"):
        group_relative_advantages(torch.ones(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids"):
        group_relative_advantages(torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="rewards"):
        group_relative_advantages(torch.ones(3, 1), torch.zeros(3, dtype=torch.long))

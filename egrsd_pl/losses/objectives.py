"""The seven training objectives behind one signature and one name switch (SPEC "The objectives").

Every objective is ``loss(inputs, *, gamma, window, eps, floor, entropy_max) -> (loss, stats)``;
:data:`OBJECTIVES` maps a name to it plus what the trainer must prepare (rollouts, teacher
quantities, advantages). ``rlsd`` is the ``egrsd`` path with ``gamma = 0``, not a copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from egrsd_pl.losses._checks import (
    check_bool_mask,
    check_entropy_max,
    check_eps,
    check_floor,
    check_gamma,
    check_ndim,
    check_shape,
    check_window,
)
from egrsd_pl.losses.token_weights import (
    confidence_gate,
    likelihood_ratio_magnitude,
    masked_max,
    masked_mean,
    masked_min,
    policy_gradient_loss,
    token_advantages,
)
from egrsd_pl.losses.vocabulary import KLDirection

ObjectiveName = Literal["sft", "grpo", "opsd", "rlsd", "egrsd", "cl_egrsd", "crisp"]
EntropyMax = float | Tensor | None  # an already-reduced batch maximum of the raw entropies, or None


class ObjectiveInputs(NamedTuple):
    """Per-token tensors an objective reads; each objective names the ones it requires."""

    student_logp: Tensor  # [B, T] log p_θ(y_t) with grad (sft: tokens of the reference solution)
    mask: Tensor  # [B, T] bool
    advantages: Tensor | None = None  # [B] A_i: running statistics (rlsd/egrsd/cl_egrsd), group (grpo)
    teacher_logp: Tensor | None = None  # [B, T] log p_T(y_t)
    teacher_entropy: Tensor | None = None  # [B, T] H_t in nats
    token_kl: Tensor | None = None  # [B, T] with grad: KL(p_T || p_θ) (opsd) or KL(p_θ || p_T) (crisp)


class LossStats(NamedTuple):
    """Detached 0-dim statistics of one loss evaluation; ``None`` where an objective has no such quantity.

    Means, minima and maxima are over the masked tokens (0 when there are none).
    """

    num_tokens: Tensor | None = None  # Σ m
    student_logp_mean: Tensor | None = None  # mean log p_θ(y_t)
    omega_mean: Tensor | None = None  # mean confidence gate ω
    omega_min: Tensor | None = None
    clip_frac_high: Tensor | None = None  # fraction of tokens with exp(D·δ) > 1 + ε
    clip_frac_low: Tensor | None = None  # fraction of tokens with exp(D·δ) < 1 - ε
    magnitude_mean: Tensor | None = None  # mean w
    logp_gap_mean: Tensor | None = None  # mean δ = log p_T(y_t) - log p_S(y_t)
    entropy_mean: Tensor | None = None  # mean raw teacher entropy
    entropy_max: Tensor | None = None  # local max of the raw teacher entropy (before any all-reduce)
    token_adv_mean: Tensor | None = None  # mean Â
    kl_mean: Tensor | None = None  # mean token KL (opsd: forward, crisp: reverse)

    def to_dict(self) -> dict[str, Tensor]:
        """The statistics that are set, by field name."""
        return {name: value for name, value in self._asdict().items() if value is not None}


def egrsd_loss(
    student_logp: Tensor,
    teacher_logp: Tensor,
    teacher_entropy: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    window: int = 0,
    eps: float = 0.2,
    floor: float = 0.1,
    entropy_max: EntropyMax = None,
) -> tuple[Tensor, LossStats]:
    """EGRSD (``window = 0``) and CL-EGRSD (``window > 0``) loss, Algorithm 1 steps 6-11.

    ``ω = confidence_gate(H)``, ``w = clip(exp(sign(A_i)·δ), 1 - ε, 1 + ε)``, ``Â = A_i·w·ω``
    (constant) and ``L = -(1 / Σ m) Σ m·Â·log p_θ(y_t)``. ``gamma = 0`` is RLSD.

    Args:
        student_logp: ``[B, T]`` ``log p_θ(y_t)``, the only input that carries gradient.
        teacher_logp: ``[B, T]`` ``log p_T(y_t)`` (constant).
        teacher_entropy: ``[B, T]`` raw teacher entropies in nats (constant).
        advantages: ``[B]`` sequence advantages ``A_i`` (constant).
        mask: ``[B, T]`` bool completion mask.
        gamma: ``γ >= 0`` of the confidence gate.
        window: CL window ``W >= 0``; 0 is EGRSD.
        eps: Magnitude clip ``ε`` in ``(0, 1)``.
        floor: Lower clip of ``ω``.
        entropy_max: Already-reduced maximum of the raw masked entropies (e.g. across ranks), or
            ``None`` for this batch's; see :func:`~egrsd_pl.losses.confidence_gate`.

    Returns:
        ``(loss, stats)``: a 0-dim loss (0 when ``Σ m = 0``) and detached :class:`LossStats`.
    """
    check_ndim(student_logp, 2, "student_logp")
    shape = tuple(student_logp.shape)
    check_shape(teacher_logp, shape, "teacher_logp")
    check_shape(teacher_entropy, shape, "teacher_entropy")
    check_shape(advantages, shape[:1], "advantages")
    check_bool_mask(mask, shape=shape)
    teacher_logp, teacher_entropy, advantages = (
        teacher_logp.detach(),
        teacher_entropy.detach(),
        advantages.detach(),
    )

    omega = confidence_gate(  # [B, T]
        teacher_entropy, mask, gamma=gamma, window=window, floor=floor, entropy_max=entropy_max
    )
    direction = torch.sign(advantages)  # [B] D_i
    magnitude = likelihood_ratio_magnitude(student_logp, teacher_logp, direction, eps)  # [B, T]
    token_advantage = token_advantages(advantages, magnitude, omega, mask)  # [B, T]
    loss = policy_gradient_loss(token_advantage, student_logp, mask)

    with torch.no_grad():
        logp_gap = teacher_logp - student_logp.detach()  # [B, T] δ
        signed_log_ratio = direction[:, None] * logp_gap  # [B, T] D·δ
        stats = LossStats(
            num_tokens=mask.sum(),
            student_logp_mean=masked_mean(student_logp.detach(), mask),
            omega_mean=masked_mean(omega, mask),
            omega_min=masked_min(omega, mask),
            clip_frac_high=masked_mean((signed_log_ratio > math.log1p(eps)).float(), mask),
            clip_frac_low=masked_mean((signed_log_ratio < math.log1p(-eps)).float(), mask),
            magnitude_mean=masked_mean(magnitude, mask),
            logp_gap_mean=masked_mean(logp_gap, mask),
            entropy_mean=masked_mean(teacher_entropy, mask),
            entropy_max=masked_max(teacher_entropy, mask),
            token_adv_mean=masked_mean(token_advantage, mask),
        )
    return loss, stats


def _require(inputs: ObjectiveInputs, field: str, objective: str) -> Tensor:
    value = getattr(inputs, field)
    if value is None:
        raise ValueError(f"inputs.{field} is required by the {objective!r} objective")
    return value


# Every objective has this signature; hyperparameters it does not use are ignored.
#   objective(inputs, *, gamma, window, eps, floor, entropy_max) -> (loss, stats)


def sft_objective(
    inputs: ObjectiveInputs, *, gamma: float, window: int, eps: float, floor: float, entropy_max: EntropyMax
) -> tuple[Tensor, LossStats]:
    """Cross-entropy on the reference solution: ``L = -masked_mean(log p_θ(s*_t))``."""
    loss = -masked_mean(inputs.student_logp, inputs.mask)
    stats = LossStats(num_tokens=inputs.mask.sum(), student_logp_mean=-loss.detach())
    return loss, stats


def grpo_objective(
    inputs: ObjectiveInputs, *, gamma: float, window: int, eps: float, floor: float, entropy_max: EntropyMax
) -> tuple[Tensor, LossStats]:
    """On-policy GRPO: ``L = -(1 / Σ m) Σ m·A_i·log p_θ(y_t)`` with group-relative ``A_i``.

    Decision (ours): one optimizer update per batch of fresh rollouts, so the PPO importance
    ratio is identically 1 and its clipping never acts; the loss is the plain policy gradient,
    token-level normalised like the other objectives. No KL penalty to a reference model.
    """
    advantages = _require(inputs, "advantages", "grpo").detach()  # [B]
    ones = torch.ones_like(inputs.student_logp.detach())  # [B, T] uniform magnitude, no gate
    token_advantage = token_advantages(advantages, ones, ones, inputs.mask)  # [B, T]
    loss = policy_gradient_loss(token_advantage, inputs.student_logp, inputs.mask)
    stats = LossStats(
        num_tokens=inputs.mask.sum(),
        student_logp_mean=masked_mean(inputs.student_logp.detach(), inputs.mask),
        token_adv_mean=masked_mean(token_advantage, inputs.mask),
    )
    return loss, stats


def _token_kl_objective(inputs: ObjectiveInputs, objective: str) -> tuple[Tensor, LossStats]:
    kl = _require(inputs, "token_kl", objective)  # [B, T]
    loss = masked_mean(kl, inputs.mask)
    stats = LossStats(
        num_tokens=inputs.mask.sum(),
        student_logp_mean=masked_mean(inputs.student_logp.detach(), inputs.mask),
        kl_mean=loss.detach(),
    )
    return loss, stats


def opsd_objective(
    inputs: ObjectiveInputs, *, gamma: float, window: int, eps: float, floor: float, entropy_max: EntropyMax
) -> tuple[Tensor, LossStats]:
    """OPSD: ``L = masked_mean(KL(p_T ‖ p_θ))`` over the student's own rollout tokens."""
    return _token_kl_objective(inputs, "opsd")


def crisp_objective(
    inputs: ObjectiveInputs, *, gamma: float, window: int, eps: float, floor: float, entropy_max: EntropyMax
) -> tuple[Tensor, LossStats]:
    """CRISP: ``L = masked_mean(KL(p_θ ‖ p_T))``, the reverse KL to a conciseness-prompted teacher.

    ``inputs.token_kl`` must be the reverse KL (:func:`~egrsd_pl.losses.token_kl` with
    ``direction="reverse"``; :data:`OBJECTIVES` tells the trainer). No reward enters the loss.
    """
    return _token_kl_objective(inputs, "crisp")


def _entropy_gated_objective(
    inputs: ObjectiveInputs,
    objective: str,
    *,
    gamma: float,
    window: int,
    eps: float,
    floor: float,
    entropy_max: EntropyMax,
) -> tuple[Tensor, LossStats]:
    return egrsd_loss(
        inputs.student_logp,
        _require(inputs, "teacher_logp", objective),
        _require(inputs, "teacher_entropy", objective),
        _require(inputs, "advantages", objective),
        inputs.mask,
        gamma=gamma,
        window=window,
        eps=eps,
        floor=floor,
        entropy_max=entropy_max,
    )


def rlsd_objective(
    inputs: ObjectiveInputs, *, gamma: float, window: int, eps: float, floor: float, entropy_max: EntropyMax
) -> tuple[Tensor, LossStats]:
    """RLSD = the EGRSD path with ``gamma = 0`` and ``window = 0`` (``ω = 1``); ``gamma`` is ignored."""
    return _entropy_gated_objective(
        inputs, "rlsd", gamma=0.0, window=0, eps=eps, floor=floor, entropy_max=None
    )


def egrsd_objective(
    inputs: ObjectiveInputs, *, gamma: float, window: int, eps: float, floor: float, entropy_max: EntropyMax
) -> tuple[Tensor, LossStats]:
    """EGRSD: the gate uses the raw teacher entropy; requires ``window == 0``."""
    if window != 0:
        raise ValueError(f"window must be 0 for 'egrsd' (use 'cl_egrsd' for a window), got {window}")
    return _entropy_gated_objective(
        inputs, "egrsd", gamma=gamma, window=0, eps=eps, floor=floor, entropy_max=entropy_max
    )


def cl_egrsd_objective(
    inputs: ObjectiveInputs, *, gamma: float, window: int, eps: float, floor: float, entropy_max: EntropyMax
) -> tuple[Tensor, LossStats]:
    """CL-EGRSD: the gate uses the causal window minimum of the entropy; requires ``window > 0``."""
    if window <= 0:
        raise ValueError(f"window must be > 0 for 'cl_egrsd', got {window}")
    return _entropy_gated_objective(
        inputs, "cl_egrsd", gamma=gamma, window=window, eps=eps, floor=floor, entropy_max=entropy_max
    )


@dataclass(frozen=True)
class ObjectiveSpec:
    """An objective and what the trainer must prepare for it.

    Attributes:
        loss: ``loss(inputs, *, gamma, window, eps, floor, entropy_max) -> (loss, stats)``.
        uses_rollouts: False only for ``sft``, which trains on the reference solution.
        teacher: Teacher quantity to compute: ``"token_stats"`` (:func:`teacher_token_stats`),
            ``"kl"`` (:func:`token_kl`) or ``"none"``.
        advantage: ``"running"`` (Welford baseline, computed by the module), ``"group"``
            (:func:`group_relative_advantages`) or ``"none"``.
        kl_direction: ``direction`` of :func:`token_kl` when ``teacher == "kl"``.
        teacher_prompt: ``"reference"`` (problem + reference solution, SPEC "Prompts") or
            ``"concise"`` (CRISP: the student prompt behind a conciseness instruction, no solution).
        moving_teacher: The teacher must be refreshed from the student (CRISP); a ``frozen``
            schedule is refused.
    """

    loss: Callable[..., tuple[Tensor, LossStats]]
    uses_rollouts: bool
    teacher: Literal["none", "token_stats", "kl"]
    advantage: Literal["none", "running", "group"]
    kl_direction: KLDirection = "forward"
    teacher_prompt: Literal["reference", "concise"] = "reference"
    moving_teacher: bool = False


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "sft": ObjectiveSpec(sft_objective, uses_rollouts=False, teacher="none", advantage="none"),
    "grpo": ObjectiveSpec(grpo_objective, uses_rollouts=True, teacher="none", advantage="group"),
    "opsd": ObjectiveSpec(opsd_objective, uses_rollouts=True, teacher="kl", advantage="none"),
    "rlsd": ObjectiveSpec(rlsd_objective, uses_rollouts=True, teacher="token_stats", advantage="running"),
    "egrsd": ObjectiveSpec(egrsd_objective, uses_rollouts=True, teacher="token_stats", advantage="running"),
    "cl_egrsd": ObjectiveSpec(
        cl_egrsd_objective, uses_rollouts=True, teacher="token_stats", advantage="running"
    ),
    "crisp": ObjectiveSpec(
        crisp_objective,
        uses_rollouts=True,
        teacher="kl",
        advantage="none",
        kl_direction="reverse",
        teacher_prompt="concise",
        moving_teacher=True,
    ),
}


def compute_objective(
    name: ObjectiveName,
    inputs: ObjectiveInputs,
    *,
    gamma: float = 0.3,
    window: int = 0,
    eps: float = 0.2,
    floor: float = 0.1,
    entropy_max: EntropyMax = None,
) -> tuple[Tensor, LossStats]:
    """Look up the objective ``name`` in :data:`OBJECTIVES` and evaluate it.

    Hyperparameters an objective does not use are ignored (``rlsd`` ignores ``gamma``); all are
    validated. ``window`` must be 0 except for ``cl_egrsd``, where it must be positive.

    Returns:
        ``(loss, stats)``: 0-dim loss with gradient and detached :class:`LossStats`.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"name must be one of {sorted(OBJECTIVES)}, got {name!r}")
    check_gamma(gamma)
    check_window(window)
    check_eps(eps)
    check_floor(floor)
    check_entropy_max(entropy_max)
    check_ndim(inputs.student_logp, 2, "inputs.student_logp")
    check_bool_mask(inputs.mask, shape=tuple(inputs.student_logp.shape), name="inputs.mask")
    if name not in ("egrsd", "cl_egrsd") and window != 0:
        raise ValueError(f"window must be 0 for {name!r}, got {window}")
    spec = OBJECTIVES[name]
    return spec.loss(inputs, gamma=gamma, window=window, eps=eps, floor=floor, entropy_max=entropy_max)


def group_relative_advantages(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6) -> Tensor:
    """GRPO advantages ``A_i = (r_i - mean_g) / (std_g + eps)`` within each prompt group ``g``.

    Decision (ours, SPEC is silent): ``std_g`` is the sample standard deviation (Bessel-corrected,
    as in TRL). A group of one, or one whose rewards are all equal, gets advantage 0.

    Args:
        rewards: ``[N]`` float rewards.
        group_ids: ``[N]`` integer id of each rollout's prompt group (any values).
        eps: Added to the standard deviation.

    Returns:
        ``[N]`` advantages, same dtype as ``rewards``.
    """
    check_ndim(rewards, 1, "rewards")
    check_shape(group_ids, tuple(rewards.shape), "group_ids")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if rewards.numel() == 0:
        return rewards.clone()
    _, group = torch.unique(group_ids, return_inverse=True)  # [N] in 0..G-1
    num_groups = int(group.max()) + 1
    counts = torch.bincount(group, minlength=num_groups).to(rewards.dtype)  # [G]
    means = rewards.new_zeros(num_groups).index_add_(0, group, rewards) / counts  # [G]
    deviations = rewards - means[group]  # [N]
    squares = rewards.new_zeros(num_groups).index_add_(0, group, deviations**2)  # [G]
    stds = (squares / (counts - 1).clamp(min=1)).sqrt()  # [G]
    advantages = deviations / (stds[group] + eps)  # [N]
    defined = (counts[group] > 1) & (stds[group] > 0)  # [N]
    return torch.where(defined, advantages, torch.zeros_like(advantages))

"""The seven training objectives behind one signature and one name switch (docs/algorithm.md#objectives).

Every objective is ``loss(inputs, settings) -> (loss, stats)`` (:class:`ObjectiveSettings`);
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
    check_ndim,
    check_shape,
)
from egrsd_pl.losses.gate import DEFAULT_GATE, GateConfig, check_objective_window
from egrsd_pl.losses.token_weights import (
    EntropyMax,
    _confidence_gate,
    _entropy_normaliser,
    _likelihood_ratio_magnitude,
    _masked_max,
    _masked_mean,
    _masked_min,
    _policy_gradient_loss,
    _token_advantages,
)
from egrsd_pl.losses.vocabulary import KLDirection

ObjectiveName = Literal["sft", "grpo", "opsd", "rlsd", "egrsd", "cl_egrsd", "crisp"]


class ObjectiveInputs(NamedTuple):
    """Per-token tensors an objective reads; each objective names the ones it requires."""

    student_logp: Tensor | None  # [B, T] log p_θ(y_t) with grad (sft: the reference solution); opsd: None
    mask: Tensor  # [B, T] bool
    advantages: Tensor | None = None  # [B] A_i: running statistics (rlsd/egrsd/cl_egrsd), group (grpo)
    teacher_logp: Tensor | None = None  # [B, T] log p_T(y_t)
    teacher_entropy: Tensor | None = None  # [B, T] H_t in nats
    token_kl: Tensor | None = None  # [B, T] with grad: KL(p_T || p_θ) (opsd) or KL(p_θ || p_T) (crisp)
    # [B, T] truncated importance weights ρ of off-policy rollouts (constant), or None: on-policy (ρ = 1).
    # Read by the objectives whose loss is Σ Â·log p_θ(y_t) (grpo, rlsd, egrsd, cl_egrsd); sft, opsd and crisp
    # have no sampled-token term to reweight (docs/algorithm.md#off-policy-rollouts-one-step-async).
    importance_weights: Tensor | None = None


class LossStats(NamedTuple):
    """Detached 0-dim statistics of one loss evaluation; ``None`` where an objective has no such quantity.

    Means, minima and maxima are over the masked tokens (0 when there are none); the module logs each
    of them (``gate/*``, ``magnitude/*``, ``entropy/*``, ``kl/*``).
    """

    omega_mean: Tensor | None = None  # mean confidence gate ω
    omega_min: Tensor | None = None
    clip_frac_high: Tensor | None = None  # fraction of tokens with exp(D·δ) > 1 + ε
    clip_frac_low: Tensor | None = None  # fraction of tokens with exp(D·δ) < 1 - ε
    entropy_mean: Tensor | None = None  # mean raw teacher entropy
    entropy_max: Tensor | None = None  # local max of the raw teacher entropy (before any all-reduce)
    kl_mean: Tensor | None = None  # mean token KL (opsd: forward, crisp: reverse)

    def to_dict(self) -> dict[str, Tensor]:
        """The statistics that are set, by field name."""
        return {name: value for name, value in self._asdict().items() if value is not None}


class TokenQuantities(NamedTuple):
    """Detached per-token quantities of one training step: ``outputs["token_quantities"]`` in callbacks.

    Attributes:
        mask: ``[B, T]`` bool completion mask.
        teacher_entropy: ``[B, T]`` raw teacher entropy in nats, or ``None`` (objectives without it).
        delta: ``[B, T]`` ``δ = log p_T(y_t) − log p_S(y_t)``, or ``None``.
        entropy_max: 0-dim normaliser the gate actually divided by, ``max(H_max, 1 nat)`` after any
            all-reduce (``--model.entropy_scope global``), or ``None`` when no gate reads it.
        omega: ``[B, T]`` confidence gate ``ω`` the step weighted each token by (1 at padding), or
            ``None`` when no gate reads the entropy.
    """

    mask: Tensor
    teacher_entropy: Tensor | None
    delta: Tensor | None
    entropy_max: Tensor | None
    omega: Tensor | None = None


def token_quantities(
    inputs: ObjectiveInputs, entropy_max: Tensor | None, omega: Tensor | None = None
) -> TokenQuantities:
    """The :class:`TokenQuantities` of one step's objective inputs (detached).

    Args:
        inputs: The objective's inputs of the step.
        entropy_max: The raw entropy maximum the gate read (after any all-reduce), or ``None``.
        omega: ``[B, T]`` the gate of the step, or ``None``.
    """
    delta = None
    if inputs.teacher_logp is not None and inputs.student_logp is not None:
        delta = (inputs.teacher_logp - inputs.student_logp).detach()  # [B, T]
    entropy = inputs.teacher_entropy.detach() if inputs.teacher_entropy is not None else None  # [B, T]
    normaliser = _entropy_normaliser(entropy_max.detach()) if entropy_max is not None else None  # []
    return TokenQuantities(
        inputs.mask, entropy, delta, normaliser, omega.detach() if omega is not None else None
    )


class ObjectiveSettings(NamedTuple):
    """The hyperparameters every objective receives (validated by :func:`compute_objective`); each reads
    the ones it uses: ``objective(inputs, settings) -> (loss, stats)``."""

    gamma: float = DEFAULT_GATE.gamma  # γ of the confidence gate
    window: int = DEFAULT_GATE.window  # CL look-ahead W (cl_egrsd only)
    eps: float = 0.2  # magnitude clip ε
    omega_floor: float = DEFAULT_GATE.omega_floor  # lower clip of ω
    entropy_max: EntropyMax = None  # already-reduced raw entropy maximum, or None for this batch's


def egrsd_loss(
    student_logp: Tensor,
    teacher_logp: Tensor,
    teacher_entropy: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    window: int = DEFAULT_GATE.window,
    eps: float = 0.2,
    omega_floor: float = DEFAULT_GATE.omega_floor,
    entropy_max: EntropyMax = None,
    importance_weights: Tensor | None = None,
) -> tuple[Tensor, LossStats]:
    """EGRSD (``window = 0``) and CL-EGRSD (``window > 0``) loss, Algorithm 1 steps 6-11.

    ``ω = confidence_gate(H)``, ``w = clip(exp(sign(A_i)·δ), 1 - ε, 1 + ε)``, ``Â = A_i·w·ω``
    (constant) and ``L = -(1 / Σ m) Σ m·Â·log p_θ(y_t)``. ``gamma = 0`` is RLSD. Off-policy rollouts
    multiply ``Â`` by their truncated importance weights ``ρ`` (``importance_weights``).

    Args:
        student_logp: ``[B, T]`` ``log p_θ(y_t)``, the only input that carries gradient.
        teacher_logp: ``[B, T]`` ``log p_T(y_t)`` (constant).
        teacher_entropy: ``[B, T]`` raw teacher entropies in nats (constant).
        advantages: ``[B]`` sequence advantages ``A_i`` (constant).
        mask: ``[B, T]`` bool completion mask.
        gamma: ``γ >= 0`` of the confidence gate.
        window: CL window ``W >= 0``; 0 is EGRSD.
        eps: Magnitude clip ``ε`` in ``(0, 1)``.
        omega_floor: Lower clip of ``ω``.
        entropy_max: Already-reduced maximum of the raw masked entropies (e.g. across ranks), or
            ``None`` for this batch's; see :func:`~egrsd_pl.losses.confidence_gate`.
        importance_weights: ``[B, T]`` ``ρ`` (constant) of off-policy rollouts, or ``None`` (``ρ = 1``).

    Returns:
        ``(loss, stats)``: a 0-dim loss (0 when ``Σ m = 0``) and detached :class:`LossStats`.
    """
    check_ndim(student_logp, 2, "student_logp")
    shape = tuple(student_logp.shape)
    check_shape(teacher_logp, shape, "teacher_logp")
    check_shape(teacher_entropy, shape, "teacher_entropy")
    check_shape(advantages, shape[:1], "advantages")
    check_bool_mask(mask, shape=shape)
    if importance_weights is not None:
        check_shape(importance_weights, shape, "importance_weights")
    settings = ObjectiveSettings(gamma, window, eps, omega_floor, entropy_max)
    _check_settings(settings)
    return _egrsd_loss(
        student_logp, teacher_logp, teacher_entropy, advantages, mask, settings, importance_weights
    )


def _egrsd_loss(
    student_logp: Tensor,
    teacher_logp: Tensor,
    teacher_entropy: Tensor,
    advantages: Tensor,
    mask: Tensor,
    settings: ObjectiveSettings,
    importance_weights: Tensor | None = None,
) -> tuple[Tensor, LossStats]:
    gamma, window, eps, omega_floor, entropy_max = settings
    teacher_logp, teacher_entropy, advantages = (
        teacher_logp.detach(),
        teacher_entropy.detach(),
        advantages.detach(),
    )

    omega = _confidence_gate(  # [B, T]
        teacher_entropy, mask, gamma=gamma, window=window, omega_floor=omega_floor, entropy_max=entropy_max
    )
    direction = torch.sign(advantages)  # [B] D_i
    magnitude = _likelihood_ratio_magnitude(student_logp, teacher_logp, direction, eps)  # [B, T]
    token_advantage = _off_policy_corrected(
        _token_advantages(advantages, magnitude, omega, mask), importance_weights
    )  # [B, T] A·w·ω (·ρ)
    loss = _policy_gradient_loss(token_advantage, student_logp, mask)

    with torch.no_grad():
        logp_gap = teacher_logp - student_logp.detach()  # [B, T] δ
        signed_log_ratio = direction[:, None] * logp_gap  # [B, T] D·δ
        stats = LossStats(
            omega_mean=_masked_mean(omega, mask),
            omega_min=_masked_min(omega, mask),
            clip_frac_high=_masked_mean((signed_log_ratio > math.log1p(eps)).float(), mask),
            clip_frac_low=_masked_mean((signed_log_ratio < math.log1p(-eps)).float(), mask),
            entropy_mean=_masked_mean(teacher_entropy, mask),
            entropy_max=_masked_max(teacher_entropy, mask),
        )
    return loss, stats


def _off_policy_corrected(token_advantage: Tensor, importance_weights: Tensor | None) -> Tensor:
    """``Â·ρ`` for off-policy rollouts (docs/algorithm.md#off-policy-rollouts-one-step-async), ``Â`` on-policy."""
    if importance_weights is None:
        return token_advantage
    return token_advantage * importance_weights.detach()  # [B, T]


def _require(inputs: ObjectiveInputs, field: str, objective: str) -> Tensor:
    value = getattr(inputs, field)
    if value is None:
        raise ValueError(f"inputs.{field} is required by the {objective!r} objective")
    return value


def sft_objective(inputs: ObjectiveInputs, settings: ObjectiveSettings) -> tuple[Tensor, LossStats]:
    """Cross-entropy on the reference solution: ``L = -masked_mean(log p_θ(s*_t))``."""
    loss = -_masked_mean(_require(inputs, "student_logp", "sft"), inputs.mask)
    return loss, LossStats()


def grpo_objective(inputs: ObjectiveInputs, settings: ObjectiveSettings) -> tuple[Tensor, LossStats]:
    """On-policy GRPO: ``L = -(1 / Σ m) Σ m·A_i·log p_θ(y_t)`` with group-relative ``A_i``.

    Decision (ours): one optimizer update per batch of fresh rollouts, so the PPO importance
    ratio is identically 1 and its clipping never acts; the loss is the plain policy gradient,
    token-level normalised like the other objectives. No KL penalty to a reference model. One-step-async
    rollouts multiply ``A_i`` by the truncated importance weight ``ρ`` (``inputs.importance_weights``).
    """
    advantages = _require(inputs, "advantages", "grpo").detach()  # [B]
    student_logp = _require(inputs, "student_logp", "grpo")  # [B, T]
    ones = torch.ones_like(student_logp.detach())  # [B, T] uniform magnitude, no gate
    token_advantage = _off_policy_corrected(
        _token_advantages(advantages, ones, ones, inputs.mask), inputs.importance_weights
    )  # [B, T] A_i (·ρ)
    return _policy_gradient_loss(token_advantage, student_logp, inputs.mask), LossStats()


def _token_kl_objective(inputs: ObjectiveInputs, objective: str) -> tuple[Tensor, LossStats]:
    kl = _require(inputs, "token_kl", objective)  # [B, T]
    loss = _masked_mean(kl, inputs.mask)
    return loss, LossStats(kl_mean=loss.detach())


def opsd_objective(inputs: ObjectiveInputs, settings: ObjectiveSettings) -> tuple[Tensor, LossStats]:
    """OPSD: ``L = masked_mean(KL(p_T ‖ p_θ))`` over the student's own rollout tokens."""
    return _token_kl_objective(inputs, "opsd")


def crisp_objective(inputs: ObjectiveInputs, settings: ObjectiveSettings) -> tuple[Tensor, LossStats]:
    """CRISP: ``L = masked_mean(KL(p_θ ‖ p_T))``, the reverse KL to a conciseness-prompted teacher.

    ``inputs.token_kl`` must be the reverse KL (:func:`~egrsd_pl.losses.token_kl` with
    ``direction="reverse"``; :data:`OBJECTIVES` tells the trainer). No reward enters the loss.
    """
    return _token_kl_objective(inputs, "crisp")


def _entropy_gated_objective(
    inputs: ObjectiveInputs, objective: str, settings: ObjectiveSettings
) -> tuple[Tensor, LossStats]:
    return _egrsd_loss(
        _require(inputs, "student_logp", objective),
        _require(inputs, "teacher_logp", objective),
        _require(inputs, "teacher_entropy", objective),
        _require(inputs, "advantages", objective),
        inputs.mask,
        settings,
        inputs.importance_weights,
    )


def rlsd_objective(inputs: ObjectiveInputs, settings: ObjectiveSettings) -> tuple[Tensor, LossStats]:
    """RLSD = the EGRSD path with ``gamma = 0`` and ``window = 0`` (``ω = 1``); ``gamma`` is ignored."""
    return _entropy_gated_objective(inputs, "rlsd", settings._replace(gamma=0.0, window=0, entropy_max=None))


def egrsd_objective(inputs: ObjectiveInputs, settings: ObjectiveSettings) -> tuple[Tensor, LossStats]:
    """EGRSD: the gate uses the raw teacher entropy (``window`` is 0, checked by :func:`compute_objective`)."""
    return _entropy_gated_objective(inputs, "egrsd", settings)


def cl_egrsd_objective(inputs: ObjectiveInputs, settings: ObjectiveSettings) -> tuple[Tensor, LossStats]:
    """CL-EGRSD: the gate uses the causal window minimum of the entropy (``window > 0``, checked by
    :func:`compute_objective`)."""
    return _entropy_gated_objective(inputs, "cl_egrsd", settings)


TokenInputs = Literal["student_logprobs", "gated_teacher", "token_kl"]


@dataclass(frozen=True)
class ObjectiveSpec:
    """An objective and what the trainer must prepare for it.

    Attributes:
        loss: ``loss(inputs, settings) -> (loss, stats)`` (:class:`ObjectiveSettings`).
        uses_rollouts: False only for ``sft``, which trains on the reference solution.
        token_inputs: The per-token quantities of steps 4–5 it reads: ``student_logprobs``
            (``log p_θ(y_t)`` only), ``gated_teacher`` (also the teacher's ``log p_T(y_t)`` and entropy,
            :func:`teacher_token_stats`) or ``token_kl`` (:func:`token_kl` only, in ``kl_direction``).
        advantage: ``"running"`` (Welford baseline), ``"group"`` (:func:`group_relative_advantages`)
            or ``"none"``.
        gated: Whether the confidence gate reads the batch maximum of the teacher entropy (step 7).
        kl_direction: ``direction`` of :func:`token_kl` when ``token_inputs == "token_kl"``.
        teacher_prompt: ``"reference"`` (problem + reference solution, docs/algorithm.md#prompts) or
            ``"concise"`` (CRISP: the student prompt behind a conciseness instruction, no solution).
        moving_teacher: The teacher must be refreshed from the student (CRISP); a ``frozen``
            schedule is refused.
    """

    loss: Callable[..., tuple[Tensor, LossStats]]
    uses_rollouts: bool
    token_inputs: TokenInputs
    advantage: Literal["none", "running", "group"]
    gated: bool = False
    kl_direction: KLDirection = "forward"
    teacher_prompt: Literal["reference", "concise"] = "reference"
    moving_teacher: bool = False

    @property
    def importance_weighted(self) -> bool:
        """Whether the loss is ``Σ Â·log p_θ(y_t)`` over sampled tokens, so that off-policy rollouts get the
        truncated importance weight ``ρ`` (docs/algorithm.md#off-policy-rollouts-one-step-async)."""
        return self.uses_rollouts and self.token_inputs != "token_kl"


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "sft": ObjectiveSpec(
        sft_objective, uses_rollouts=False, token_inputs="student_logprobs", advantage="none"
    ),
    "grpo": ObjectiveSpec(
        grpo_objective, uses_rollouts=True, token_inputs="student_logprobs", advantage="group"
    ),
    "opsd": ObjectiveSpec(opsd_objective, uses_rollouts=True, token_inputs="token_kl", advantage="none"),
    "rlsd": ObjectiveSpec(
        rlsd_objective, uses_rollouts=True, token_inputs="gated_teacher", advantage="running"
    ),
    "egrsd": ObjectiveSpec(
        egrsd_objective, uses_rollouts=True, token_inputs="gated_teacher", advantage="running", gated=True
    ),
    "cl_egrsd": ObjectiveSpec(
        cl_egrsd_objective, uses_rollouts=True, token_inputs="gated_teacher", advantage="running", gated=True
    ),
    "crisp": ObjectiveSpec(
        crisp_objective,
        uses_rollouts=True,
        token_inputs="token_kl",
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
    gamma: float = DEFAULT_GATE.gamma,
    window: int = DEFAULT_GATE.window,
    eps: float = 0.2,
    omega_floor: float = DEFAULT_GATE.omega_floor,
    entropy_max: EntropyMax = None,
) -> tuple[Tensor, LossStats]:
    """Look up the objective ``name`` in :data:`OBJECTIVES` and evaluate it.

    Hyperparameters an objective does not use are ignored (``rlsd`` ignores ``gamma``); all are
    validated here, once, with the shapes of the inputs; the objectives then run unchecked kernels.
    ``window`` must be 0 except for ``cl_egrsd``, where it must be positive
    (:func:`~egrsd_pl.losses.gate.check_objective_window`).

    Returns:
        ``(loss, stats)``: 0-dim loss with gradient and detached :class:`LossStats`.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"name must be one of {sorted(OBJECTIVES)}, got {name!r}")
    settings = ObjectiveSettings(gamma, window, eps, omega_floor, entropy_max)
    _check_settings(settings)
    check_ndim(inputs.mask, 2, "inputs.mask")
    check_bool_mask(inputs.mask, shape=tuple(inputs.mask.shape), name="inputs.mask")
    for field in ("student_logp", "teacher_logp", "teacher_entropy", "token_kl", "importance_weights"):
        if (value := getattr(inputs, field)) is not None:
            check_shape(value, tuple(inputs.mask.shape), f"inputs.{field}")
    if inputs.advantages is not None:
        check_shape(inputs.advantages, tuple(inputs.mask.shape[:1]), "inputs.advantages")
    check_objective_window(name, window)
    spec = OBJECTIVES[name]
    if inputs.importance_weights is not None and not spec.importance_weighted:
        raise ValueError(f"the {name!r} objective has no sampled-token term for inputs.importance_weights")
    return spec.loss(inputs, settings)


def _check_settings(settings: ObjectiveSettings) -> None:
    GateConfig(
        settings.gamma, settings.window, settings.omega_floor, flag_prefix=""
    )  # errors name the argument
    check_eps(settings.eps)
    check_entropy_max(settings.entropy_max)


def group_relative_advantages(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6) -> Tensor:
    """GRPO advantages ``A_i = (r_i - mean_g) / (std_g + eps)`` within each prompt group ``g``.

    Decision (ours, the paper is silent; docs/algorithm.md#grpo): ``std_g`` is the sample standard deviation (Bessel-corrected,
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

"""The per-token factors of Algorithm 1 (docs/algorithm.md#one-training-step, steps 6-11), one function per idea.

Masked positions (padding) may hold anything, even NaN: every function selects with
``torch.where`` instead of multiplying by the mask, so padding never reaches a value or a gradient.

Each public function validates its arguments, then runs its unchecked kernel ``_<name>``; composite
code that validated once at its own boundary (:func:`~egrsd_pl.losses.compute_objective`,
:func:`~egrsd_pl.losses.egrsd_loss`) calls the kernels, so nothing is checked twice per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from egrsd_pl.losses._checks import (
    check_bool_mask,
    check_entropy_max,
    check_eps,
    check_ndim,
    check_shape,
    check_window,
)
from egrsd_pl.losses.gate import DEFAULT_GATE, GateConfig

EntropyMax = float | Tensor | None  # an already-reduced batch maximum of the raw entropies, or None
ENTROPY_MAX_FLOOR_NATS = 1.0
"""Lower bound of the entropy normaliser ``max(max H, 1)`` (docs/algorithm.md#step-7-normalisation), in nats."""


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """``Σ m·x / Σ m`` over all elements; 0 (not NaN) when the mask is empty.

    Args:
        values: Any shape; the values at masked-out positions are ignored, even if NaN or inf.
        mask: Bool tensor of the same shape.

    Returns:
        0-dim float tensor.
    """
    check_bool_mask(mask, shape=tuple(values.shape))
    return _masked_mean(values, mask)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def masked_max(values: Tensor, mask: Tensor) -> Tensor:
    """Maximum over the positions where ``mask`` is set; 0 when the mask is empty. 0-dim."""
    check_bool_mask(mask, shape=tuple(values.shape))
    return _masked_max(values, mask)


def _masked_max(values: Tensor, mask: Tensor) -> Tensor:
    if values.numel() == 0:
        return values.new_zeros(())
    maximum = torch.where(mask, values, float("-inf")).amax()
    return torch.where(mask.any(), maximum, torch.zeros_like(maximum))


def masked_min(values: Tensor, mask: Tensor) -> Tensor:
    """Minimum over the positions where ``mask`` is set; 0 when the mask is empty. 0-dim."""
    check_bool_mask(mask, shape=tuple(values.shape))
    return _masked_min(values, mask)


def _masked_min(values: Tensor, mask: Tensor) -> Tensor:
    if values.numel() == 0:
        return values.new_zeros(())
    minimum = torch.where(mask, values, float("inf")).amin()
    return torch.where(mask.any(), minimum, torch.zeros_like(minimum))


def causal_window_min(values: Tensor, mask: Tensor, window: int) -> Tensor:
    """CL-EGRSD's look-ahead minimum ``H^CL_t = min_{j in [t, min(t + W, T_i)]} H_j`` (docs/algorithm.md#step-6-causal-look-ahead-cl-egrsd-only).

    The window covers the current and the next ``window`` positions of the same row, truncated at
    the row's end; positions where ``mask`` is not set (padding) never enter a window. Vectorised
    as one ``unfold`` over the padded row, no loop over tokens.

    Args:
        values: ``[B, T]`` per-token values (teacher entropies).
        mask: ``[B, T]`` bool completion mask.
        window: ``W >= 0``; 0 returns ``values`` unchanged.

    Returns:
        ``[B, T]``; at masked-out positions the input values are returned unchanged.
    """
    check_ndim(values, 2, "values")
    check_bool_mask(mask, shape=tuple(values.shape))
    check_window(window)
    return _causal_window_min(values, mask, window)


def _causal_window_min(values: Tensor, mask: Tensor, window: int) -> Tensor:
    if window == 0:
        return values
    candidates = torch.where(mask, values, float("inf"))  # [B, T] padding never wins a min
    padded = F.pad(candidates, (0, window), value=float("inf"))  # [B, T + W]
    window_min = padded.unfold(1, window + 1, 1).amin(-1)  # [B, T]
    return torch.where(mask, window_min, values)


def entropy_normaliser(entropy_max: float | Tensor) -> Tensor:
    """The denominator of docs/algorithm.md#step-7-normalisation, ``max(H_max, 1 nat)``: 0-dim float tensor.

    Args:
        entropy_max: The already-reduced batch maximum of the raw masked teacher entropies.
    """
    check_entropy_max(entropy_max)
    return _entropy_normaliser(entropy_max)


def _entropy_normaliser(entropy_max: float | Tensor) -> Tensor:
    maximum = torch.as_tensor(entropy_max).reshape(())  # []
    return (maximum if maximum.is_floating_point() else maximum.float()).clamp(min=ENTROPY_MAX_FLOOR_NATS)


def normalize_entropy(
    teacher_entropy: Tensor, mask: Tensor, *, entropy_max: float | Tensor | None = None
) -> Tensor:
    """``Ĥ = H / max(H_max, 1 nat)`` (docs/algorithm.md#step-7-normalisation).

    Args:
        teacher_entropy: ``[B, T]`` entropies (raw, or the CL window minima).
        mask: ``[B, T]`` bool completion mask.
        entropy_max: The batch maximum ``H_max``, already reduced (e.g. all-reduced MAX across
            ranks); ``None`` uses the masked maximum of ``teacher_entropy`` itself.

    Returns:
        ``[B, T]`` normalised entropies (padding positions are divided too, but never used).
    """
    check_bool_mask(mask, shape=tuple(teacher_entropy.shape))
    check_entropy_max(entropy_max)
    return _normalize_entropy(teacher_entropy, mask, entropy_max=entropy_max)


def _normalize_entropy(teacher_entropy: Tensor, mask: Tensor, entropy_max: EntropyMax) -> Tensor:
    if entropy_max is None:
        entropy_max = _masked_max(teacher_entropy, mask)
    denominator = _entropy_normaliser(entropy_max).to(teacher_entropy)  # []
    return teacher_entropy / denominator


def confidence_gate(
    teacher_entropy: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    window: int = DEFAULT_GATE.window,
    omega_floor: float = DEFAULT_GATE.omega_floor,
    entropy_max: float | Tensor | None = None,
) -> Tensor:
    """Confidence gate ``ω = clip(1 - γ·Ĥ, omega_floor, 1)`` (docs/algorithm.md#step-8-confidence-gate, steps 6-8).

    With ``window > 0`` (CL-EGRSD) the entropy is first replaced by its causal window minimum
    :func:`causal_window_min`, so a confident token a few steps ahead restores the weight of an
    uncertain one. ``γ = 0`` gives ``ω = 1`` (RLSD).

    Decision (docs/algorithm.md#step-7-normalisation): the normaliser is the maximum of the *raw* entropies, also for
    CL-EGRSD (Eq. 8: "reuse the same batch-global denominator"), not of the window minima.
    Whether "batch" means this device or all ranks is the caller's choice: pass ``entropy_max``
    (e.g. all-reduced with MAX) or leave it ``None`` for this tensor's masked maximum. The
    1-nat floor applies either way.

    Args:
        teacher_entropy: ``[B, T]`` raw teacher entropies, in nats.
        mask: ``[B, T]`` bool completion mask.
        gamma: ``γ >= 0``, strength of the entropy penalty.
        window: ``W >= 0``; 0 is EGRSD, ``> 0`` is CL-EGRSD.
        omega_floor: Lower clip of ``ω`` (0.1 in the paper).
        entropy_max: Already-reduced maximum of the raw masked entropies, or ``None``.

    Returns:
        ``[B, T]`` gate in ``[omega_floor, 1]``; 1 at masked-out positions.
    """
    check_ndim(teacher_entropy, 2, "teacher_entropy")
    check_bool_mask(mask, shape=tuple(teacher_entropy.shape))
    GateConfig(gamma, window, omega_floor, flag_prefix="")  # the bounds, checked in one place
    check_entropy_max(entropy_max)
    return _confidence_gate(
        teacher_entropy, mask, gamma=gamma, window=window, omega_floor=omega_floor, entropy_max=entropy_max
    )


def _confidence_gate(
    teacher_entropy: Tensor,
    mask: Tensor,
    gamma: float,
    window: int,
    omega_floor: float,
    entropy_max: EntropyMax,
) -> Tensor:
    if entropy_max is None:
        entropy_max = _masked_max(teacher_entropy, mask)  # raw entropies (Decision above)
    gated_entropy = _causal_window_min(teacher_entropy, mask, window)  # [B, T]
    normalized = _normalize_entropy(gated_entropy, mask, entropy_max=entropy_max)  # [B, T]
    omega = (1.0 - gamma * normalized).clamp(min=omega_floor, max=1.0)  # [B, T]
    return torch.where(mask, omega, torch.ones_like(omega))


def likelihood_ratio_magnitude(
    student_logp: Tensor, teacher_logp: Tensor, direction: Tensor, eps: float = 0.2
) -> Tensor:
    """Magnitude ``w = clip(exp(D·δ), 1 - ε, 1 + ε)``, ``δ = log p_T(y_t) - log p_S(y_t)`` (docs/algorithm.md#step-9-magnitude).

    ``p_S`` is detached: ``w`` is a constant. For a positive advantage (``D = +1``) tokens the teacher
    prefers more get more weight; for a negative one, tokens the teacher prefers less.

    Args:
        student_logp: ``[B, T]`` student log-probs of the sampled tokens (detached here).
        teacher_logp: ``[B, T]`` teacher log-probs of the same tokens.
        direction: ``[B]`` ``D_i = sign(A_i)`` per rollout.
        eps: Clip half-width ``ε`` in ``(0, 1)`` (0.2 in the paper).

    Returns:
        ``[B, T]`` float magnitudes in ``[1 - ε, 1 + ε]`` (NaN only where the inputs are NaN).
    """
    check_ndim(student_logp, 2, "student_logp")
    check_shape(teacher_logp, tuple(student_logp.shape), "teacher_logp")
    check_shape(direction, (student_logp.shape[0],), "direction")
    check_eps(eps)
    return _likelihood_ratio_magnitude(student_logp, teacher_logp, direction, eps)


def _likelihood_ratio_magnitude(
    student_logp: Tensor, teacher_logp: Tensor, direction: Tensor, eps: float = 0.2
) -> Tensor:
    log_ratio = direction[:, None] * (teacher_logp - student_logp.detach())  # [B, T] D·δ
    return log_ratio.exp().clamp(min=1.0 - eps, max=1.0 + eps)


def token_advantages(advantages: Tensor, magnitude: Tensor, omega: Tensor, mask: Tensor) -> Tensor:
    """Token advantage ``Â_{i,t} = A_i · w_{i,t} · ω_{i,t}``, detached, 0 at padding (docs/algorithm.md#step-10-token-advantage).

    Args:
        advantages: ``[B]`` sequence-level advantages ``A_i``.
        magnitude: ``[B, T]`` ``w`` from :func:`likelihood_ratio_magnitude` (all ones for GRPO).
        omega: ``[B, T]`` ``ω`` from :func:`confidence_gate` (all ones for RLSD / GRPO).
        mask: ``[B, T]`` bool completion mask.

    Returns:
        ``[B, T]`` constants (no gradient).
    """
    check_ndim(magnitude, 2, "magnitude")
    check_shape(advantages, (magnitude.shape[0],), "advantages")
    check_shape(omega, tuple(magnitude.shape), "omega")
    check_bool_mask(mask, shape=tuple(magnitude.shape))
    return _token_advantages(advantages, magnitude, omega, mask)


def _token_advantages(advantages: Tensor, magnitude: Tensor, omega: Tensor, mask: Tensor) -> Tensor:
    token_advantage = (advantages[:, None] * magnitude * omega).detach()  # [B, T]
    return torch.where(mask, token_advantage, torch.zeros_like(token_advantage))


def policy_gradient_loss(token_advantage: Tensor, student_logp: Tensor, mask: Tensor) -> Tensor:
    """``L = -(1 / Σ m) · Σ m · Â · log p_θ(y_t)`` (docs/algorithm.md#step-11-loss); 0 when ``Σ m = 0``.

    The gradient flows only through ``student_logp``; ``token_advantage`` is detached here.

    Args:
        token_advantage: ``[B, T]`` ``Â`` (must be finite where ``mask`` is set).
        student_logp: ``[B, T]`` ``log p_θ(y_t)`` with gradient.
        mask: ``[B, T]`` bool completion mask.

    Returns:
        0-dim loss.
    """
    check_shape(token_advantage, tuple(student_logp.shape), "token_advantage")
    check_bool_mask(mask, shape=tuple(student_logp.shape))
    return _policy_gradient_loss(token_advantage, student_logp, mask)


def _policy_gradient_loss(token_advantage: Tensor, student_logp: Tensor, mask: Tensor) -> Tensor:
    constant = torch.where(mask, token_advantage.detach(), torch.zeros_like(token_advantage))  # [B, T]
    return -_masked_mean(constant * student_logp, mask)

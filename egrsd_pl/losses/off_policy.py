"""Rollouts sampled by another policy than the one trained: the sampler-vs-trainer log-prob gap and the
truncated importance weight of one-step-asynchronous training (docs/algorithm.md#off-policy-rollouts-one-step-async).

Both compare, per completion token, the trainer's ``log p_θ(y_t)`` (the student now, temperature 1) with the
``log q(y_t)`` the rollout engine reported when it sampled ``y_t`` (vLLM's default ``raw_logprobs``: the
sampling policy's model distribution, also at temperature 1, before top-p / top-k).
"""

from __future__ import annotations

import torch
from torch import Tensor

from egrsd_pl.losses._checks import check_bool_mask, check_ndim, check_shape
from egrsd_pl.losses.token_weights import _masked_mean

DEFAULT_IMPORTANCE_CAP = 2.0
"""Cap ``C`` of the truncated importance weight (``--model.is_cap``); see :func:`truncated_importance_weights`."""


def logprob_gap(student_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute gap ``(1 / Σ m) Σ m · |log p_θ(y_t) − log q(y_t)|`` in nats, 0-dim, detached; 0 when ``Σ m = 0``.

    In synchronous training both sides hold the same weights, so the gap measures the engines' numerical
    mismatch (float32 on the CPU testbed: 3.8e-7 nats; bfloat16: ~1e-3); one update off-policy it adds the
    policy's change over one step (7.5e-4 on the testbed at learning rate 3e-4).

    Args:
        student_logp: ``[B, T]`` trainer log-probs of the sampled tokens (detached here).
        sampler_logp: ``[B, T]`` the rollout engine's log-probs of the same tokens.
        mask: ``[B, T]`` bool completion mask.
    """
    check_ndim(student_logp, 2, "student_logp")
    check_shape(sampler_logp, tuple(student_logp.shape), "sampler_logp")
    check_bool_mask(mask, shape=tuple(student_logp.shape))
    gap = (student_logp.detach() - sampler_logp).abs()  # [B, T]
    return _masked_mean(torch.where(mask, gap, torch.zeros_like(gap)), mask)


def truncated_importance_weights(
    student_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, cap: float = DEFAULT_IMPORTANCE_CAP
) -> Tensor:
    """Per-token truncated importance weight ``ρ_{i,t} = min(exp(log p_θ(y_t) − log q(y_t)), C)``, detached.

    Truncated importance sampling (TIS; Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training"; verl's ``tis_imp_ratio_cap``) multiplies each token's policy-gradient term by this
    weight, so tokens sampled by a stale (or numerically different) policy ``q`` count as if sampled by
    ``p_θ``, with the ratio capped at ``C`` from above to bound the variance (no lower cap: a token ``p_θ`` now
    finds unlikely simply counts less).

    Args:
        student_logp: ``[B, T]`` ``log p_θ(y_t)`` of the policy being trained (detached here: ``ρ`` is a constant).
        sampler_logp: ``[B, T]`` ``log q(y_t)`` reported by the rollout engine.
        mask: ``[B, T]`` bool completion mask.
        cap: ``C > 0`` (default 2.0).

    Returns:
        ``[B, T]`` weights in ``(0, C]``; 1 at padding.
    """
    check_ndim(student_logp, 2, "student_logp")
    check_shape(sampler_logp, tuple(student_logp.shape), "sampler_logp")
    check_bool_mask(mask, shape=tuple(student_logp.shape))
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    ratio = (student_logp.detach() - sampler_logp).exp().clamp(max=cap)  # [B, T]
    return torch.where(mask, ratio, torch.ones_like(ratio))

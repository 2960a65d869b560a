"""The objectives library: pure tensor functions, one per step of Algorithm 1 (see docs/algorithm.md#one-training-step).

- :mod:`~egrsd_pl.losses.vocabulary`: teacher entropy / log-probs, student log-probs and the token KL
  (OPSD's forward, CRISP's reverse) over the full vocabulary, chunked over positions (never ``[B, T, V]`` logits).
- :mod:`~egrsd_pl.losses.token_weights`: causal window minimum, entropy normalisation, confidence
  gate, likelihood-ratio magnitude, token advantages, masked reductions.
- :mod:`~egrsd_pl.losses.gate`: :class:`GateConfig`, the gate's defaults and bounds, written once.
- :mod:`~egrsd_pl.losses.off_policy`: the sampler-vs-trainer log-prob gap and the truncated importance
  weight of one-step-asynchronous rollouts.
- :mod:`~egrsd_pl.losses.objectives`: ``sft``, ``grpo``, ``opsd``, ``rlsd``, ``egrsd``, ``cl_egrsd``,
  ``crisp`` behind one signature (:data:`OBJECTIVES`, :func:`compute_objective`).
"""

from egrsd_pl.losses.gate import DEFAULT_GATE, GateConfig, check_objective_window
from egrsd_pl.losses.objectives import (
    OBJECTIVES,
    LossStats,
    ObjectiveInputs,
    ObjectiveName,
    ObjectiveSettings,
    ObjectiveSpec,
    TokenInputs,
    TokenQuantities,
    cl_egrsd_objective,
    compute_objective,
    crisp_objective,
    egrsd_loss,
    egrsd_objective,
    group_relative_advantages,
    grpo_objective,
    opsd_objective,
    rlsd_objective,
    sft_objective,
    token_quantities,
)
from egrsd_pl.losses.off_policy import DEFAULT_IMPORTANCE_CAP, logprob_gap, truncated_importance_weights
from egrsd_pl.losses.token_weights import (
    ENTROPY_MAX_FLOOR_NATS,
    causal_window_min,
    confidence_gate,
    entropy_normaliser,
    likelihood_ratio_magnitude,
    masked_max,
    masked_mean,
    masked_min,
    normalize_entropy,
    policy_gradient_loss,
    token_advantages,
)
from egrsd_pl.losses.vocabulary import KLDirection, student_token_logprobs, teacher_token_stats, token_kl

__all__ = [
    "DEFAULT_GATE",
    "DEFAULT_IMPORTANCE_CAP",
    "ENTROPY_MAX_FLOOR_NATS",
    "GateConfig",
    "KLDirection",
    "OBJECTIVES",
    "LossStats",
    "ObjectiveInputs",
    "ObjectiveName",
    "ObjectiveSettings",
    "ObjectiveSpec",
    "TokenInputs",
    "TokenQuantities",
    "causal_window_min",
    "check_objective_window",
    "cl_egrsd_objective",
    "compute_objective",
    "confidence_gate",
    "crisp_objective",
    "entropy_normaliser",
    "egrsd_loss",
    "egrsd_objective",
    "grpo_objective",
    "group_relative_advantages",
    "likelihood_ratio_magnitude",
    "logprob_gap",
    "masked_max",
    "masked_mean",
    "masked_min",
    "normalize_entropy",
    "opsd_objective",
    "policy_gradient_loss",
    "rlsd_objective",
    "sft_objective",
    "student_token_logprobs",
    "teacher_token_stats",
    "token_advantages",
    "token_kl",
    "token_quantities",
    "truncated_importance_weights",
]

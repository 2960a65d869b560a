"""The math of the mechanism diagnostics (paper §5.5, Fig. 4): per-token gates, regimes, deciles.

Pure tensor functions: tensors and scalars in, tensors and ``NamedTuple`` summaries out. The gates
are computed with the training code's own functions (:func:`egrsd_pl.losses.confidence_gate`,
:func:`~egrsd_pl.losses.causal_window_min`, :func:`~egrsd_pl.losses.normalize_entropy`), so the
diagnostics measure exactly what a training step weights.

Regimes (§5.5, from normalised entropies ``Ĥ`` and their causal window minimum ``Ĥ^CL``):

- lock:  ``Ĥ ≤ τ_low``
- fork:  ``Ĥ ≥ τ_high`` and ``Ĥ^CL ≥ τ_high``
- pivot: ``Ĥ ≥ τ_high`` and ``Ĥ^CL ≤ τ_low``
- mid:   everything else.

With ``τ_low < τ_high`` the four are disjoint and cover every completion token.

Decision (thresholds; the paper does not give them): ``τ_low = 0.1`` (Fig. A5: ``Ĥ^CL ≤ 0.08`` at 13
of 14 annotated peaks) and ``τ_high = 0.3``. Then every pivot where the clip does not bind is
restored by at least ``γ(τ_high - τ_low)`` (0.06 at γ 0.3), consistent with the paper's +0.111.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from egrsd_pl.losses import (
    DEFAULT_GATE,
    GateConfig,
    causal_window_min,
    confidence_gate,
    masked_max,
    normalize_entropy,
)
from egrsd_pl.losses._checks import check_bool_mask, check_ndim, check_shape

LOCK, FORK, PIVOT, MID = 0, 1, 2, 3
REGIMES: tuple[str, ...] = ("lock", "fork", "pivot", "mid")
"""Regime names, indexed by the codes of :func:`classify_regimes`."""
PADDING = -1
"""Regime code written at masked-out positions."""
DEFAULT_TAU_LOW = 0.1
DEFAULT_TAU_HIGH = 0.3
DEFAULT_LOOKAHEAD = 5
"""Look-ahead ``W`` of ``Ĥ^CL`` when the run itself has none (``egrsd``, ``rlsd``): the paper's Fig. 4b."""


def diagnostic_gate(run: GateConfig, *, gamma: float | None = None, window: int | None = None) -> GateConfig:
    """The gate settings of the diagnostics: the run's ``γ`` and ``ω`` floor, ``W`` of the run or 5.

    Shared by the live callback (``--diagnostics.gamma`` / ``--diagnostics.window``) and ``egrsd diagnose``
    (the same flags, read from the same config).

    Args:
        run: The run's gate (``EGRSDModule.gate``, from ``--model.gamma`` / ``window`` / ``omega_floor``).
        gamma: Override of ``γ``; ``None``: the run's.
        window: Override of the look-ahead ``W >= 1``; ``None``: the run's, or :data:`DEFAULT_LOOKAHEAD`
            when it is 0.

    Returns:
        A :class:`GateConfig` with ``window >= 1`` (its ``ω`` at ``W = 0`` is EGRSD's, at ``W`` CL-EGRSD's).
    """
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(
            f"--diagnostics.window must be an integer >= 1 (Ĥ^CL needs a look-ahead), got {window!r}"
        )
    return GateConfig(
        run.gamma if gamma is None else gamma,
        (run.window or DEFAULT_LOOKAHEAD) if window is None else window,
        run.omega_floor,
        flag_prefix="--diagnostics.",
    )


class TokenGates(NamedTuple):
    """Per-token quantities of one batch, all ``[N, T]`` float32 (values at padding are meaningless).

    Attributes:
        entropy_hat: ``Ĥ = H / max(H_max, 1)``.
        entropy_cl_hat: ``Ĥ^CL``: the window minimum of ``H`` over ``[t, t + W]``, same normaliser.
        omega: EGRSD gate ``clip(1 - γĤ, omega_floor, 1)``.
        omega_cl: CL-EGRSD gate ``clip(1 - γĤ^CL, omega_floor, 1)``.
        restore: ``ω^CL - ω`` (≥ 0, since ``Ĥ^CL ≤ Ĥ``).
    """

    entropy_hat: Tensor
    entropy_cl_hat: Tensor
    omega: Tensor
    omega_cl: Tensor
    restore: Tensor


def token_gates(
    teacher_entropy: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    window: int,
    omega_floor: float = DEFAULT_GATE.omega_floor,
    entropy_max: float | Tensor | None = None,
) -> TokenGates:
    """EGRSD and CL-EGRSD gates of the same tokens, and what the look-ahead restores.

    Both gates share the normaliser: the maximum of the *raw* entropies (Decision in docs/algorithm.md#step-7-normalisation),
    exactly as :func:`egrsd_pl.losses.confidence_gate` computes it in training.

    Args:
        teacher_entropy: ``[N, T]`` raw teacher entropies ``H`` in nats.
        mask: ``[N, T]`` bool completion mask.
        gamma: Gate strength ``γ``.
        window: Look-ahead ``W`` of ``Ĥ^CL`` (0 makes ``Ĥ^CL = Ĥ`` and ``restore = 0``).
        omega_floor: Lower clip of both gates.
        entropy_max: The batch maximum of ``H`` already reduced; ``None``: this tensor's masked max.

    Returns:
        :class:`TokenGates`, each ``[N, T]``.
    """
    check_ndim(teacher_entropy, 2, "teacher_entropy")
    check_bool_mask(mask, shape=tuple(teacher_entropy.shape))
    entropy = teacher_entropy.float()  # [N, T]
    if entropy_max is None:
        entropy_max = masked_max(entropy, mask)
    window_min = causal_window_min(entropy, mask, window)  # [N, T] H^CL, computed once
    # confidence_gate(H, window=W) == confidence_gate(H^CL, window=0) at the same raw-entropy maximum.
    omega = confidence_gate(
        entropy, mask, gamma=gamma, window=0, omega_floor=omega_floor, entropy_max=entropy_max
    )  # [N, T]
    omega_cl = confidence_gate(
        window_min, mask, gamma=gamma, window=0, omega_floor=omega_floor, entropy_max=entropy_max
    )  # [N, T]
    entropy_hat = normalize_entropy(entropy, mask, entropy_max=entropy_max)  # [N, T]
    entropy_cl_hat = normalize_entropy(window_min, mask, entropy_max=entropy_max)  # [N, T]
    return TokenGates(entropy_hat, entropy_cl_hat, omega, omega_cl, omega_cl - omega)


def classify_regimes(
    entropy_hat: Tensor, entropy_cl_hat: Tensor, mask: Tensor, *, tau_low: float, tau_high: float
) -> Tensor:
    """Lock / fork / pivot / mid code of every token (module docstring), :data:`PADDING` at padding.

    Args:
        entropy_hat: ``[N, T]`` normalised entropy ``Ĥ``.
        entropy_cl_hat: ``[N, T]`` normalised window minimum ``Ĥ^CL``.
        mask: ``[N, T]`` bool completion mask.
        tau_low: Lock / resolved threshold, ``0 <= τ_low < τ_high``.
        tau_high: Uncertain threshold.

    Returns:
        ``[N, T]`` long codes in ``{LOCK, FORK, PIVOT, MID, PADDING}``.
    """
    check_regime_thresholds(tau_low, tau_high)
    check_shape(entropy_cl_hat, tuple(entropy_hat.shape), "entropy_cl_hat")
    check_bool_mask(mask, shape=tuple(entropy_hat.shape))
    high = entropy_hat >= tau_high  # [N, T]
    regime = torch.full_like(entropy_hat, MID, dtype=torch.long)  # [N, T]
    regime = torch.where(entropy_hat <= tau_low, LOCK, regime)
    regime = torch.where(high & (entropy_cl_hat >= tau_high), FORK, regime)
    regime = torch.where(high & (entropy_cl_hat <= tau_low), PIVOT, regime)
    return torch.where(mask, regime, PADDING)


def check_regime_thresholds(tau_low: float, tau_high: float) -> None:
    """``0 <= τ_low < τ_high``; else one error line naming the flags."""
    if not 0 <= tau_low < tau_high:
        raise ValueError(
            f"--diagnostics.tau_low / --diagnostics.tau_high need 0 <= tau_low < tau_high, got {tau_low} and "
            f"{tau_high}"
        )


class RegimeStats(NamedTuple):
    """Fig. 4b: how many tokens fall in each regime and how much CL-EGRSD restores there.

    Attributes:
        counts: ``[4]`` long token counts per regime (order :data:`REGIMES`).
        shares: ``[4]`` fraction of the completion tokens per regime (sums to 1; 0 on an empty mask).
        mean_restore: ``[4]`` mean ``ω^CL - ω`` per regime (0 where a regime holds no token).
        selectivity: Mean restore at pivots over mean restore at forks (NaN when the fork mean is 0).
    """

    counts: Tensor
    shares: Tensor
    mean_restore: Tensor
    selectivity: Tensor


def regime_stats(regime: Tensor, restore: Tensor) -> RegimeStats:
    """Counts, shares and mean restore per regime.

    Args:
        regime: ``[N, T]`` codes from :func:`classify_regimes` (:data:`PADDING` is ignored).
        restore: ``[N, T]`` ``ω^CL - ω``.

    Returns:
        :class:`RegimeStats`.
    """
    check_shape(restore, tuple(regime.shape), "restore")
    members = torch.stack([regime == code for code in range(len(REGIMES))])  # [4, N, T]
    counts = members.sum(dim=(1, 2))  # [4]
    sums = torch.where(members, restore.double(), 0.0).sum(dim=(1, 2))  # [4] float64 accumulation
    mean_restore = (sums / counts.clamp(min=1)).float()  # [4]
    shares = counts.float() / counts.sum().clamp(min=1)  # [4]
    fork = mean_restore[FORK]
    selectivity = torch.where(fork > 0, mean_restore[PIVOT] / fork, torch.full_like(fork, float("nan")))
    return RegimeStats(counts, shares, mean_restore, selectivity)


class DecileStats(NamedTuple):
    """Fig. 4a: tokens in equal-count bins of teacher entropy (lowest first), ``[B]`` each.

    Attributes:
        counts: Tokens per bin (equal within one token).
        entropy_low: Smallest ``H`` in the bin (nats).
        entropy_high: Largest ``H`` in the bin (nats).
        mean_entropy: Mean ``H`` (nats).
        mean_abs_gap: Mean ``|δ|``, ``δ = log p_T(y_t) - log p_S(y_t)`` (nats).
        mean_gap: Mean signed ``δ`` (nats).
        mean_omega: Mean EGRSD gate ``ω``.
        gap_ratio: Mean ``|δ|`` of the top bin over that of the bottom bin (NaN when the latter is 0).
    """

    counts: Tensor
    entropy_low: Tensor
    entropy_high: Tensor
    mean_entropy: Tensor
    mean_abs_gap: Tensor
    mean_gap: Tensor
    mean_omega: Tensor
    gap_ratio: Tensor


def entropy_deciles(
    teacher_entropy: Tensor, gap: Tensor, omega: Tensor, mask: Tensor, *, num_bins: int = 10
) -> DecileStats:
    """Sorts the completion tokens by teacher entropy and splits them into ``num_bins`` equal-count bins.

    Ties are broken by position (a stable sort), so bin sizes differ by at most one token even when
    many entropies are equal. Means are float64 accumulations returned as float32.

    Args:
        teacher_entropy: ``[N, T]`` raw entropies ``H``.
        gap: ``[N, T]`` ``δ = log p_T - log p_S`` of the sampled tokens.
        omega: ``[N, T]`` EGRSD gate.
        mask: ``[N, T]`` bool completion mask; needs at least ``num_bins`` tokens.
        num_bins: Number of bins (10: deciles).

    Returns:
        :class:`DecileStats`.
    """
    check_bool_mask(mask, shape=tuple(teacher_entropy.shape))
    check_shape(gap, tuple(teacher_entropy.shape), "gap")
    check_shape(omega, tuple(teacher_entropy.shape), "omega")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if int(mask.sum()) < num_bins:
        raise ValueError(f"{int(mask.sum())} completion tokens cannot fill {num_bins} entropy bins")
    entropy = teacher_entropy[mask].double()  # [M]
    order = torch.sort(entropy, stable=True).indices  # [M]
    columns = (entropy, gap[mask].double(), omega[mask].double())
    bins = [torch.tensor_split(values[order], num_bins) for values in columns]
    entropy_bins, gap_bins, omega_bins = bins

    def stacked(values: list[Tensor]) -> Tensor:
        return torch.stack(values).float()  # [B]

    mean_abs_gap = stacked([b.abs().mean() for b in gap_bins])
    bottom, top = mean_abs_gap[0], mean_abs_gap[-1]
    return DecileStats(
        counts=torch.tensor([len(b) for b in entropy_bins]),
        entropy_low=stacked([b.min() for b in entropy_bins]),
        entropy_high=stacked([b.max() for b in entropy_bins]),
        mean_entropy=stacked([b.mean() for b in entropy_bins]),
        mean_abs_gap=mean_abs_gap,
        mean_gap=stacked([b.mean() for b in gap_bins]),
        mean_omega=stacked([b.mean() for b in omega_bins]),
        gap_ratio=torch.where(bottom > 0, top / bottom, torch.full_like(top, float("nan"))),
    )


def densest_window(flags: Tensor, length: int) -> int:
    """Start of the ``length``-token window of a 1-D bool row holding the most set flags (first on ties).

    Args:
        flags: ``[T]`` bool (e.g. ``regime == PIVOT`` of one completion).
        length: Window length; a row no longer than it returns 0.
    """
    check_ndim(flags, 1, "flags")
    if flags.numel() <= length:
        return 0
    counts = flags.float().unfold(0, length, 1).sum(-1)  # [T - length + 1]
    return int(torch.argmax(counts))

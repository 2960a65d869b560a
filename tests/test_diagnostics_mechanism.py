"""The diagnostics math on hand-built entropy rows: regimes, restore, deciles."""

from __future__ import annotations

import math

import pytest
import torch

from egrsd_pl.diagnostics.mechanism import (
    FORK,
    LOCK,
    MID,
    PADDING,
    PIVOT,
    classify_regimes,
    densest_window,
    entropy_deciles,
    regime_stats,
    token_gates,
)

# Normaliser 10 nats, so Ĥ = H / 10. W = 2, τ_low 0.1, τ_high 0.3, γ 0.3.
#   Ĥ      0.05 0.80 0.05 0.05 0.50 0.60 0.70 0.40 0.20
#   Ĥ^CL   0.05 0.05 0.05 0.05 0.50 0.40 0.20 0.20 0.20   (min over [t, t+2], truncated at the end)
#   regime lock pivot lock lock fork fork mid  mid  mid
#   restore = 0.3 (Ĥ - Ĥ^CL): 0 0.225 0 0 0 0.06 0.15 0.06 0
ROW = [0.5, 8.0, 0.5, 0.5, 5.0, 6.0, 7.0, 4.0, 2.0]
EXPECTED_REGIMES = [LOCK, PIVOT, LOCK, LOCK, FORK, FORK, MID, MID, MID]
EXPECTED_RESTORE = [0.0, 0.225, 0.0, 0.0, 0.0, 0.06, 0.15, 0.06, 0.0]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The row above plus a second row of 3 tokens and 6 NaN padding positions."""
    entropy = torch.tensor([ROW, [0.2, 0.2, 9.0] + [float("nan")] * 6])  # [2, 9]
    mask = torch.tensor([[True] * 9, [True] * 3 + [False] * 6])
    return entropy, mask


def test_regimes_and_restore_on_a_hand_built_row() -> None:
    entropy, mask = _batch()
    gates = token_gates(entropy, mask, gamma=0.3, window=2, entropy_max=10.0)
    regime = classify_regimes(gates.entropy_hat, gates.entropy_cl_hat, mask, tau_low=0.1, tau_high=0.3)
    assert regime[0].tolist() == EXPECTED_REGIMES
    # Row 2: Ĥ 0.02 0.02 0.90, Ĥ^CL 0.02 0.02 0.90 -> lock lock fork; padding -1.
    assert regime[1].tolist() == [LOCK, LOCK, FORK] + [PADDING] * 6
    torch.testing.assert_close(gates.restore[0], torch.tensor(EXPECTED_RESTORE), atol=1e-6, rtol=0)
    torch.testing.assert_close(gates.omega[0, 1], torch.tensor(1 - 0.3 * 0.8))  # 0.76
    torch.testing.assert_close(gates.omega_cl[0, 1], torch.tensor(1 - 0.3 * 0.05))  # 0.985


def test_restore_is_gamma_times_entropy_drop_where_the_clip_does_not_bind() -> None:
    torch.manual_seed(0)
    entropy = torch.rand(4, 30) * 3  # [4, 30] nats, max < 3
    mask = torch.rand(4, 30) > 0.2
    gates = token_gates(entropy, mask, gamma=0.3, window=5)  # 1 - 0.3 Ĥ >= 0.7: the clip never binds
    expected = 0.3 * (gates.entropy_hat - gates.entropy_cl_hat)
    torch.testing.assert_close(gates.restore[mask], expected[mask], atol=1e-6, rtol=0)
    assert bool((gates.restore[mask] >= 0).all())
    # γ = 2: at Ĥ 0.8 the EGRSD gate is clipped to the floor, so the restore is below γ(Ĥ - Ĥ^CL).
    clipped = token_gates(
        torch.tensor([[8.0, 0.5]]), torch.tensor([[True, True]]), gamma=2.0, window=1, entropy_max=10.0
    )
    # ω = clip(1 - 1.6) = 0.1, ω^CL = 1 - 2 * 0.05 = 0.9: restore 0.8 < 2 * 0.75 = 1.5
    torch.testing.assert_close(clipped.restore[0, 0], torch.tensor(0.8))


def test_regime_stats_shares_sum_to_one_and_means_match_the_hand_computation() -> None:
    entropy, mask = _batch()
    gates = token_gates(entropy, mask, gamma=0.3, window=2, entropy_max=10.0)
    regime = classify_regimes(gates.entropy_hat, gates.entropy_cl_hat, mask, tau_low=0.1, tau_high=0.3)
    stats = regime_stats(regime, gates.restore)
    # 12 tokens: lock 3 + 2, fork 2 + 1, pivot 1, mid 3.
    assert stats.counts.tolist() == [5, 3, 1, 3]
    assert math.isclose(float(stats.shares.sum()), 1.0, abs_tol=1e-6)
    torch.testing.assert_close(stats.shares, torch.tensor([5, 3, 1, 3]) / 12.0)
    # lock 0; fork (0 + 0.06 + 0) / 3 = 0.02; pivot 0.225; mid (0.15 + 0.06 + 0) / 3 = 0.07
    torch.testing.assert_close(stats.mean_restore, torch.tensor([0.0, 0.02, 0.225, 0.07]), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.selectivity, torch.tensor(0.225 / 0.02), atol=1e-4, rtol=0)


def test_regime_stats_on_an_empty_mask_is_zero_not_nan() -> None:
    regime = torch.full((2, 3), PADDING)
    stats = regime_stats(regime, torch.zeros(2, 3))
    assert stats.counts.tolist() == [0, 0, 0, 0]
    assert stats.shares.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert stats.mean_restore.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert math.isnan(float(stats.selectivity))


def test_thresholds_are_validated() -> None:
    entropy, mask = _batch()
    with pytest.raises(ValueError, match="--diagnostics.tau_low / --diagnostics.tau_high"):
        classify_regimes(entropy, entropy, mask, tau_low=0.4, tau_high=0.3)


def _known_tokens(count: int) -> tuple[torch.Tensor, ...]:
    """Token k has H = k / 10 nats, δ = (-1)^k (k + 1) / 1000, ω = 1 - 0.03 H, scattered over 2 rows."""
    k = torch.arange(count, dtype=torch.float32)
    permutation = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    width = (count + 1) // 2 + 3
    mask = torch.zeros(2, width, dtype=torch.bool)
    mask[0, : (count + 1) // 2] = True
    mask[1, : count // 2] = True
    values = []
    for column in (k / 10, (-1) ** k * (k + 1) / 1000, 1 - 0.03 * k / 10):
        full = torch.full((2, width), float("nan"))
        full[mask] = column[permutation]
        values.append(full)
    return (*values, mask)


def test_deciles_of_a_known_distribution() -> None:
    entropy, gap, omega, mask = _known_tokens(100)
    stats = entropy_deciles(entropy, gap, omega, mask)
    assert stats.counts.tolist() == [10] * 10
    # Bin j holds k = 10j .. 10j + 9: mean H = j + 0.45; mean |δ| = (10j + 5.5) / 1000;
    # signed δ: five pairs (k + 1) - (k + 2) = -1 -> -5 / 10 / 1000 = -0.0005; ω = 1 - 0.03 (j + 0.45).
    j = torch.arange(10, dtype=torch.float32)
    torch.testing.assert_close(stats.mean_entropy, j + 0.45)
    torch.testing.assert_close(stats.mean_abs_gap, (10 * j + 5.5) / 1000)
    torch.testing.assert_close(stats.mean_gap, torch.full((10,), -0.0005))
    torch.testing.assert_close(stats.mean_omega, 1 - 0.03 * (j + 0.45))
    torch.testing.assert_close(stats.entropy_low, j)
    torch.testing.assert_close(stats.entropy_high, j + 0.9)
    torch.testing.assert_close(stats.gap_ratio, torch.tensor(95.5 / 5.5))  # 17.36


def test_decile_counts_are_equal_within_one_token_with_ties() -> None:
    entropy, gap, omega, mask = _known_tokens(103)
    entropy = torch.where(mask, torch.ones_like(entropy), entropy)  # every entropy tied
    stats = entropy_deciles(entropy, gap, omega, mask)
    assert stats.counts.tolist() == [11, 11, 11] + [10] * 7
    with pytest.raises(ValueError, match="cannot fill 10 entropy bins"):
        entropy_deciles(
            entropy[:, :2], gap[:, :2], omega[:, :2], torch.ones(1, 2, dtype=torch.bool).expand(2, 2)
        )


def test_densest_window() -> None:
    flags = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    assert densest_window(flags, 3) == 2  # [0, 1, 1] at 2..4 and [1, 1, 0] at 3..5: the first wins
    assert densest_window(flags, 20) == 0


def test_regime_table_says_why_the_selectivity_is_undefined() -> None:
    from egrsd_pl.diagnostics.report import regime_table, selectivity_text

    entropy, mask = _batch()
    gates = token_gates(entropy, mask, gamma=0.3, window=2, entropy_max=10.0)
    regime = classify_regimes(gates.entropy_hat, gates.entropy_cl_hat, mask, tau_low=0.1, tau_high=0.3)
    assert selectivity_text(regime_stats(regime, gates.restore)) == "11.25×"  # 0.225 / 0.02
    no_forks = regime_stats(torch.where(regime == FORK, MID, regime), gates.restore)
    assert selectivity_text(no_forks) == "undefined (no fork tokens)"
    table = regime_table(no_forks, tau_low=0.1, tau_high=0.3, gamma=0.3, window=2)
    assert "| pivot | Ĥ ≥ 0.3 and Ĥ^CL ≤ 0.1 | 1 | 8.3% | +0.2250 |" in table


def test_gates_equal_the_training_gate_exactly() -> None:
    from egrsd_pl.losses import confidence_gate

    torch.manual_seed(1)
    entropy = torch.rand(3, 40) * 4  # [3, 40] nats
    mask = torch.rand(3, 40) > 0.3
    gates = token_gates(entropy, mask, gamma=0.7, window=3)
    for window, gate in ((0, gates.omega), (3, gates.omega_cl)):
        expected = confidence_gate(entropy, mask, gamma=0.7, window=window)
        torch.testing.assert_close(gate[mask], expected[mask], rtol=0, atol=0)

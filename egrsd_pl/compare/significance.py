"""Is a method different from the reference? Welch's t-test over seeds and Holm's correction.

Pure functions over :class:`~egrsd_pl.compare.aggregate.SeedStat` (mean, sample std, number of seeds);
nothing here reads files. The report (:mod:`egrsd_pl.compare.report`) shows, for every method against the
reference, ``Δ = mean − reference mean``, its t-based 95 % confidence interval and the p-value of Welch's
two-sided t-test, Holm-adjusted across the methods of one column (one metric against one reference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from scipy import stats

from egrsd_pl.compare.aggregate import MethodSummary, SeedStat, finite_or_none

CONFIDENCE = 0.95
"""Level of the confidence intervals."""

ALPHA = 0.05
"""Family-wise error rate of the Holm-adjusted marker ``*``."""


class Difference(NamedTuple):
    """A method's mean minus the reference's mean, with Welch's test of that difference.

    Attributes:
        delta: ``mean_a − mean_b`` (NaN when either side has no seed).
        se: ``sqrt(s_a² / n_a + s_b² / n_b)`` from the sample stds (NaN below 2 seeds on either side).
        df: Welch–Satterthwaite degrees of freedom (NaN when undefined: below 2 seeds, or ``se = 0``).
        low: Lower end of the 95 % confidence interval ``delta − t_{0.975, df} · se`` (NaN when undefined).
        high: Upper end ``delta + t_{0.975, df} · se``.
        p_value: Two-sided p-value of Welch's t-test (NaN when undefined).
        n: Seeds of the method.
        n_reference: Seeds of the reference.
    """

    delta: float
    se: float
    df: float
    low: float
    high: float
    p_value: float
    n: int
    n_reference: int

    @property
    def exact(self) -> bool:
        """Both sides have two or more seeds and no spread: the difference is known exactly (``se = 0``)."""
        return self.se == 0.0


def welch_difference(value: SeedStat, reference: SeedStat, *, confidence: float = CONFIDENCE) -> Difference:
    """``value − reference`` with Welch's unequal-variance t-test and its t-based confidence interval.

    ``se² = s_a²/n_a + s_b²/n_b``; ``df = se⁴ / ((s_a²/n_a)² / (n_a − 1) + (s_b²/n_b)² / (n_b − 1))``
    (Welch–Satterthwaite); ``t = Δ / se``; ``p = 2 · P(T_df > |t|)``; CI ``Δ ± t_{(1+confidence)/2, df} · se``.

    Edge cases:

    * Fewer than 2 seeds on either side: no spread estimate, so no test: ``se``, ``df``, the CI and
      ``p`` are NaN (the report writes ``—``, the JSON ``null``); ``delta`` is still the difference of means.
    * No spread on one side only (e.g. every seed gave the same AvgLen): Welch is still defined; that side's
      term vanishes and ``df = n_other − 1``.

    Decision: no spread on **both** sides (``se = 0``, every seed of each method gave the same value) makes
    the t statistic ``Δ / 0`` and the Welch–Satterthwaite ``df`` ``0 / 0``; scipy returns NaN. Then the seeds
    show no noise at all, so the difference is taken as exact: the CI is ``[Δ, Δ]`` and ``p = 0`` when
    ``Δ ≠ 0`` (the limit of the test as both spreads shrink to 0 at any fixed ratio, ``|t| → ∞``) and
    ``p = 1`` when ``Δ = 0`` (no difference to explain); ``df`` stays NaN. The report marks such cells
    ``exact``.

    Example: 67 ± 2 (n 3) against 62 ± 2.828 (n 2): ``se² = 4/3 + 8/2 = 5.333``, ``se = 2.309``,
    ``df = 5.333² / ((4/3)²/2 + 4²/1) = 28.44 / 16.89 = 1.684``, ``t = 2.165``, ``p = 0.186``,
    CI ``5 ± 5.196 · 2.309 = [−6.95, 16.95]`` (the same as ``scipy.stats.ttest_ind(..., equal_var=False)``).
    """
    delta = value.mean - reference.mean if min(value.n, reference.n) > 0 else math.nan
    undefined = Difference(delta, math.nan, math.nan, math.nan, math.nan, math.nan, value.n, reference.n)
    if min(value.n, reference.n) < 2:
        return undefined
    share_a, share_b = value.std**2 / value.n, reference.std**2 / reference.n
    se = math.sqrt(share_a + share_b)
    if se == 0.0:
        p_value = 1.0 if delta == 0 else 0.0
        return Difference(delta, 0.0, math.nan, delta, delta, p_value, value.n, reference.n)
    df = (share_a + share_b) ** 2 / (share_a**2 / (value.n - 1) + share_b**2 / (reference.n - 1))
    p_value = float(2.0 * stats.t.sf(abs(delta) / se, df))
    half_width = float(stats.t.ppf((1.0 + confidence) / 2.0, df)) * se
    return Difference(delta, se, df, delta - half_width, delta + half_width, p_value, value.n, reference.n)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (family-wise error rate, any dependence).

    With the ``m`` defined p-values sorted ascending, ``p_(1) ≤ … ≤ p_(m)``, the adjusted value of the
    ``i``-th is ``max_{j ≤ i} min(1, (m − j + 1) · p_(j))``; rejecting where the adjusted value is below α
    is Holm's procedure at level α. NaN entries (no test) are not part of the family and stay NaN.

    Example: ``[0.01, 0.04, 0.03, nan]``: m = 3; sorted 0.01, 0.03, 0.04 → 3·0.01 = 0.03, 2·0.03 = 0.06,
    max(0.06, 1·0.04) = 0.06 → ``[0.03, 0.06, 0.06, nan]``.
    """
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


METRICS = {"avg": "Acc", "avg_len": "AvgLen", "eff": "Eff"}
"""The compared statistics of a :class:`MethodSummary` (attribute → column name); each is its own Holm family."""


class Tested(NamedTuple):
    """One method against the reference on one metric: the test and its Holm-adjusted p-value."""

    difference: Difference
    p_holm: float

    @property
    def significant(self) -> bool:
        """Holm-adjusted ``p < ALPHA`` (never for an undefined test)."""
        return self.p_holm < ALPHA


def choose_reference(summaries: Sequence[MethodSummary], name: str | None = None) -> MethodSummary | None:
    """The reference of a difference table: the method called ``name`` (``--reference``), else the first
    untrained method, else the first with results; ``None`` when it (or every method) has no results."""
    finished = [s for s in summaries if s.runs]
    if name is not None:
        return next((s for s in finished if s.name == name), None)
    return next((s for s in finished if not s.trained), finished[0] if finished else None)


def against_reference(
    summaries: Sequence[MethodSummary], reference: MethodSummary
) -> list[tuple[MethodSummary, dict[str, Tested]]]:
    """Every finished method but the reference, tested against it on each of :data:`METRICS`.

    The family of Holm's correction is one metric against one reference: the p-values of all compared
    methods in that column (methods without a test, below 2 seeds, are not counted).
    """
    others = [s for s in summaries if s.runs and s is not reference]
    tested: list[dict[str, Tested]] = [{} for _ in others]
    for metric in METRICS:
        differences = [welch_difference(getattr(s, metric), getattr(reference, metric)) for s in others]
        adjusted = holm_adjust([d.p_value for d in differences])
        for row, d, p in zip(tested, differences, adjusted, strict=True):
            row[metric] = Tested(d, p)
    return list(zip(others, tested, strict=True))


def differences_json(summaries: Sequence[MethodSummary], reference: MethodSummary) -> dict[str, Any]:
    """The tests against ``reference`` for ``comparison.json``; undefined values are ``null``, never NaN."""

    def entry(t: Tested) -> dict[str, Any]:
        d = t.difference
        fields = {"delta": d.delta, "se": d.se, "df": d.df, "ci_low": d.low, "ci_high": d.high}
        fields |= {"p_value": d.p_value, "p_holm": t.p_holm}
        values: dict[str, Any] = {k: finite_or_none(v) for k, v in fields.items()}
        return {
            **values,
            "n": d.n,
            "n_reference": d.n_reference,
            "exact": d.exact,
            "significant": t.significant,
        }

    return {
        "reference": reference.name,
        "confidence": CONFIDENCE,
        "alpha": ALPHA,
        "test": "Welch two-sided t-test over seeds; Holm-adjusted per metric across the compared methods",
        "methods": {
            s.name: {m: entry(t) for m, t in row.items()}
            for s, row in against_reference(summaries, reference)
        },
    }

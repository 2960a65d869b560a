"""Seed statistics of a comparison: per method, mean ± sample standard deviation of every cell of the
paper's Tables 2 and 5, and the Pareto frontier of the accuracy–length plane (Fig. 1).

Pure functions over the ``results.json`` files that ``main.py validate`` writes
(:func:`egrsd_pl.evaluation.write_report`); nothing here runs a model.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple


class RunResult(NamedTuple):
    """The evaluation of one (method, seed): accuracies in percent, lengths in tokens.

    Attributes:
        method: The method's name.
        seed: The run's seed.
        path: Its ``results.json``.
        k: Samples per problem (avg@K).
        accuracy: avg@K per benchmark, in evaluation order.
        avg: ``Avg.``: macro mean of avg@K over the benchmarks.
        avg_len: ``AvgLen``: macro mean over the benchmarks of the mean completion length.
    """

    method: str
    seed: int
    path: str
    k: int
    accuracy: dict[str, float]
    avg: float
    avg_len: float

    @property
    def eff(self) -> float:
        """Token efficiency ``Eff = Acc(%) / (AvgLen / 1000)`` (NaN when AvgLen is 0)."""
        return token_efficiency(self.avg, self.avg_len)


def token_efficiency(accuracy: float, avg_len: float) -> float:
    """``Eff = Acc(%) / (AvgLen / 1000)``: accuracy points per thousand tokens (paper, Table 5)."""
    return accuracy / (avg_len / 1000.0) if avg_len > 0 else math.nan


def read_result(path: str | Path, method: str, seed: int) -> RunResult:
    """Reads one ``results.json`` (keys ``k``, ``avg``, ``avg_len``, ``benchmarks.<name>.avg_at_k``;
    other keys are ignored)."""
    data = json.loads(Path(path).read_text())
    try:
        accuracy = {name: float(s["avg_at_k"]) for name, s in data["benchmarks"].items()}
        return RunResult(
            method, seed, str(path), int(data["k"]), accuracy, float(data["avg"]), float(data["avg_len"])
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: not a results.json of main.py validate ({error!r})") from error


class SeedStat(NamedTuple):
    """Mean and sample standard deviation (``n − 1`` in the denominator; NaN for one seed) over seeds."""

    mean: float
    std: float
    n: int


def seed_stat(values: Sequence[float]) -> SeedStat:
    """Mean ± sample std of ``values`` (one per seed).

    Example: ``[60, 62, 64]`` → mean 62, std ``sqrt(((−2)² + 0² + 2²) / 2) = 2``. A NaN value makes both
    NaN (``n`` still counts it).
    """
    if not values:
        return SeedStat(math.nan, math.nan, 0)
    if any(math.isnan(v) for v in values):  # e.g. Eff of a run with AvgLen 0 (statistics.stdev fails on NaN)
        return SeedStat(math.nan, math.nan, len(values))
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return SeedStat(statistics.fmean(values), std, len(values))


@dataclass(frozen=True)
class MethodSummary:
    """One row of the comparison: a method's statistics over its finished seeds.

    Attributes:
        name: The method's name.
        label: Its label in tables and figures.
        trained: ``False`` for an evaluation of the base model (no-train).
        runs: The finished runs, by seed.
        accuracy: avg@K per benchmark over seeds.
        avg: ``Avg.`` over seeds.
        avg_len: ``AvgLen`` over seeds.
        eff: ``Eff`` of each run, over seeds.
        on_frontier: Whether the method's mean point is Pareto-optimal (:func:`pareto_frontier`).
    """

    name: str
    label: str
    trained: bool
    runs: tuple[RunResult, ...]
    accuracy: dict[str, SeedStat]
    avg: SeedStat
    avg_len: SeedStat
    eff: SeedStat
    on_frontier: bool = False

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]


def summarize_method(name: str, label: str, trained: bool, runs: Sequence[RunResult]) -> MethodSummary:
    """Seed statistics of one method's runs (all evaluated on the same benchmarks)."""
    benchmarks = list(runs[0].accuracy) if runs else []
    for run in runs:
        if list(run.accuracy) != benchmarks:
            raise ValueError(
                f"method {name!r}: {run.path} has benchmarks {list(run.accuracy)}, "
                f"{runs[0].path} has {benchmarks}; runs of one comparison must share the evaluation"
            )
    ordered = tuple(sorted(runs, key=lambda r: r.seed))
    return MethodSummary(
        name=name,
        label=label,
        trained=trained,
        runs=ordered,
        accuracy={b: seed_stat([r.accuracy[b] for r in ordered]) for b in benchmarks},
        avg=seed_stat([r.avg for r in ordered]),
        avg_len=seed_stat([r.avg_len for r in ordered]),
        eff=seed_stat([r.eff for r in ordered]),
    )


def pareto_frontier(points: Mapping[str, tuple[float, float]]) -> set[str]:
    """Names of the Pareto-optimal points of the accuracy–length plane: higher accuracy and lower length
    are better; a point is dominated when another is at least as good on both and better on one.

    Args:
        points: ``{name: (accuracy, length)}``; points with a NaN coordinate are never on the frontier.

    Example: ``a (60, 100)``, ``b (62, 120)``, ``c (59, 110)``: ``c`` is dominated by ``a`` (more accurate
    and shorter); ``a`` (shortest) and ``b`` (most accurate) are the frontier.
    """
    valid = {n: p for n, p in points.items() if not (math.isnan(p[0]) or math.isnan(p[1]))}

    def dominates(p: tuple[float, float], q: tuple[float, float]) -> bool:
        return p[0] >= q[0] and p[1] <= q[1] and (p[0] > q[0] or p[1] < q[1])

    return {n for n, p in valid.items() if not any(dominates(q, p) for m, q in valid.items() if m != n)}


def summarize(
    methods: Sequence[tuple[str, str, bool]], results: Mapping[str, Sequence[RunResult]]
) -> list[MethodSummary]:
    """Summaries in method order, with the frontier membership of methods that have results.

    Args:
        methods: ``(name, label, trained)`` of every method, in table order.
        results: The finished runs of each method (a method without any keeps ``n = 0`` rows of NaN).
    """
    summaries = [summarize_method(n, label, t, results.get(n, ())) for n, label, t in methods]
    ks = {run.k for s in summaries for run in s.runs}
    if len(ks) > 1:
        raise ValueError(f"the runs were evaluated with different K ({sorted(ks)}); compare like with like")
    frontier = pareto_frontier({s.name: (s.avg.mean, s.avg_len.mean) for s in summaries if s.runs})
    return [
        MethodSummary(**{**s.__dict__, "on_frontier": s.name in frontier})  # frozen: rebuild with the flag
        for s in summaries
    ]


@dataclass(frozen=True)
class SnapshotSummary:
    """A method's evaluations of every saved checkpoint (``--snapshots``; the paper's Table 4, S1–S4).

    Attributes:
        name: The method's name.
        label: Its label.
        runs: ``(step, result)`` of every evaluated snapshot, by seed then step.
        avg: ``Avg.`` over seeds at each step.
        avg_len: ``AvgLen`` over seeds at each step.
        mean_avg: Over seeds, each run's mean ``Avg.`` over its snapshots; only runs with a result at every
            step of the method (a run with a snapshot still to evaluate would average other steps).
        mean_avg_len: The same for ``AvgLen``.
    """

    name: str
    label: str
    runs: tuple[tuple[int, RunResult], ...]
    avg: dict[int, SeedStat]
    avg_len: dict[int, SeedStat]
    mean_avg: SeedStat
    mean_avg_len: SeedStat

    @property
    def steps(self) -> list[int]:
        return sorted(self.avg)


def summarize_snapshots(name: str, label: str, snapshots: Sequence[tuple[int, RunResult]]) -> SnapshotSummary:
    """Seed statistics of one method's snapshot evaluations, per step and averaged over steps.

    Example: seed 0 at steps 2, 4 with Avg. 40, 50 and seed 1 with 44, 54: step 2 is 42 ± 2.83, step 4
    52 ± 2.83; the runs' means over snapshots are 45 and 49, so the mean over snapshots is 47 ± 2.83.
    """
    ordered = tuple(sorted(snapshots, key=lambda item: (item[1].seed, item[0])))
    steps = sorted({step for step, _ in ordered})
    by_seed: dict[int, dict[int, RunResult]] = {}
    for step, result in ordered:
        by_seed.setdefault(result.seed, {})[step] = result
    complete = [runs for runs in by_seed.values() if len(runs) == len(steps)]
    return SnapshotSummary(
        name=name,
        label=label,
        runs=ordered,
        avg={t: seed_stat([r.avg for step, r in ordered if step == t]) for t in steps},
        avg_len={t: seed_stat([r.avg_len for step, r in ordered if step == t]) for t in steps},
        mean_avg=seed_stat([statistics.fmean(r.avg for r in runs.values()) for runs in complete]),
        mean_avg_len=seed_stat([statistics.fmean(r.avg_len for r in runs.values()) for runs in complete]),
    )


def snapshots_json(summaries: Sequence[SnapshotSummary]) -> dict[str, Any]:
    """The ``snapshots`` entry of ``comparison.json``: steps, per-step and mean-over-snapshots statistics and
    every evaluated snapshot (seed, step, path, Avg., AvgLen)."""

    def stat(value: SeedStat) -> dict[str, Any]:
        return {"mean": finite_or_none(value.mean), "std": finite_or_none(value.std), "n": value.n}

    return {
        "steps": sorted({t for s in summaries for t in s.steps}),
        "methods": {
            s.name: {
                "label": s.label,
                "steps": {str(t): {"avg": stat(s.avg[t]), "avg_len": stat(s.avg_len[t])} for t in s.steps},
                "mean_over_snapshots": {"avg": stat(s.mean_avg), "avg_len": stat(s.mean_avg_len)},
                "runs": [
                    {"seed": r.seed, "step": t, "path": r.path}
                    | {"avg": finite_or_none(r.avg), "avg_len": finite_or_none(r.avg_len)}
                    for t, r in s.runs
                ],
            }
            for s in summaries
        },
    }


def benchmarks_of(summaries: Sequence[MethodSummary]) -> list[str]:
    """The benchmarks of the comparison (those of the first method with results)."""
    return next((list(s.accuracy) for s in summaries if s.runs), [])


def k_of(summaries: Sequence[MethodSummary]) -> int | None:
    """K of avg@K (shared by every run; ``None`` when nothing finished)."""
    return next((s.runs[0].k for s in summaries if s.runs), None)


def to_json(summaries: Sequence[MethodSummary], **header: Any) -> dict[str, Any]:
    """``comparison.json``: ``header`` and, per method, every statistic and every run (seed, path, values)."""

    def stat(value: SeedStat) -> dict[str, Any]:
        return {"mean": finite_or_none(value.mean), "std": finite_or_none(value.std), "n": value.n}

    return {
        **header,
        "k": k_of(summaries),
        "benchmarks": benchmarks_of(summaries),
        "methods": {
            s.name: {
                "label": s.label,
                "trained": s.trained,
                "seeds": s.seeds,
                "accuracy": {b: stat(v) for b, v in s.accuracy.items()},
                "avg": stat(s.avg),
                "avg_len": stat(s.avg_len),
                "eff": stat(s.eff),
                "on_frontier": s.on_frontier,
                "runs": [
                    {
                        **r._asdict(),
                        "accuracy": {b: finite_or_none(v) for b, v in r.accuracy.items()},
                        "avg": finite_or_none(r.avg),
                        "avg_len": finite_or_none(r.avg_len),
                        "eff": finite_or_none(r.eff),
                        "run_dir": str(Path(r.path).parents[2]),
                    }
                    for r in s.runs
                ],
            }
            for s in summaries
        },
    }


def finite_or_none(value: float) -> float | None:
    """``value``, or ``None`` for NaN and ±inf (strict JSON has neither)."""
    return value if math.isfinite(value) else None

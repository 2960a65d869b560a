"""The comparison's report: ``comparison.md`` (Tables 2 and 5 of the paper, mean ± std over seeds),
``comparison.json`` and ``frontier.png`` (Fig. 1: Avg. against AvgLen with seed error bars and the
Pareto frontier)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from egrsd_pl.compare.aggregate import (
    MethodSummary,
    SeedStat,
    SnapshotSummary,
    benchmarks_of,
    k_of,
    snapshots_json,
    to_json,
)
from egrsd_pl.compare.significance import (
    ALPHA,
    METRICS,
    Tested,
    against_reference,
    choose_reference,
    differences_json,
)
from egrsd_pl.json_files import write_json


def format_stat(value: SeedStat, digits: int = 2, *, thousands: bool = False) -> str:
    """``mean ± std`` (``mean`` alone for one seed, ``—`` for none); ``thousands`` adds separators."""
    if value.n == 0:
        return "—"
    spec = f",.{digits}f" if thousands else f".{digits}f"
    mean = format(value.mean, spec)
    return mean if math.isnan(value.std) else f"{mean} ± {format(value.std, spec)}"


def accuracy_table(summaries: Sequence[MethodSummary]) -> str:
    """Table 2: avg@K per benchmark and Avg., one row per method, with the number of seeds."""
    benchmarks = benchmarks_of(summaries)
    k = k_of(summaries)
    head = [f"{b} avg@{k}" for b in benchmarks]
    lines = [
        "| Method | seeds | " + " | ".join([*head, "Avg."]) + " |",
        "|---|---:|" + "---:|" * (len(head) + 1),
    ]
    for s in summaries:
        cells = [format_stat(s.accuracy.get(b, SeedStat(math.nan, math.nan, 0))) for b in benchmarks]
        lines.append(f"| {s.label} | {len(s.runs)} | " + " | ".join([*cells, format_stat(s.avg)]) + " |")
    return "\n".join(lines)


def efficiency_table(summaries: Sequence[MethodSummary]) -> str:
    """Table 5: Acc (= Avg.), AvgLen and Eff per method, and whether it is on the Pareto frontier."""
    lines = ["| Method | seeds | Acc | AvgLen | Eff | Pareto |", "|---|---:|---:|---:|---:|:---:|"]
    for s in summaries:
        cells = [
            format_stat(s.avg),
            format_stat(s.avg_len, 1, thousands=True),
            format_stat(s.eff),
            "●" if s.on_frontier else "",
        ]
        lines.append(f"| {s.label} | {len(s.runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_p(p_value: float) -> str:
    """A p-value in a cell: ``—`` when undefined, ``<0.001`` below that, else three decimals."""
    if math.isnan(p_value):
        return "—"
    return "0" if p_value == 0 else "<0.001" if p_value < 0.001 else f"{p_value:.3f}"


def difference_cells(tested: Tested, digits: int = 2) -> list[str]:
    """``Δ``, ``[low, high]`` (``exact`` with no spread on either side, ``—`` without a test), ``p`` and the
    Holm-adjusted ``p`` followed by ``*`` when that is below 0.05."""
    d = tested.difference
    if math.isnan(d.delta):
        return ["—"] * 4
    interval = (
        "exact" if d.exact else "—" if math.isnan(d.low) else f"[{d.low:+.{digits}f}, {d.high:+.{digits}f}]"
    )
    holm = format_p(tested.p_holm) + (" *" if tested.significant else "")
    return [f"{d.delta:+.{digits}f}", interval, format_p(d.p_value), holm]


def difference_table(summaries: Sequence[MethodSummary], reference_name: str | None = None) -> str:
    """Each method against a reference (:func:`choose_reference`: ``--reference``, e.g. RLSD for the gate's
    own effect, else the untrained model): one table per metric (Acc, AvgLen, Eff) with Δ, its 95 %
    confidence interval, Welch's p and the Holm-adjusted p over the table's methods, ``*`` where that is
    below 0.05, and the seeds of both sides. Empty when the reference has no results."""
    reference = choose_reference(summaries, reference_name)
    if reference is None:
        return ""
    rows = against_reference(summaries, reference)
    name = reference.label
    lines = [
        f"Against {name} (Δ = method − {name} over seeds; 95 % CI from Welch's t with Welch–Satterthwaite "
        f"degrees of freedom; p of Welch's two-sided t-test, Holm-adjusted across the methods of each table; "
        f"* where the adjusted p < {ALPHA}; seeds: method vs {name}). Fewer than 2 seeds on a side: no test "
        f"(—); no spread on either side: the difference is exact (p 0, or 1 when Δ = 0).",
    ]
    for metric, column in METRICS.items():
        digits = 1 if metric == "avg_len" else 2
        lines += [
            "",
            f"| Method | seeds | Δ {column} | 95 % CI | p | p (Holm) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for s, tests in rows:
            t = tests[metric]
            seeds = f"{t.difference.n} vs {t.difference.n_reference}"
            lines.append(f"| {s.label} | {seeds} | " + " | ".join(difference_cells(t, digits)) + " |")
    return "\n".join(lines)


def snapshot_table(snapshots: Sequence[SnapshotSummary], metric: str = "avg") -> str:
    """Table 4: ``metric`` (``avg``: Avg., ``avg_len``: AvgLen) of each saved checkpoint S1, S2, … (by step)
    and its mean over snapshots, mean ± std over seeds; ``seeds`` counts the seeds with any snapshot and a
    cell over fewer seeds says ``(n=k)``. Methods without snapshots (untrained) have no row."""
    shown = [s for s in snapshots if s.runs]
    steps = sorted({t for s in shown for t in s.steps})
    digits, thousands = (1, True) if metric == "avg_len" else (2, False)
    head = [f"S{i} (step {t})" for i, t in enumerate(steps, 1)]
    lines = [
        "| Method | seeds | " + " | ".join([*head, "mean over snapshots"]) + " |",
        "|---|---:|" + "---:|" * (len(head) + 1),
    ]
    for s in shown:
        seeds = len({r.seed for _, r in s.runs})
        by_step = s.avg if metric == "avg" else s.avg_len
        mean = s.mean_avg if metric == "avg" else s.mean_avg_len
        values = [by_step.get(t, SeedStat(math.nan, math.nan, 0)) for t in steps] + [mean]
        cells = [
            format_stat(v, digits, thousands=thousands) + ("" if v.n in (0, seeds) else f" (n={v.n})")
            for v in values
        ]
        lines.append(f"| {s.label} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_markdown(
    summaries: Sequence[MethodSummary],
    *,
    command: str,
    pending: int,
    reference: str | None = None,
    snapshots: Sequence[SnapshotSummary] | None = None,
) -> str:
    """``comparison.md``: how it was produced, the two tables, the differences against the untrained model
    and, with ``reference``, against that method too; with ``snapshots``, Table 4 (Avg. and AvgLen of
    every saved checkpoint and their mean over snapshots)."""
    k = k_of(summaries)
    parts = [
        "# Comparison",
        "",
        f"`{command}`",
        "",
        f"Every cell is the mean ± sample standard deviation (n − 1) over the seeds that finished; avg@{k} "
        "and Acc in percent, AvgLen in tokens (macro mean over benchmarks), Eff = Acc / (AvgLen / 1000) "
        "per run. ● marks the Pareto frontier of the method means (higher Acc, lower AvgLen).",
    ]
    if pending:
        parts += ["", f"**Partial:** {pending} run(s) are not finished (results still to compute)."]
    parts += [
        "",
        "## Accuracy (Table 2)",
        "",
        accuracy_table(summaries),
        "",
        "## Efficiency (Table 5)",
        "",
        efficiency_table(summaries),
        "",
        "## Differences between methods",
        "",
        difference_table(summaries),
        "",
    ]
    # --reference naming the default reference (no untrained method, the first one) would repeat its block
    again = reference is not None and choose_reference(summaries, reference) is choose_reference(summaries)
    against = difference_table(summaries, reference) if reference is not None and not again else ""
    if against:
        parts += [against, ""]
    if snapshots is not None:
        parts += [
            "## Snapshots (Table 4)",
            "",
            "Every saved checkpoint S1, S2, … (by optimizer step) of each trained run, evaluated like the final "
            "one; the mean over snapshots averages each run's snapshots first (runs with every snapshot "
            "evaluated), then takes mean ± std over seeds.",
            "",
            "Avg. (%):",
            "",
            snapshot_table(snapshots, "avg"),
            "",
            "AvgLen (tokens):",
            "",
            snapshot_table(snapshots, "avg_len"),
            "",
        ]
    return "\n".join(parts)


def label_offsets(points: Sequence[tuple[float, float]], *, near: float = 0.04, step: int = 11) -> list[int]:
    """Vertical label offsets (points) that stack the labels of methods lying on top of each other.

    A point within ``near`` of the plotted span (in both directions) of an earlier point gets its label one
    line (``step`` points) below the lowest label of that cluster; other labels sit 5 points above the point.
    """
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x_span = (max(xs) - min(xs)) or 1.0 if points else 1.0
    y_span = (max(ys) - min(ys)) or 1.0 if points else 1.0
    offsets: list[int] = []
    for i, (x, y) in enumerate(points):
        close = [
            offsets[j]
            for j in range(i)
            if abs(points[j][0] - x) <= near * x_span and abs(points[j][1] - y) <= near * y_span
        ]
        offsets.append(min(close) - step if close else 5)
    return offsets


def frontier_figure(summaries: Sequence[MethodSummary]) -> Any:
    """Fig. 1: one point per method at (mean AvgLen, mean Avg.) with ±1 seed std error bars in both
    directions, the Pareto frontier as a dashed staircase through its members (edged in black, labels in
    bold), the untrained model as a grey star. A matplotlib ``Figure`` on an Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    shown = [s for s in summaries if s.runs]
    colors = [f"C{i}" for i in range(10)]
    offsets = label_offsets([(s.avg_len.mean, s.avg.mean) for s in shown])
    for i, s in enumerate(shown):
        x, y = s.avg_len.mean, s.avg.mean
        xerr = 0.0 if math.isnan(s.avg_len.std) else s.avg_len.std
        yerr = 0.0 if math.isnan(s.avg.std) else s.avg.std
        marker, size, color = ("*", 14, "0.4") if not s.trained else ("o", 7, colors[i % len(colors)])
        axes.errorbar(
            x, y, xerr=xerr, yerr=yerr, capsize=3, linestyle="none", marker=marker, markersize=size, color=color,
            markeredgecolor="black" if s.on_frontier else color, markeredgewidth=1.5 if s.on_frontier else 1,
            label="no training" if not s.trained else None,
        )  # fmt: skip
        weight = "bold" if s.on_frontier else "normal"
        axes.annotate(
            f"{s.label} (n={len(s.runs)})", (x, y), textcoords="offset points", xytext=(6, offsets[i]), fontsize=8,
            weight=weight,
        )  # fmt: skip
    frontier = sorted((s.avg_len.mean, s.avg.mean) for s in shown if s.on_frontier)
    if len(frontier) > 1:
        xs, ys = [frontier[0][0]], [frontier[0][1]]
        for x, y in frontier[1:]:  # staircase: what is reachable at each length
            xs += [x, x]
            ys += [ys[-1], y]
        axes.plot(xs, ys, "--", color="0.3", linewidth=1, label="Pareto frontier")
    axes.margins(x=0.2, y=0.1)  # room for the labels
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right", fontsize=8)
    k = k_of(summaries)
    axes.set_xlabel("AvgLen (tokens) — shorter is better")
    axes.set_ylabel(f"Avg. (avg@{k}, %) — higher is better")
    axes.set_title("Accuracy–length plane (mean ± std over seeds)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def write_comparison(
    summaries: Sequence[MethodSummary],
    output: str | Path,
    *,
    command: str,
    pending: int,
    reference: str | None = None,
    snapshots: Sequence[SnapshotSummary] | None = None,
    **header: Any,
) -> dict[str, Path]:
    """Writes ``comparison.md``, ``comparison.json`` and ``frontier.png`` (when a method has results).

    ``comparison.json`` is strict JSON: an undefined statistic (one seed, no test) is ``null``, never NaN;
    ``differences`` holds the tests against the default reference and against ``reference``, by its name;
    ``snapshots`` (with ``snapshots``) the per-snapshot statistics.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "comparison.md", "json": out / "comparison.json"}
    paths["markdown"].write_text(
        comparison_markdown(
            summaries, command=command, pending=pending, reference=reference, snapshots=snapshots
        )
    )
    data = to_json(summaries, command=command, pending_runs=pending, **header)
    references = [
        choose_reference(summaries),
        *([choose_reference(summaries, reference)] if reference else []),
    ]
    data["differences"] = {r.name: differences_json(summaries, r) for r in references if r is not None}
    if snapshots is not None:
        data["snapshots"] = snapshots_json(snapshots)
    write_json(paths["json"], data)
    if any(s.runs for s in summaries):
        paths["plot"] = out / "frontier.png"
        frontier_figure(summaries).savefig(paths["plot"])
    return paths

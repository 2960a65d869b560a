"""The comparison's report: ``comparison.md`` (Tables 2 and 5 of the paper, mean ± std over seeds),
``comparison.json`` and ``frontier.png`` (Fig. 1: Avg. against AvgLen with seed error bars and the
Pareto frontier)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from egrsd_pl.compare.aggregate import (
    Difference,
    MethodSummary,
    SeedStat,
    benchmarks_of,
    difference,
    k_of,
    to_json,
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


def format_difference(value: Difference, digits: int = 2) -> str:
    """``+Δ ± se`` and ``*`` when the difference exceeds two standard errors."""
    if math.isnan(value.delta):
        return "—"
    text = f"{value.delta:+.{digits}f}" + ("" if math.isnan(value.se) else f" ± {value.se:.{digits}f}")
    return text + (" *" if value.separated else "")


def difference_table(summaries: Sequence[MethodSummary], reference_name: str | None = None) -> str:
    """Each method against a reference: the method named ``reference_name`` (``--reference``, e.g. RLSD for
    the gate's own effect), else the first untrained method, else the first with results. Δ Acc, Δ AvgLen and
    Δ Eff with their standard errors; ``*`` marks |Δ| > 2 SE. Empty when the reference has no results."""
    finished = [s for s in summaries if s.runs]
    if not finished:
        return ""
    if reference_name is not None:
        named = [s for s in finished if s.name == reference_name]
        if not named:
            return ""
        reference = named[0]
    else:
        reference = next((s for s in finished if not s.trained), finished[0])
    lines = [
        f"Against {reference.label} (Δ = method − {reference.label}, ± its standard error over seeds; "
        "* where |Δ| > 2 SE):",
        "",
        "| Method | Δ Acc | Δ AvgLen | Δ Eff |",
        "|---|---:|---:|---:|",
    ]
    for s in finished:
        if s is reference:
            continue
        cells = [
            format_difference(difference(s.avg, reference.avg)),
            format_difference(difference(s.avg_len, reference.avg_len), 1),
            format_difference(difference(s.eff, reference.eff)),
        ]
        lines.append(f"| {s.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_markdown(
    summaries: Sequence[MethodSummary], *, command: str, pending: int, reference: str | None = None
) -> str:
    """``comparison.md``: how it was produced, the two tables, the differences against the untrained model
    and, with ``reference``, against that method too."""
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
        parts += ["", f"**Partial:** {pending} run(s) have no results yet."]
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
        "## Differences beyond the seed spread",
        "",
        difference_table(summaries),
        "",
    ]
    against = difference_table(summaries, reference) if reference is not None else ""
    if against:
        parts += [against, ""]
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
    **header: Any,
) -> dict[str, Path]:
    """Writes ``comparison.md``, ``comparison.json`` and ``frontier.png`` (when a method has results)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "comparison.md", "json": out / "comparison.json"}
    paths["markdown"].write_text(
        comparison_markdown(summaries, command=command, pending=pending, reference=reference)
    )
    data = to_json(summaries, command=command, pending_runs=pending, **header)
    write_json(paths["json"], data)
    if any(s.runs for s in summaries):
        paths["plot"] = out / "frontier.png"
        frontier_figure(summaries).savefig(paths["plot"])
    return paths

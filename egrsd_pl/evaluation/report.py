"""Evaluation reports: the Markdown table, the accuracy–length plane and the results files.

``write_report`` writes one evaluation's folder: ``results.json`` (read back by :func:`load_history`
and by ``egrsd compare``; fields are only ever added), ``results.md``, ``frontier.png`` and the
per-sample ``completions.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egrsd_pl.evaluation.scoring import BenchmarkScores, EvalResult
from egrsd_pl.json_files import dumps, write_json


def format_table(result: EvalResult, *, title: str | None = None) -> str:
    """One Markdown row per benchmark (problems, avg@K, pass@K, length, % truncated) and the Avg. row.

    A benchmark run ``R > 1`` times shows ``mean ± std`` of avg@K over the runs and ``R`` in ``runs``.
    """
    k = result.k
    lines = [f"### {title}", ""] if title else []
    lines += [
        f"| benchmark | problems | runs | avg@{k} | pass@{k} | length | truncated |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in result.benchmarks.items():
        lines.append(
            f"| {name} | {s.num_problems:,} | {s.repeats} | {_accuracy(s)} | {s.pass_at_k:.2f} "
            f"| {s.mean_length:,.0f} | {s.truncated:.1f}% |"
        )
    total = sum(s.num_problems for s in result.benchmarks.values())
    lines.append(f"| **Avg.** | {total:,} | | {result.avg:.2f} | | {result.avg_len:,.0f} | |")
    lines += [
        "",
        f"Eff = Acc(%) / (AvgLen / 1000) = {result.eff:.2f}. Truncated: share of completions cut by "
        f"max_new_tokens = {result.sampling.max_new_tokens:,} without a stop token.",
    ]
    return "\n".join(lines)


def _accuracy(scores: BenchmarkScores) -> str:
    if scores.repeats == 1:
        return f"{scores.avg_at_k:.2f}"
    return f"{scores.avg_at_k:.2f} ± {scores.avg_at_k_std:.2f}"


@dataclass(frozen=True)
class FrontierPoint:
    """One evaluated checkpoint on the accuracy–length plane (Avg. in percent, AvgLen in tokens)."""

    label: str
    step: int
    avg: float
    avg_len: float


def load_history(report_dir: str | Path) -> list[FrontierPoint]:
    """Frontier points of every ``<report_dir>/*/results.json`` (earlier evaluations), by step then label."""
    points = []
    for path in sorted(Path(report_dir).glob("*/results.json")):
        data = json.loads(path.read_text())
        points.append(
            FrontierPoint(data["label"], int(data["step"]), float(data["avg"]), float(data["avg_len"]))
        )
    return sorted(points, key=lambda p: (p.step, p.label))


def frontier_figure(points: Sequence[FrontierPoint]) -> Any:
    """A matplotlib ``Figure`` (Agg canvas, no pyplot state): Avg. against AvgLen, one labelled point each,
    joined in step order; the last of ``points`` (the newest evaluation) in red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    ordered = sorted(points, key=lambda p: p.step)
    axes.plot([p.avg_len for p in ordered], [p.avg for p in ordered], "-o", color="tab:blue", alpha=0.6)
    if points:  # the newest evaluation stands out
        axes.plot([points[-1].avg_len], [points[-1].avg], "o", color="tab:red", markersize=8)
    for point in ordered:
        axes.annotate(
            point.label, (point.avg_len, point.avg), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    axes.set_xlabel("AvgLen (tokens)")
    axes.set_ylabel("Avg. (avg@K, %)")
    axes.set_title("Accuracy–length plane")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def figure_to_rgb(figure: Any) -> Any:
    """Renders a figure to a ``[H, W, 3]`` uint8 numpy array (for ``SummaryWriter.add_image``)."""
    import numpy as np

    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()  # [H, W, 3]


def write_report(
    result: EvalResult,
    out_dir: str | Path,
    *,
    step: int,
    history: Sequence[FrontierPoint] = (),
    label: str | None = None,
) -> dict[str, Path]:
    """Writes one evaluation's files; call it on every rank.

    Rank 0 writes ``results.json`` (scores, sampling, label, step), ``results.md`` (the table) and
    ``frontier.png`` (``history`` plus this point, one per evaluated checkpoint); every rank writes its
    samples to ``completions.jsonl`` (``completions.rank<r>.jsonl`` when ``world_size > 1``).

    Args:
        result: The evaluation.
        out_dir: Folder of this evaluation (e.g. ``<log_dir>/eval/step_000025``); created if missing.
        step: Optimizer step of the evaluated weights.
        history: Earlier frontier points (a point with this ``label`` is replaced).
        label: Name of the point; default ``step_<step>``.

    Returns:
        The written paths by kind (``json``, ``markdown``, ``plot``, ``completions``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label = label if label is not None else f"step_{step:06d}"
    name = "completions.jsonl" if result.world_size == 1 else f"completions.rank{result.rank}.jsonl"
    paths = {"completions": out / name}
    with paths["completions"].open("w", encoding="utf-8") as handle:
        for sample in result.samples:
            handle.write(dumps(sample._asdict(), ensure_ascii=False) + "\n")
    if result.rank != 0:
        return paths
    paths.update(json=out / "results.json", markdown=out / "results.md", plot=out / "frontier.png")
    summary = {"label": label, "step": step, **result.summary()}
    write_json(paths["json"], summary)
    paths["markdown"].write_text(format_table(result, title=f"{label} (step {step})") + "\n")
    points = [p for p in history if p.label != label] + [
        FrontierPoint(label, step, result.avg, result.avg_len)
    ]
    frontier_figure(points).savefig(paths["plot"])
    return paths

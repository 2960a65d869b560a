"""avg@K scoring on the paper's benchmarks, shared by the periodic callback and ``main.py validate``.

The paper's claim lives on the accuracy–length plane (§5.1): for every benchmark, K samples per
problem (K = 4, T = 1.0, top-p 0.95, up to 32,768 new tokens, Qwen3 thinking mode on), checked
against the gold answer; ``avg@K`` per benchmark, ``Avg.`` = macro mean of ``avg@K`` over the
benchmarks, ``AvgLen`` = mean completion length in tokens, token efficiency
``Eff = Acc(%) / (AvgLen / 1000)``.

This module is independent of Lightning: :func:`evaluate` takes a
:class:`~egrsd_pl.rollout.base.RolloutEngine`, a prompt builder and loaded problems, scores this
rank's shard (rank ``r`` of ``W`` takes problems ``r, r + W, ...``) and reduces the sums with
torchmetrics, so every rank returns the same global numbers under DDP.

Benchmarks by short name (:data:`PAPER_BENCHMARKS`); with ``bench_dir`` they are read from
``<bench_dir>/<name>.jsonl`` (columns ``id``, ``problem``, ``answer``: the normalised copies in
``shared/data/bench``), otherwise from the hub:

=========  ===========================  =======  ===============  ==============
name       hub id                       split    problem column   answer column
=========  ===========================  =======  ===============  ==============
aime24     HuggingFaceH4/aime_2024      train    problem          answer
aime25     yentinglin/aime_2025         train    problem          answer
hmmt25     MathArena/hmmt_feb_2025      train    problem          answer
math500    HuggingFaceH4/MATH-500       test     problem          answer
minerva    math-ai/minervamath          test     question         answer
gsm8k      openai/gsm8k (config main)   test     question         answer (after ``####``)
synthetic  ``synthetic:200``            test     (testbed)        (testbed)
=========  ===========================  =======  ===============  ==============

``synthetic`` is the held-out split of the tiny testbed's arithmetic problems.

Accuracies (``avg@K``, ``pass@K``, ``Avg.``) are percentages, as in the paper's tables.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torchmetrics import Metric
from tqdm.auto import tqdm

from egrsd_pl.problem_sources import load_problems
from egrsd_pl.problem import Problem
from egrsd_pl.rewards import AnswerVerifier
from egrsd_pl.rollout.base import Rollout, RolloutEngine, SamplingConfig


class _Source(NamedTuple):
    hub_id: str
    split: str
    problem_column: str
    answer_column: str
    id_column: str | None


PAPER_BENCHMARKS: dict[str, _Source] = {
    "aime24": _Source("HuggingFaceH4/aime_2024", "train", "problem", "answer", None),
    "aime25": _Source("yentinglin/aime_2025", "train", "problem", "answer", None),
    "hmmt25": _Source("MathArena/hmmt_feb_2025", "train", "problem", "answer", None),
    "math500": _Source("HuggingFaceH4/MATH-500", "test", "problem", "answer", "unique_id"),
    "minerva": _Source("math-ai/minervamath", "test", "question", "answer", None),
    "gsm8k": _Source("openai/gsm8k@main", "test", "question", "answer", None),
}
"""The six benchmarks of the paper, by short name: where they live on the hub."""

SYNTHETIC_SOURCE = "synthetic:200"
"""Source of the ``synthetic`` benchmark: 200 held-out testbed problems."""


@dataclass
class Benchmark:
    """One benchmark to evaluate, as written in YAML (``- name: math500`` / ``limit: 50``).

    Attributes:
        name: Short name; names the logged metrics (``eval/<name>/avg@K``). A key of
            :data:`PAPER_BENCHMARKS` or ``synthetic`` needs no ``source``.
        source: Local ``.jsonl``/``.json``/``.parquet`` file, hub dataset id or ``synthetic:<n>``;
            ``None`` resolves ``name`` through the registry.
        limit: Evaluate only the first ``limit`` problems (quick periodic checks); ``None``: all.
        split: Dataset split (hub sources and ``synthetic``).
        problem_column: Column of the problem statement.
        answer_column: Column of the gold answer.
        id_column: Column of the problem id; ``None`` numbers the rows.
    """

    name: str
    source: str | None = None
    limit: int | None = None
    split: str = "test"
    problem_column: str = "problem"
    answer_column: str = "answer"
    id_column: str | None = "id"

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"benchmark {self.name!r}: limit must be >= 1 or None, got {self.limit}")


def resolve_benchmark(benchmark: Benchmark | str, bench_dir: str | Path | None = None) -> Benchmark:
    """Fills in the source of a benchmark given by short name.

    Args:
        benchmark: A :class:`Benchmark` or a short name (``"aime24"``, ``"synthetic"``, ...).
        bench_dir: Folder holding ``<name>.jsonl`` for the paper benchmarks; ``None``: the hub.

    Returns:
        A benchmark whose ``source`` is set (explicit sources are returned unchanged).
    """
    if isinstance(benchmark, str):
        benchmark = Benchmark(name=benchmark)
    if benchmark.source is not None:
        return benchmark
    if benchmark.name == "synthetic":
        return dataclasses.replace(benchmark, source=SYNTHETIC_SOURCE)
    if benchmark.name not in PAPER_BENCHMARKS:
        known = ", ".join([*PAPER_BENCHMARKS, "synthetic"])
        raise ValueError(f"benchmark {benchmark.name!r} has no source and is not one of: {known}")
    if bench_dir is not None:
        return dataclasses.replace(benchmark, source=str(Path(bench_dir) / f"{benchmark.name}.jsonl"))
    hub = PAPER_BENCHMARKS[benchmark.name]
    return dataclasses.replace(
        benchmark,
        source=hub.hub_id,
        split=hub.split,
        problem_column=hub.problem_column,
        answer_column=hub.answer_column,
        id_column=hub.id_column,
    )


def load_benchmarks(
    benchmarks: Sequence[Benchmark | str], bench_dir: str | Path | None = None
) -> dict[str, list[Problem]]:
    """Loads every benchmark (in order) into ``{name: problems}``, applying each ``limit``."""
    loaded: dict[str, list[Problem]] = {}
    for spec in benchmarks:
        benchmark = resolve_benchmark(spec, bench_dir)
        if benchmark.name in loaded:
            raise ValueError(f"benchmark {benchmark.name!r} is listed twice")
        assert benchmark.source is not None  # resolve_benchmark always sets it
        problems = load_problems(
            benchmark.source,
            split=benchmark.split,
            problem_column=benchmark.problem_column,
            solution_column=None,
            answer_column=benchmark.answer_column,
            id_column=benchmark.id_column,
            limit=benchmark.limit,
            skip_invalid=False,
        )
        if benchmark.source == PAPER_BENCHMARKS["gsm8k"].hub_id:  # hub gsm8k: "...#### 2,125"
            problems = [dataclasses.replace(p, answer=_gsm8k_final_answer(p.answer)) for p in problems]
        if not problems:
            raise ValueError(f"benchmark {benchmark.name!r} ({benchmark.source}) has no problems")
        loaded[benchmark.name] = list(problems)
    return loaded


def _gsm8k_final_answer(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


class BenchmarkScores(NamedTuple):
    """Reduced scores of one benchmark; accuracies in percent, lengths in tokens."""

    avg_at_k: float
    pass_at_k: float
    mean_length: float
    truncated: float
    num_problems: int
    num_samples: int


class BenchmarkMetric(Metric):
    """Sums behind avg@K, pass@K and the mean length, reduced by sum across DDP ranks.

    ``avg@K = 100 · Σ_{p,k} c_{p,k} / (P · K)``, ``pass@K = 100 · Σ_p max_k c_{p,k} / P``,
    ``len = Σ_{p,k} |y_{p,k}| / (P · K)``, truncated = percent of samples that hit the token cap.
    """

    full_state_update = False
    higher_is_better = True
    correct: torch.Tensor
    samples: torch.Tensor
    solved: torch.Tensor
    problems: torch.Tensor
    tokens: torch.Tensor
    truncated: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("correct", "samples", "solved", "problems", "tokens", "truncated"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, lengths: torch.Tensor, truncated: torch.Tensor) -> None:
        """Adds the samples of ``P`` problems.

        Args:
            correct: ``[P, K]`` bool, sample ``k`` of problem ``p`` is correct.
            lengths: ``[P, K]`` completion lengths in tokens.
            truncated: ``[P, K]`` bool, the sample hit ``max_new_tokens``.
        """
        if correct.shape != lengths.shape or correct.shape != truncated.shape or correct.dim() != 2:
            raise ValueError(
                f"expected three [P, K] tensors, got {correct.shape}, {lengths.shape}, {truncated.shape}"
            )
        self.correct += correct.sum()
        self.samples += correct.numel()
        self.solved += correct.any(dim=1).sum()  # [P] -> scalar
        self.problems += correct.shape[0]
        self.tokens += lengths.sum()
        self.truncated += truncated.sum()

    def compute(self) -> BenchmarkScores:
        samples, problems = int(self.samples), int(self.problems)
        if samples == 0:
            raise ValueError("BenchmarkMetric.compute: no samples on any rank")
        return BenchmarkScores(
            avg_at_k=100.0 * float(self.correct) / samples,
            pass_at_k=100.0 * float(self.solved) / problems,
            mean_length=float(self.tokens) / samples,
            truncated=100.0 * float(self.truncated) / samples,
            num_problems=problems,
            num_samples=samples,
        )


class Sample(NamedTuple):
    """One scored completion (a line of ``completions.jsonl``)."""

    benchmark: str
    problem_id: str
    sample_index: int
    gold: str
    correct: bool
    length: int
    truncated: bool
    completion: str


@dataclass
class EvalResult:
    """Global scores of one evaluation and this rank's scored samples.

    Attributes:
        k: Samples per problem.
        benchmarks: Scores per benchmark, in evaluation order.
        samples: This rank's completions (rank ``r`` holds problems ``r, r + W, ...``).
        sampling: The sampling settings used.
        rank: This process's rank.
        world_size: Number of ranks that shared the problems.
    """

    k: int
    benchmarks: dict[str, BenchmarkScores]
    samples: list[Sample] = field(repr=False)
    sampling: SamplingConfig
    rank: int = 0
    world_size: int = 1

    @property
    def avg(self) -> float:
        """``Avg.``: macro mean of avg@K over benchmarks, in percent."""
        return sum(s.avg_at_k for s in self.benchmarks.values()) / len(self.benchmarks)

    @property
    def avg_len(self) -> float:
        """``AvgLen``: macro mean over benchmarks of the per-benchmark mean completion length (tokens).

        Decision: the paper says "generation length is averaged across benchmarks and samples". We read
        it as a mean over samples within each benchmark, then a macro mean over benchmarks, like ``Avg.``.
        A micro mean over all samples would be ~60 % GSM8K (1,319 of 2,181 problems) and far below the
        11–12 K tokens the paper reports for Qwen3 thinking mode (AIME/HMMT ~15 K, GSM8K ~2 K tokens).
        """
        return sum(s.mean_length for s in self.benchmarks.values()) / len(self.benchmarks)

    @property
    def eff(self) -> float:
        """Token efficiency ``Eff = Avg(%) / (AvgLen / 1000)``; NaN when AvgLen is 0."""
        return self.avg / (self.avg_len / 1000.0) if self.avg_len > 0 else math.nan

    def scalars(self, prefix: str = "eval") -> dict[str, float]:
        """The logged values: ``<prefix>/<bench>/{avg@K,pass@K,len}`` and ``<prefix>/{avg,avg_len,eff}``."""
        values: dict[str, float] = {}
        for name, scores in self.benchmarks.items():
            values[f"{prefix}/{name}/avg@{self.k}"] = scores.avg_at_k
            values[f"{prefix}/{name}/pass@{self.k}"] = scores.pass_at_k
            values[f"{prefix}/{name}/len"] = scores.mean_length
        values.update(
            {f"{prefix}/avg": self.avg, f"{prefix}/avg_len": self.avg_len, f"{prefix}/eff": self.eff}
        )
        return values

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (no samples)."""
        return {
            "k": self.k,
            "avg": self.avg,
            "avg_len": self.avg_len,
            "eff": self.eff,
            "world_size": self.world_size,
            "sampling": dataclasses.asdict(self.sampling),
            "benchmarks": {name: scores._asdict() for name, scores in self.benchmarks.items()},
        }


class BatchVerifier(Protocol):
    """What :func:`evaluate` needs from a verifier (``egrsd_pl.rewards.AnswerVerifier``)."""

    def verify_batch(self, completions: Sequence[str], golds: Sequence[str]) -> list[bool]: ...


class PromptSource(Protocol):
    """What :func:`evaluate` needs from a prompt builder (``egrsd_pl.prompts.PromptBuilder``)."""

    def student_prompt_ids(self, problem: str) -> list[int]: ...


def evaluate(
    engine: RolloutEngine,
    prompt_builder: PromptSource,
    benchmarks: Mapping[str, Sequence[Problem]],
    *,
    sampling: SamplingConfig,
    verifier: BatchVerifier | None = None,
    rank: int = 0,
    world_size: int = 1,
    prompts_per_call: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> EvalResult:
    """Samples ``sampling.num_rollouts`` completions per problem and scores them.

    Every rank must call this with the same benchmarks in the same order (the reduction is a
    collective). The engine must already sample from the policy to evaluate (``sync_policy``).

    Decision: a sample is correct when the verifier accepts its final boxed answer, whether or not
    it reached ``max_new_tokens`` (as the OPSD evaluation the paper follows scores the raw response);
    truncation is reported separately. Training rewards additionally zero truncated rollouts.
    A completion's length is ``len(completion_ids)``, the stop token included when one was produced.

    Args:
        engine: A set-up rollout engine.
        prompt_builder: Turns a problem into the student's prompt token ids (thinking on).
        benchmarks: ``{name: problems}``, e.g. from :func:`load_benchmarks`.
        sampling: K = ``num_rollouts``, temperature, top-p, top-k, ``max_new_tokens``, seed. A seed
            is offset per rank, benchmark and call so that no two calls repeat a random stream.
        verifier: Batch answer checker; ``None``: ``egrsd_pl.rewards.AnswerVerifier()``.
        rank: This process's rank; it scores problems ``rank, rank + world_size, ...``.
        world_size: Number of ranks.
        prompts_per_call: Problems per ``engine.generate`` call (progress granularity).
        device: Device of the metric states (the collective's backend must support it).
        progress: Show a progress bar on rank 0.

    Returns:
        The reduced scores (identical on every rank) and this rank's samples.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if not benchmarks:
        raise ValueError("evaluate needs at least one benchmark")
    owned_verifier = verifier is None
    if verifier is None:
        verifier = AnswerVerifier()
    shards = {name: list(problems)[rank::world_size] for name, problems in benchmarks.items()}
    bar = _progress_bar(sum(len(s) for s in shards.values()), enabled=progress and rank == 0)
    scores: dict[str, BenchmarkScores] = {}
    samples: list[Sample] = []
    try:
        for bench_index, (name, shard) in enumerate(shards.items()):
            metric = BenchmarkMetric().to(device)
            metric.update(*_sample_matrices([], [], sampling.num_rollouts, device))  # a rank may hold none
            for call, start in enumerate(range(0, len(shard), prompts_per_call)):
                chunk = shard[start : start + prompts_per_call]
                call_sampling = _call_sampling(sampling, rank=rank, benchmark=bench_index, call=call)
                rollouts, verdicts = _sample_and_verify(
                    engine, prompt_builder, verifier, chunk, call_sampling
                )
                metric.update(*_sample_matrices(rollouts, verdicts, sampling.num_rollouts, device))
                samples.extend(_records(name, chunk, rollouts, verdicts, sampling.num_rollouts))
                bar.update(len(chunk))
            scores[name] = metric.compute()
    finally:
        bar.close()
        if owned_verifier and hasattr(verifier, "close"):
            verifier.close()
    return EvalResult(
        k=sampling.num_rollouts,
        benchmarks=scores,
        samples=samples,
        sampling=sampling,
        rank=rank,
        world_size=world_size,
    )


def _sample_and_verify(
    engine: RolloutEngine,
    prompt_builder: PromptSource,
    verifier: BatchVerifier,
    problems: Sequence[Problem],
    sampling: SamplingConfig,
) -> tuple[list[Rollout], list[bool]]:
    """``len(problems) * K`` prompt-major rollouts and their verdicts against each problem's gold."""
    k = sampling.num_rollouts
    rollouts = engine.generate([prompt_builder.student_prompt_ids(p.problem) for p in problems], sampling)
    if [r.prompt_index for r in rollouts] != [i // k for i in range(len(problems) * k)]:
        raise RuntimeError(f"the engine must return {len(problems)} prompts x {k} rollouts, prompt-major")
    golds = [problems[r.prompt_index].answer for r in rollouts]
    verdicts = verifier.verify_batch([r.text for r in rollouts], golds)
    return rollouts, [bool(ok) for ok in verdicts]


def _records(
    name: str, problems: Sequence[Problem], rollouts: Sequence[Rollout], verdicts: Sequence[bool], k: int
) -> list[Sample]:
    records = []
    for j, (rollout, ok) in enumerate(zip(rollouts, verdicts, strict=True)):
        owner = problems[rollout.prompt_index]
        text, length, truncated = rollout.text, rollout.length, rollout.truncated
        records.append(Sample(name, owner.id, j % k, owner.answer, ok, length, truncated, text))
    return records


def _call_sampling(sampling: SamplingConfig, *, rank: int, benchmark: int, call: int) -> SamplingConfig:
    """The sampling of one engine call: the seed (if any) offset so that no two calls share a stream."""
    if sampling.seed is None:
        return sampling
    return dataclasses.replace(sampling, seed=sampling.seed + 1_000_003 * rank + 10_007 * benchmark + call)


def _sample_matrices(
    rollouts: Sequence[Rollout], verdicts: Sequence[bool], k: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt-major rollouts and verdicts as ``[P, K]`` correct, length and truncated tensors."""
    lengths = [r.length for r in rollouts]
    truncated = [r.truncated for r in rollouts]
    return (
        torch.tensor(verdicts, dtype=torch.bool, device=device).view(-1, k),  # [P, K]
        torch.tensor(lengths, dtype=torch.long, device=device).view(-1, k),  # [P, K]
        torch.tensor(truncated, dtype=torch.bool, device=device).view(-1, k),  # [P, K]
    )


def _progress_bar(total: int, *, enabled: bool) -> Any:
    return tqdm(total=total, desc="eval", unit="problem", disable=not enabled, leave=False)


def format_table(result: EvalResult, *, title: str | None = None) -> str:
    """One Markdown row per benchmark (problems, avg@K, pass@K, length, % truncated) and the Avg. row."""
    k = result.k
    lines = [f"### {title}", ""] if title else []
    lines += [
        f"| benchmark | problems | avg@{k} | pass@{k} | length | truncated |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in result.benchmarks.items():
        lines.append(
            f"| {name} | {s.num_problems:,} | {s.avg_at_k:.2f} | {s.pass_at_k:.2f} | {s.mean_length:,.0f} | {s.truncated:.1f}% |"
        )
    total = sum(s.num_problems for s in result.benchmarks.values())
    lines.append(f"| **Avg.** | {total:,} | {result.avg:.2f} | | {result.avg_len:,.0f} | |")
    lines += ["", f"Eff = Acc(%) / (AvgLen / 1000) = {result.eff:.2f}"]
    return "\n".join(lines)


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
            handle.write(json.dumps(sample._asdict(), ensure_ascii=False) + "\n")
    if result.rank != 0:
        return paths
    paths.update(json=out / "results.json", markdown=out / "results.md", plot=out / "frontier.png")
    summary = {"label": label, "step": step, **result.summary()}
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["markdown"].write_text(format_table(result, title=f"{label} (step {step})") + "\n")
    points = [p for p in history if p.label != label] + [
        FrontierPoint(label, step, result.avg, result.avg_len)
    ]
    frontier_figure(points).savefig(paths["plot"])
    return paths

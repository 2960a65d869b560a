"""avg@K scoring: the torchmetrics metric behind the scores and the sampling loop.

The paper's claim lives on the accuracy–length plane (§5.1): for every benchmark, K samples per
problem (K = 4, T = 1.0, top-p 0.95, up to 32,768 new tokens, Qwen3 thinking mode on), checked
against the gold answer; ``avg@K`` per benchmark, ``Avg.`` = macro mean of ``avg@K`` over the
benchmarks, ``AvgLen`` = mean completion length in tokens, token efficiency
``Eff = Acc(%) / (AvgLen / 1000)``. AIME 2024 is averaged over five independent runs of K samples:
a benchmark's ``repeats`` runs it that many times, each with its own seed, and reports the mean and
the standard deviation over runs.

This module is independent of Lightning: :func:`evaluate` takes a
:class:`~egrsd_pl.rollout.base.RolloutEngine`, a prompt builder and loaded problems, scores this
rank's shard (rank ``r`` of ``W`` takes problems ``r, r + W, ...``) and reduces the sums with
torchmetrics, so every rank returns the same global numbers under DDP.

Accuracies (``avg@K``, ``pass@K``, ``Avg.``) and the truncated share are percentages, as in the
paper's tables.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torchmetrics import Metric
from tqdm.auto import tqdm

from egrsd_pl.problem import Problem
from egrsd_pl.rewards import AnswerVerifier
from egrsd_pl.rollout.base import Rollout, RolloutEngine, SamplingConfig

REPEAT_SEED_STRIDE = 1_000_000_007
"""Repeat ``r`` of a benchmark samples from base seed ``seed + r * REPEAT_SEED_STRIDE``."""


class BenchmarkScores(NamedTuple):
    """Reduced scores of one benchmark; accuracies and the truncated share in percent, lengths in tokens.

    With ``repeats > 1`` every score is the mean over the runs, ``avg_at_k_std`` the sample standard
    deviation (``n - 1``) of the runs' avg@K, ``avg_at_k_runs`` the runs' avg@K in order, and
    ``num_samples`` counts the samples of all runs. ``seeds`` holds each run's base seed (``None``
    when sampling was not seeded).
    """

    avg_at_k: float
    pass_at_k: float
    mean_length: float
    truncated: float
    num_problems: int
    num_samples: int
    avg_at_k_std: float = 0.0
    repeats: int = 1
    avg_at_k_runs: tuple[float, ...] = ()
    seeds: tuple[int | None, ...] = ()


def combine_repeats(runs: Sequence[BenchmarkScores], seeds: Sequence[int | None]) -> BenchmarkScores:
    """The scores of ``R`` independent runs of one benchmark: means over runs, avg@K's spread.

    ``avg@K = (1/R) Σ_r avg@K_r`` (likewise pass@K, length, truncated share);
    ``std = sqrt(Σ_r (avg@K_r − avg@K)² / (R − 1))``, 0 for a single run.
    """
    if not runs or len(runs) != len(seeds):
        raise ValueError(f"combine_repeats needs one seed per run, got {len(runs)} runs, {len(seeds)} seeds")
    count = len(runs)
    accuracies = [run.avg_at_k for run in runs]
    mean = sum(accuracies) / count
    spread = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (count - 1)) if count > 1 else 0.0
    return BenchmarkScores(
        avg_at_k=mean,
        pass_at_k=sum(run.pass_at_k for run in runs) / count,
        mean_length=sum(run.mean_length for run in runs) / count,
        truncated=sum(run.truncated for run in runs) / count,
        num_problems=runs[0].num_problems,
        num_samples=sum(run.num_samples for run in runs),
        avg_at_k_std=spread,
        repeats=count,
        avg_at_k_runs=tuple(accuracies),
        seeds=tuple(seeds),
    )


class BenchmarkMetric(Metric):
    """Sums behind avg@K, pass@K and the mean length, reduced by sum across DDP ranks.

    ``avg@K = 100 · Σ_{p,k} c_{p,k} / (P · K)``, ``pass@K = 100 · Σ_p max_k c_{p,k} / P``,
    ``len = Σ_{p,k} |y_{p,k}| / (P · K)``, truncated = percent of samples cut by ``max_new_tokens``
    (no stop token).
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
    """One scored completion (a line of ``completions.jsonl``); ``repeat`` is its run of the benchmark."""

    benchmark: str
    problem_id: str
    sample_index: int
    gold: str
    correct: bool
    length: int
    truncated: bool
    completion: str
    repeat: int = 0


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
        """The logged values: ``<prefix>/<bench>/{avg@K,pass@K,len,truncated}`` (plus ``avg@K_std`` for a
        benchmark run more than once) and ``<prefix>/{avg,avg_len,eff}``."""
        values: dict[str, float] = {}
        for name, scores in self.benchmarks.items():
            values[f"{prefix}/{name}/avg@{self.k}"] = scores.avg_at_k
            if scores.repeats > 1:
                values[f"{prefix}/{name}/avg@{self.k}_std"] = scores.avg_at_k_std
            values[f"{prefix}/{name}/pass@{self.k}"] = scores.pass_at_k
            values[f"{prefix}/{name}/len"] = scores.mean_length
            values[f"{prefix}/{name}/truncated"] = scores.truncated
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
    repeats: Mapping[str, int] | None = None,
    rank: int = 0,
    world_size: int = 1,
    prompts_per_call: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> EvalResult:
    """Samples ``sampling.num_rollouts`` completions per problem and scores them.

    Every rank must call this with the same benchmarks in the same order (the reduction is a
    collective). The engine must already sample from the policy to evaluate (``sync_policy``).

    Decision (docs/algorithm.md#step-2-reward, truncated rollouts): a sample is correct when the verifier accepts the
    last ``\\boxed{}`` after its last ``</think>``, whether or not it reached ``max_new_tokens``: a
    completion cut at the cap that already holds its final boxed answer is verified like any other,
    and one cut without an answer scores 0 (the verifier finds none). Training rewards follow the
    same rule (``RolloutDataModule.score``). Truncation is reported separately (``truncated``).
    A completion's length is ``len(completion_ids)``, the stop token included when one was produced.

    Args:
        engine: A set-up rollout engine.
        prompt_builder: Turns a problem into the student's prompt token ids (thinking on).
        benchmarks: ``{name: problems}``, e.g. from :func:`~egrsd_pl.evaluation.load_benchmarks`.
        sampling: K = ``num_rollouts``, temperature, top-p, top-k, ``max_new_tokens``, seed. Run ``r``
            of a benchmark has base seed ``seed + r * REPEAT_SEED_STRIDE`` (recorded in its scores);
            each engine call draws from its own block of seeds (:func:`call_seed`).
        verifier: Batch answer checker; ``None``: ``egrsd_pl.rewards.AnswerVerifier()``.
        repeats: ``{name: runs}``; a benchmark not named runs once.
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
    runs_of = {name: (repeats or {}).get(name, 1) for name in benchmarks}
    if any(runs < 1 for runs in runs_of.values()):
        raise ValueError(f"repeats must be >= 1, got {runs_of}")
    owned_verifier = verifier is None
    if verifier is None:
        verifier = AnswerVerifier()
    shards = {name: list(problems)[rank::world_size] for name, problems in benchmarks.items()}
    # Every rank numbers its calls alike, from the largest benchmark (ranks may hold fewer problems).
    calls_of = {
        name: math.ceil(math.ceil(len(p) / world_size) / prompts_per_call) for name, p in benchmarks.items()
    }
    calls_per_run = max(calls_of.values())
    total = sum(len(shard) * runs_of[name] for name, shard in shards.items())
    bar = _progress_bar(total, enabled=progress and rank == 0)
    scores: dict[str, BenchmarkScores] = {}
    samples: list[Sample] = []
    try:
        for bench_index, (name, shard) in enumerate(shards.items()):
            runs, seeds = [], []
            for repeat in range(runs_of[name]):
                seed = None if sampling.seed is None else sampling.seed + repeat * REPEAT_SEED_STRIDE
                metric = BenchmarkMetric().to(device)
                metric.update(
                    *_sample_matrices([], [], sampling.num_rollouts, device)
                )  # a rank may hold none
                # A collective engine (vLLM over a tensor-parallel group): every rank makes the same calls,
                # a rank with fewer problems empty ones.
                calls = (
                    calls_of[name]
                    if engine.generates_collectively
                    else math.ceil(len(shard) / prompts_per_call)
                )
                for call, start in enumerate(range(0, calls * prompts_per_call, prompts_per_call)):
                    chunk = shard[start : start + prompts_per_call]
                    stream = (bench_index * calls_per_run + call) * world_size + rank
                    call_sampling = dataclasses.replace(
                        sampling, seed=call_seed(seed, stream, prompts_per_call * sampling.num_rollouts)
                    )
                    rollouts, verdicts = _sample_and_verify(
                        engine, prompt_builder, verifier, chunk, call_sampling
                    )
                    metric.update(*_sample_matrices(rollouts, verdicts, sampling.num_rollouts, device))
                    samples.extend(_records(name, chunk, rollouts, verdicts, sampling.num_rollouts, repeat))
                    bar.update(len(chunk))
                runs.append(metric.compute())
                seeds.append(seed)
            scores[name] = combine_repeats(runs, seeds)
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


def call_seed(seed: int | None, stream: int, requests_per_call: int) -> int | None:
    """The base seed of one engine call: ``seed + stream · requests_per_call``.

    Engines seed request ``i`` of a call with ``base + i`` (vLLM) or the call with ``base`` (HF), so
    giving call number ``stream`` (unique per run, benchmark, call and rank) its own block of
    ``requests_per_call`` seeds keeps every request's random stream distinct.
    """
    return None if seed is None else seed + stream * requests_per_call


def longest_prompt_tokens(prompt_builder: PromptSource, benchmarks: Mapping[str, Sequence[Problem]]) -> int:
    """Length in tokens of the longest student prompt of every benchmark's problems."""
    return max(len(prompt_builder.student_prompt_ids(p.problem)) for ps in benchmarks.values() for p in ps)


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
    if not problems:
        return [], []
    if [r.prompt_index for r in rollouts] != [i // k for i in range(len(problems) * k)]:
        raise RuntimeError(f"the engine must return {len(problems)} prompts x {k} rollouts, prompt-major")
    golds = [problems[r.prompt_index].answer for r in rollouts]
    verdicts = verifier.verify_batch([r.text for r in rollouts], golds)
    return rollouts, [bool(ok) for ok in verdicts]


def _records(
    name: str,
    problems: Sequence[Problem],
    rollouts: Sequence[Rollout],
    verdicts: Sequence[bool],
    k: int,
    repeat: int,
) -> list[Sample]:
    records = []
    for j, (rollout, ok) in enumerate(zip(rollouts, verdicts, strict=True)):
        owner = problems[rollout.prompt_index]
        text, length, truncated = rollout.text, rollout.length, rollout.truncated
        records.append(Sample(name, owner.id, j % k, owner.answer, ok, length, truncated, text, repeat))
    return records


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

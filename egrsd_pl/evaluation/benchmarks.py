"""The evaluation benchmarks: the paper's registry and loading by short name.

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
mechanism  ``synthetic:mechanism:200``  test     (testbed)        (testbed)
=========  ===========================  =======  ===============  ==============

``synthetic`` is the held-out split of the tiny testbed's arithmetic problems, ``mechanism`` that of
``testbed:mechanism``'s world.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from egrsd_pl.problem import Problem
from egrsd_pl.problem_sources import load_problems


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
MECHANISM_SOURCE = "synthetic:mechanism:200"
"""Source of the ``mechanism`` benchmark: 200 held-out problems of ``testbed:mechanism``'s world."""


@dataclass
class Benchmark:
    """One benchmark to evaluate, as written in YAML (``- name: math500`` / ``limit: 50`` / ``repeats: 5``).

    Attributes:
        name: Short name; names the logged metrics (``eval/<name>/avg@K``). A key of
            :data:`PAPER_BENCHMARKS` or ``synthetic`` needs no ``source``.
        source: Local ``.jsonl``/``.json``/``.parquet`` file, hub dataset id or ``synthetic:<n>``;
            ``None`` resolves ``name`` through the registry.
        limit: Evaluate only the first ``limit`` problems (quick periodic checks); ``None``: all.
        repeats: Independent runs of K samples per problem, each with its own seed; the scores are
            the mean over runs, reported with their standard deviation (paper: AIME 2024 over 5).
        split: Dataset split (hub sources and ``synthetic``).
        problem_column: Column of the problem statement.
        answer_column: Column of the gold answer.
        id_column: Column of the problem id; ``None`` numbers the rows.
    """

    name: str
    source: str | None = None
    limit: int | None = None
    repeats: int = 1
    split: str = "test"
    problem_column: str = "problem"
    answer_column: str = "answer"
    id_column: str | None = "id"

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"benchmark {self.name!r}: limit must be >= 1 or None, got {self.limit}")
        if self.repeats < 1:
            raise ValueError(f"benchmark {self.name!r}: repeats must be >= 1, got {self.repeats}")


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
    if benchmark.name in ("synthetic", "mechanism"):
        source = SYNTHETIC_SOURCE if benchmark.name == "synthetic" else MECHANISM_SOURCE
        return dataclasses.replace(benchmark, source=source)
    if benchmark.name not in PAPER_BENCHMARKS:
        known = ", ".join([*PAPER_BENCHMARKS, "synthetic", "mechanism"])
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


def benchmark_repeats(benchmarks: Sequence[Benchmark | str]) -> dict[str, int]:
    """``{name: repeats}`` of every benchmark (1 for one given by short name)."""
    return {b if isinstance(b, str) else b.name: 1 if isinstance(b, str) else b.repeats for b in benchmarks}

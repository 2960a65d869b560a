"""avg@K evaluation on the paper's benchmarks, shared by the periodic callback and ``main.py validate``.

- :mod:`~egrsd_pl.evaluation.benchmarks`: the registry of the paper's six benchmarks and their loading;
- :mod:`~egrsd_pl.evaluation.scoring`: the torchmetrics metric and the sampling loop (:func:`evaluate`);
- :mod:`~egrsd_pl.evaluation.report`: the Markdown table, the accuracy–length plane, the results files.
"""

from egrsd_pl.evaluation.benchmarks import (
    PAPER_BENCHMARKS,
    SYNTHETIC_SOURCE,
    Benchmark,
    benchmark_repeats,
    load_benchmarks,
    resolve_benchmark,
)
from egrsd_pl.evaluation.report import (
    FrontierPoint,
    figure_to_rgb,
    format_table,
    frontier_figure,
    load_history,
    write_report,
)
from egrsd_pl.evaluation.scoring import (
    REPEAT_SEED_STRIDE,
    BatchVerifier,
    BenchmarkMetric,
    BenchmarkScores,
    EvalResult,
    PromptSource,
    Sample,
    call_seed,
    combine_repeats,
    evaluate,
    longest_prompt_tokens,
)

__all__ = [
    "PAPER_BENCHMARKS",
    "REPEAT_SEED_STRIDE",
    "SYNTHETIC_SOURCE",
    "BatchVerifier",
    "Benchmark",
    "BenchmarkMetric",
    "BenchmarkScores",
    "EvalResult",
    "FrontierPoint",
    "PromptSource",
    "Sample",
    "benchmark_repeats",
    "call_seed",
    "combine_repeats",
    "evaluate",
    "figure_to_rgb",
    "format_table",
    "frontier_figure",
    "load_benchmarks",
    "load_history",
    "longest_prompt_tokens",
    "resolve_benchmark",
    "write_report",
]

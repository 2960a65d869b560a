"""``egrsd compare``: the paper's comparison in one command — train every method over seeds, evaluate each
run, and write Tables 2 and 5 (mean ± std over seeds) and Fig. 1 (the accuracy–length frontier).

    egrsd compare --config configs/tiny.yaml --methods configs/compare/paper.yaml --seeds 0 1 2 \\
        --output comparisons/tiny [-- --trainer.max_steps 30]

Each (method, seed) is an ordinary ``fit`` then ``validate`` in a subprocess (its own run folder,
checkpoints, TensorBoard events and log files; :mod:`egrsd_pl.compare.runner`). Finished runs are
skipped, interrupted ones continue from ``last.ckpt``, so re-running the same command only resumes and
re-aggregates. ``--print-commands`` prints the pending runs for a scheduler; ``--collect`` aggregates
whatever results exist.

Differences between methods (against the untrained model, and against ``--reference``) come with Welch's
t-test over seeds, a 95 % confidence interval and Holm-adjusted p-values
(:mod:`egrsd_pl.compare.significance`). ``--snapshots`` also evaluates every saved step checkpoint of each
trained run and adds the paper's Table 4 (per snapshot S1, S2, … and the mean over snapshots).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from egrsd_pl.compare.aggregate import RunResult, SnapshotSummary, read_result, summarize, summarize_snapshots
from egrsd_pl.compare.methods import Method, MethodsError, ParseCheck, check_methods, read_methods
from egrsd_pl.compare.report import (
    accuracy_table,
    difference_table,
    efficiency_table,
    snapshot_table,
    write_comparison,
)
from egrsd_pl.compare.runner import Plan, Run, execute

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egrsd compare",
        usage="egrsd compare --config BASE.yaml --methods METHODS.yaml [--seeds S ...] --output DIR "
        "[--only METHOD ...] [--reference METHOD] [--snapshots] [--print-commands | --collect] [--no-progress] "
        "[-- FIT_OVERRIDES ...]",
        epilog="example: egrsd compare --config configs/tiny_vllm.yaml --methods configs/compare/paper.yaml "
        "--seeds 0 1 2 --output comparisons/tiny -- --config configs/compare/tiny.yaml",
        description=(
            "Train and evaluate several methods over seeds and write the paper's comparison: "
            "comparison.md (Tables 2 and 5, mean ± std over seeds), comparison.json and frontier.png "
            "(Fig. 1). Arguments after `--` go to every fit and validate (e.g. -- --trainer.max_steps 3)."
        ),
    )
    parser.add_argument("--config", required=True, help="base config of every run (main.py fit --config)")
    parser.add_argument(
        "--methods",
        required=True,
        help="methods file: `methods: {name: {label: ..., fit: true|false, model.objective: ..., ...}}`",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every method (default 0)")
    parser.add_argument(
        "--output", required=True, help="folder of the runs (DIR/runs/<method>/seed_<s>) and the report"
    )
    parser.add_argument("--only", nargs="+", metavar="METHOD", help="run only these methods of the file")
    parser.add_argument(
        "--reference",
        metavar="METHOD",
        help="also compare every method against this one (e.g. rlsd: what the entropy gate adds): Δ, its 95%% "
        "CI and Welch's t-test p over seeds, Holm-adjusted across methods; the untrained model is always a "
        "reference",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--print-commands",
        action="store_true",
        help="print one shell line per pending run (cd && fit && validate) for a scheduler, run nothing",
    )
    mode.add_argument("--collect", action="store_true", help="run nothing; aggregate the results that exist")
    parser.add_argument(
        "--snapshots",
        action="store_true",
        help="also evaluate every saved step checkpoint of each trained run (every "
        "--checkpoint.every_n_train_steps; the paper's Table 4, S1-S4) and report per-snapshot and "
        "mean-over-snapshots tables; resumable like the runs",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None, *, parse_error: ParseCheck) -> int:
    """Runs ``egrsd compare``; returns the exit status (0 ok, 1 a run failed, 2 bad input).

    ``parse_error`` is the CLI's parse check (:func:`egrsd_pl.cli.parse_error`, handed in by ``egrsd``): every
    method is parsed with it before any run.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    own, common = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    try:
        return _compare(args, common, parse_error, command=shlex.join(["egrsd", "compare", *argv]))
    except (MethodsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _compare(args: argparse.Namespace, common: list[str], parse_error: ParseCheck, *, command: str) -> int:
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"--config {args.config}: no such file")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds: a seed is listed twice ({args.seeds})")
    methods = read_methods(args.methods)
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in methods})
        if unknown:
            raise ValueError(f"--only {unknown[0]}: not a method of {args.methods}")
        methods = [m for m in methods if m.name in args.only]
    if args.reference is not None and args.reference not in {m.name for m in methods}:
        raise ValueError(f"--reference {args.reference}: not a compared method of {args.methods}")
    plan = Plan(config=args.config, output=Path(args.output), common=common, snapshots=args.snapshots)
    runs = plan.runs(methods, args.seeds)
    if not args.collect:
        check_methods(args.methods, methods, plan.base_args(), parse_error)  # before any run
        plan.check_settings(runs)
        plan.check_checkpoints(runs)
    if args.print_commands:
        for run in runs:
            if run.status() != "done":
                print(plan.shell_line(run, Path.cwd()))
        return 0
    failures = [] if args.collect else execute(plan, runs, progress=not args.no_progress)
    results: dict[str, list[RunResult]] = {}
    for run in runs:
        if run.results_path.is_file():
            results.setdefault(run.method.name, []).append(
                read_result(run.results_path, run.method.name, run.seed)
            )
    pending = sum(run.status() != "done" for run in runs)
    summaries = summarize([(m.name, m.label, m.fit) for m in methods], results)
    snapshots = collect_snapshots(methods, runs) if args.snapshots else None
    paths = write_comparison(
        summaries,
        args.output,
        command=command,
        pending=pending,
        reference=args.reference,
        snapshots=snapshots,
        config=args.config,
        methods_file=args.methods,
        seeds=args.seeds,
        common_overrides=common,
    )
    against = difference_table(summaries, args.reference) if args.reference is not None else ""
    tables = [accuracy_table(summaries), efficiency_table(summaries), *([against] if against else [])]
    if snapshots is not None:
        tables.append(snapshot_table(snapshots, "avg"))
    print(*tables, sep="\n\n")
    print("\n" + "\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    for run, log in failures:
        print(f"failed: {run.name} (see {log})", file=sys.stderr)
    if pending:
        print(f"{pending} of {len(runs)} runs are not finished (results still to compute)", file=sys.stderr)
    return 1 if failures else 0


def collect_snapshots(methods: Sequence[Method], runs: Sequence[Run]) -> list[SnapshotSummary]:
    """The snapshot evaluations that exist, summarized per trained method (``--snapshots``)."""
    found: dict[str, list[tuple[int, RunResult]]] = {}
    for run in runs:
        for step, path in run.snapshot_results():
            if path.is_file():
                found.setdefault(run.method.name, []).append(
                    (step, read_result(path, run.method.name, run.seed))
                )
    return [summarize_snapshots(m.name, m.label, found.get(m.name, ())) for m in methods if m.fit]

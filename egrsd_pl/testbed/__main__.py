"""Command line: ``python -m egrsd_pl.testbed {build,path,verify}`` (also ``egrsd testbed ...``).

``build [tiny|mechanism]`` fills the cache that ``testbed:tiny?budget_s=..&seed=..`` (or
``testbed:mechanism?...``) resolves to (or writes ``--output-dir``) and prints the measured greedy accuracy and mean completion length; ``path`` prints
the folder a testbed resolves to (the one shipped in the package for the defaults); ``verify``
rebuilds the shipped testbed in a temporary folder and compares it with what is reproducible where
(one full build: about 6 minutes on one idle core; ``--prefix-only``: the first 40 steps, seconds):

- on any machine: the tokenizer files and configs byte for byte, the weights after the first 40
  warm-start steps within ``PREFIX_TOLERANCE`` of the recorded ones, and (full build) the counts of
  ``testbed.json`` exactly and the greedy accuracies and lengths within their tolerances;
- on the CPU type and torch build that made the shipped folder: also every weight, bit for bit.

See docs/testbed.md, "A deterministic build".
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from egrsd_pl.json_files import dumps
from egrsd_pl.testbed.build import (
    DEFAULT_BUDGET_S,
    EXACT_FILES,
    PACKAGED_DIR,
    PREFIX_TOLERANCE,
    build_testbed,
    cached_testbed_dir,
    default_budget_s,
    differing_files,
    ensure_testbed,
    exact_file_differences,
    packaged_testbed_dir,
    prefix_drift,
    report_differences,
)
from egrsd_pl.testbed.worlds import WORLD_NAMES


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m egrsd_pl.testbed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (and cache) the tokenizer and warm-started tiny Qwen3")
    path = commands.add_parser("path", help="print the folder a testbed resolves to (built or not)")
    check = commands.add_parser(
        "verify", help="rebuild the testbed shipped in the package and compare what is reproducible"
    )
    check.add_argument(
        "--prefix-only",
        action="store_true",
        help="only the tokenizer, the configs and the first 40 warm-start steps (seconds, not minutes)",
    )
    for command in (build, path):
        command.add_argument(
            "world",
            nargs="?",
            default="tiny",
            choices=WORLD_NAMES,
            help="the testbed world: tiny (shipped) or mechanism (a concise teacher uncertain where the "
            "reference does not decide; docs/testbed.md)",
        )
        command.add_argument(
            "--budget-s",
            type=float,
            default=None,
            help=f"nominal seconds of warm start (fixes the steps; default {DEFAULT_BUDGET_S:g})",
        )
        command.add_argument("--seed", type=int, default=0, help="seed of the model, corpus and order")
        command.add_argument(
            "--teacher-verbose",
            type=float,
            default=0.0,
            help="share of the teacher's warm-start examples trained towards verbose chains (0: the shipped "
            "testbed, whose teacher copies the reference; 0.75: a teacher uncertain where chains branch, "
            "testbed:tiny?teacher_verbose=0.75)",
        )
        command.add_argument(
            "--cache-dir", default=None, help="cache root (default $EGRSD_PL_CACHE or ~/.cache/egrsd_pl)"
        )
    build.add_argument("--output-dir", default=None, help="write here instead of the cache (always rebuilds)")
    build.add_argument("--force", action="store_true", help="rebuild even if the cache holds this testbed")
    args = parser.parse_args(argv)

    if args.command == "verify":
        return verify(prefix_only=args.prefix_only)
    if args.teacher_verbose and args.world != "tiny":
        parser.error("--teacher-verbose is a variant of the tiny world only")
    budget_s = default_budget_s(args.world) if args.budget_s is None else args.budget_s
    recipe = {
        "budget_s": budget_s,
        "seed": args.seed,
        "teacher_verbose_share": args.teacher_verbose,
        "world_name": args.world,
    }
    target = cached_testbed_dir(args.cache_dir, **recipe)
    if args.command == "path":
        shipped = args.world == "tiny" and not args.teacher_verbose
        packaged = packaged_testbed_dir(budget_s=budget_s, seed=args.seed) if shipped else None
        print(packaged or target)
        return 0
    if args.output_dir is not None:
        folder = build_testbed(args.output_dir, **recipe)
    else:
        if args.force and target.exists():
            shutil.rmtree(target)
        folder = ensure_testbed(args.cache_dir, **recipe)
    report = json.loads((folder / "testbed.json").read_text())
    print(dumps(report, indent=2), file=sys.stderr)
    print(folder)
    return 0


def verify(*, prefix_only: bool = False) -> int:
    """Rebuilds the shipped testbed (or its first 40 steps) and compares; 0 when it is the same build."""
    shipped = json.loads((PACKAGED_DIR / "testbed.json").read_text())
    if prefix_only:
        problems = [f"{name} differs" for name in exact_file_differences(PACKAGED_DIR, seed=shipped["seed"])]
        drift = prefix_drift(shipped)
        if not drift <= PREFIX_TOLERANCE:
            problems.append(f"prefix weights {drift:.2g} apart (tolerance {PREFIX_TOLERANCE:g})")
        same = (
            f"tokenizer and configs byte for byte, the {shipped['prefix_steps']}-step prefix within {drift:.2g} "
            f"(tolerance {PREFIX_TOLERANCE:g})"
        )
        return _verdict(problems, same)
    with tempfile.TemporaryDirectory(prefix="egrsd-testbed-verify-") as scratch:
        built = build_testbed(Path(scratch), budget_s=shipped["budget_s"], seed=shipped["seed"])
        problems = [f"{name} differs" for name in differing_files(built, PACKAGED_DIR) if name in EXACT_FILES]
        report = json.loads((built / "testbed.json").read_text())
    problems += report_differences(report, shipped)
    if report["weights_sha256"] == shipped["weights_sha256"]:
        return _verdict(problems, "every file and weight byte for byte")
    same = (
        "tokenizer, configs, counts and the warm-start prefix; the final weights differ (float sums in another "
        f"order on this CPU type or torch build) but behave alike: greedy accuracy {report['greedy_accuracy']:.1%} "
        f"vs {shipped['greedy_accuracy']:.1%}, mean length {report['mean_completion_length']} vs "
        f"{shipped['mean_completion_length']} tokens"
    )
    return _verdict(problems, same)


def _verdict(problems: list[str], same: str) -> int:
    if problems:
        print(f"testbed verify: not the build of {PACKAGED_DIR}: {'; '.join(problems)}", file=sys.stderr)
        return 1
    print(f"testbed verify: the same build as {PACKAGED_DIR}: {same}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

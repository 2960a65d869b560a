"""Command line: ``python -m egrsd_pl.testbed {build,path,verify}`` (also ``egrsd testbed ...``).

``build`` fills the cache that ``testbed:tiny?budget_s=..&seed=..`` resolves to (or writes
``--output-dir``) and prints the measured greedy accuracy and mean completion length; ``path`` prints
the folder a testbed resolves to (the one shipped in the package for the defaults); ``verify``
rebuilds the shipped testbed in a temporary folder and checks that every file is byte-for-byte the
same (one full build: about 6 minutes on one idle core).
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
    PACKAGED_DIR,
    build_testbed,
    cached_testbed_dir,
    differing_files,
    ensure_testbed,
    packaged_testbed_dir,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m egrsd_pl.testbed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (and cache) the tokenizer and warm-started tiny Qwen3")
    path = commands.add_parser("path", help="print the folder a testbed resolves to (built or not)")
    commands.add_parser(
        "verify", help="rebuild the testbed shipped in the package and compare it byte for byte"
    )
    for command in (build, path):
        command.add_argument(
            "--budget-s",
            type=float,
            default=DEFAULT_BUDGET_S,
            help="nominal seconds of warm start (fixes the steps)",
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
        return verify()
    recipe = {"budget_s": args.budget_s, "seed": args.seed, "teacher_verbose_share": args.teacher_verbose}
    target = cached_testbed_dir(args.cache_dir, **recipe)
    if args.command == "path":
        packaged = (
            None if args.teacher_verbose else packaged_testbed_dir(budget_s=args.budget_s, seed=args.seed)
        )
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


def verify() -> int:
    """Rebuilds the shipped testbed and compares every file; 0 when all are identical."""
    shipped = json.loads((PACKAGED_DIR / "testbed.json").read_text())
    with tempfile.TemporaryDirectory(prefix="egrsd-testbed-verify-") as scratch:
        built = build_testbed(Path(scratch), budget_s=shipped["budget_s"], seed=shipped["seed"])
        different = differing_files(built, PACKAGED_DIR)
    if different:
        print(
            f"testbed verify: these files differ from {PACKAGED_DIR}: {', '.join(different)}", file=sys.stderr
        )
        return 1
    print(f"testbed verify: a fresh build equals {PACKAGED_DIR} byte for byte", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

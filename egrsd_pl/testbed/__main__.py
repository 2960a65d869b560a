"""Command line: ``python -m egrsd_pl.testbed build [--budget-s 210] [--seed 0] [--output-dir DIR]``.

``build`` fills the cache that ``testbed:tiny`` resolves to (or writes ``--output-dir``) and prints
the measured greedy accuracy and mean completion length; ``path`` prints the cached folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence

from egrsd_pl.testbed.build import DEFAULT_BUDGET_S, build_testbed, cached_testbed_dir, ensure_testbed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m egrsd_pl.testbed", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (and cache) the tokenizer and warm-started tiny Qwen3")
    path = commands.add_parser("path", help="print the cache folder of a testbed (built or not)")
    for command in (build, path):
        command.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds of SFT on CPU")
        command.add_argument("--seed", type=int, default=0, help="seed of the model, corpus and order")
        command.add_argument(
            "--cache-dir", default=None, help="cache root (default $EGRSD_PL_CACHE or ~/.cache/egrsd_pl)"
        )
    build.add_argument("--output-dir", default=None, help="write here instead of the cache (always rebuilds)")
    build.add_argument("--force", action="store_true", help="rebuild even if the cache holds this testbed")
    args = parser.parse_args(argv)

    target = cached_testbed_dir(args.cache_dir, budget_s=args.budget_s, seed=args.seed)
    if args.command == "path":
        print(target)
        return 0
    if args.output_dir is not None:
        folder = build_testbed(args.output_dir, budget_s=args.budget_s, seed=args.seed)
    else:
        if args.force and target.exists():
            shutil.rmtree(target)
        folder = ensure_testbed(args.cache_dir, budget_s=args.budget_s, seed=args.seed)
    report = json.loads((folder / "testbed.json").read_text())
    print(json.dumps(report, indent=2), file=sys.stderr)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())

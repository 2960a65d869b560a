"""Overhead of the live mechanism diagnostics (``--diagnostics.enabled``): training steps with and without.

    python bench/diagnostics.py                       # tiny testbed, CPU: 2 x 2 fits of 8 steps, batch 32
    python bench/diagnostics.py --steps 20 --rounds 3 --pictures-every 5

Runs short ``configs/tiny.yaml`` fits through the real CLI in one process, alternating the callback off
and on (``--rounds`` pairs), and times every training step from ``on_train_batch_start`` to the end of
``on_train_batch_end`` (student and teacher forwards, backward, optimizer, callbacks; the rollouts, which
happen before ``on_train_batch_start``, are excluded and would only shrink the relative overhead). With the
callback on it also times the callback's own ``on_train_batch_end`` (regime shares and restore every step,
histograms and the decile image every ``--pictures-every`` steps). The first step of every fit is dropped
(warm-up). The table gives medians over the kept steps of all rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from callbacks.diagnostics import MechanismDiagnostics  # noqa: E402
from egrsd_pl.cli import build_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    """Wall time from ``on_train_batch_start`` to the end of ``on_train_batch_end`` (runs after the others)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.seconds.append(time.perf_counter() - self.started)


def fit(args: argparse.Namespace, *, enabled: bool, root: Path) -> tuple[list[float], list[float]]:
    """One fit: ``(step seconds, diagnostics-callback seconds)`` of every step after the first."""
    cli = build_cli(
        [
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--model.model_name_or_path",
            args.model,
            "--data.batch_size",
            str(args.batch_size),
            "--trainer.max_steps",
            str(args.steps),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(root),
            "--trainer.logger.init_args.save_dir",
            str(root),
            "--evaluation.at_end",
            "false",
            "--evaluation.every_n_steps",
            "0",
            "--checkpoint.save_last",
            "false",
            "--checkpoint.every_n_train_steps",
            "0",
            "--diagnostics.enabled",
            str(enabled).lower(),
            "--diagnostics.histogram_every_n_steps",
            str(args.pictures_every),
            "--diagnostics.deciles_every_n_steps",
            str(args.pictures_every),
        ],
        run=False,
    )
    diagnostics = next(c for c in cli.trainer.callbacks if isinstance(c, MechanismDiagnostics))
    callback_seconds: list[float] = []
    original = diagnostics.on_train_batch_end

    def timed(*call_args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        original(*call_args, **kwargs)
        callback_seconds.append(time.perf_counter() - started)

    diagnostics.on_train_batch_end = timed  # type: ignore[method-assign]
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.seconds[1:], callback_seconds[1:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="testbed:tiny")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per fit (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs of fits")
    parser.add_argument("--batch-size", type=int, default=32, help="problems per step (tiny.yaml: 32)")
    parser.add_argument("--pictures-every", type=int, default=4, help="histogram / decile-image period")
    args = parser.parse_args()
    off: list[float] = []
    on: list[float] = []
    callback: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(args.rounds):
            off += fit(args, enabled=False, root=Path(folder) / f"off{round_index}")[0]
            steps, own = fit(args, enabled=True, root=Path(folder) / f"on{round_index}")
            on += steps
            callback += own
    median_off, median_on, median_callback = (statistics.median(v) for v in (off, on, callback))
    print(f"\n{args.rounds} x 2 fits of {args.steps} steps, batch {args.batch_size}, model {args.model}\n")
    print("| diagnostics | steps timed | median step (s) | median callback (s) | callback / step |")
    print("|---|---:|---:|---:|---:|")
    print(f"| off | {len(off)} | {median_off:.3f} | – | – |")
    print(
        f"| on | {len(on)} | {median_on:.3f} | {median_callback:.4f} "
        f"| {100 * median_callback / median_on:.1f}% |"
    )
    print(f"\nstep on / step off: {median_on / median_off:.3f}; slowest callback call: {max(callback):.4f} s")


if __name__ == "__main__":
    main()

"""Overhead of the live mechanism diagnostics (``--diagnostics.enabled``): training steps with and without.

    python bench/diagnostics.py                       # tiny testbed, CPU: 2 x 2 fits of 8 steps, batch 32
    python bench/diagnostics.py --steps 20 --rounds 3 --pictures-every 5

Runs short ``configs/tiny.yaml`` fits through the real CLI in one process, alternating the callback off
and on (``--rounds`` pairs), and times every training step from ``on_train_batch_start`` to the end of
``on_train_batch_end`` (student and teacher forwards, backward, optimizer, callbacks; the rollouts, which
happen before ``on_train_batch_start``, are excluded and would only shrink the relative overhead). With the
callback on it also times the callback's own ``on_train_batch_end`` (regime shares and restore every step,
histograms and the decile image every ``--pictures-every`` steps). The first step of every fit is dropped
(warm-up). The first table gives medians over the kept steps of all rounds, the callback's time split into
steps with and without pictures. The second times the callback alone on random ``[N, T]`` step tensors of
the paper's shape (per-device batch 4 x 1,024 tokens) and larger, ``--repeats`` calls each (median).
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from egrsd_pl.callbacks.diagnostics import MechanismDiagnostics  # noqa: E402
from egrsd_pl.cli import build_cli  # noqa: E402
from egrsd_pl.losses import DEFAULT_GATE  # noqa: E402

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


def fit(
    args: argparse.Namespace, *, enabled: bool, root: Path
) -> tuple[list[float], list[tuple[int, float]]]:
    """One fit: step seconds and ``(step, diagnostics-callback seconds)`` of every step after the first."""
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
    callback_seconds: list[tuple[int, float]] = []
    original = diagnostics.on_train_batch_end

    def timed(trainer: Any, *call_args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        original(trainer, *call_args, **kwargs)
        callback_seconds.append((trainer.global_step, time.perf_counter() - started))

    diagnostics.on_train_batch_end = timed  # type: ignore[method-assign]
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.seconds[1:], callback_seconds[1:]


class _Recorder:
    """Stands in for the module: the callback's ``log_dict`` target."""

    hparams = {"objective": "egrsd"}
    gate = DEFAULT_GATE

    def log_dict(self, metrics: dict[str, Any], **kwargs: Any) -> None:
        self.metrics = metrics


class _NoLoggerTrainer:
    global_step = 1
    logger = None
    is_global_zero = True


def callback_alone(shape: tuple[int, int], repeats: int) -> float:
    """Median seconds of one ``on_train_batch_end`` (scalars only) on random ``shape`` step tensors."""
    from egrsd_pl.losses import TokenQuantities

    entropy = torch.rand(shape) ** 4 * 3  # [N, T] mostly confident, a few uncertain tokens
    mask = torch.ones(shape, dtype=torch.bool)
    outputs = {"token_quantities": TokenQuantities(mask, entropy, torch.randn(shape), entropy.max())}
    callback = MechanismDiagnostics(enabled=True)
    seconds = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        callback.on_train_batch_end(_NoLoggerTrainer(), _Recorder(), outputs, None, 0)  # type: ignore[arg-type]
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="testbed:tiny")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per fit (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs of fits")
    parser.add_argument("--batch-size", type=int, default=32, help="problems per step (tiny.yaml: 32)")
    parser.add_argument("--pictures-every", type=int, default=4, help="histogram / decile-image period")
    parser.add_argument("--repeats", type=int, default=20, help="calls per shape of the callback-alone table")
    args = parser.parse_args()
    off: list[float] = []
    on: list[float] = []
    callback: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(args.rounds):
            off += fit(args, enabled=False, root=Path(folder) / f"off{round_index}")[0]
            steps, own = fit(args, enabled=True, root=Path(folder) / f"on{round_index}")
            on += steps
            callback += own
    plain = [s for step, s in callback if step % args.pictures_every]
    drawn = [s for step, s in callback if not step % args.pictures_every]
    median_off, median_on = statistics.median(off), statistics.median(on)
    print(f"\n{args.rounds} x 2 fits of {args.steps} steps, batch {args.batch_size}, model {args.model}\n")
    print("| diagnostics | steps timed | median step (s) | median callback (s) | callback / step (off) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| off | {len(off)} | {median_off:.3f} | – | – |")
    for label, values in (("on, scalars only", plain), ("on, + histograms and decile image", drawn)):
        if values:
            median = statistics.median(values)
            print(f"| {label} | {len(values)} | | {median:.4f} | {100 * median / median_off:.2f}% |")
    print(f"| on (all steps) | {len(on)} | {median_on:.3f} | | |")
    print(f"\nstep on / step off (medians): {median_on / median_off:.3f}\n")
    print("| step tensors [N, T] | callback alone, scalars only (ms, median) |")
    print("|---|---:|")
    for shape in ((32, 192), (4, 1024), (4, 16384)):
        print(f"| {shape[0]} x {shape[1]:,} | {1000 * callback_alone(shape, args.repeats):.2f} |")


if __name__ == "__main__":
    main()

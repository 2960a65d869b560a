"""The command line: ``python main.py fit --config configs/egrsd.yaml`` (also installed as ``egrsd``).

A :class:`~lightning.pytorch.cli.LightningCLI` over :class:`EGRSDModule` and
:class:`RolloutDataModule`. Every knob is a typed, documented constructor argument, so ``--help``
lists them all and ``--model.gamma 0.5`` just works. The callbacks that are part of the algorithm
(reward statistics, teacher schedule) and the pre-clip grad-norm monitor are always installed; their
options live under ``--reward_stats.*``, ``--teacher.*`` and ``--grad_norm.*``; checkpointing
(``--checkpoint.*``), the graceful stop on SIGTERM / Ctrl-C and avg@K evaluation (``--evaluation.*``, what
``validate`` runs) are always there too, as are the live mechanism diagnostics (``--diagnostics.*``, off unless
enabled).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI

from callbacks.checkpoint import AdapterCheckpoint
from callbacks.diagnostics import MechanismDiagnostics
from callbacks.evaluation import PeriodicEvaluation
from callbacks.graceful_stop import GracefulStop
from callbacks.grad_norm import GradNormMonitor
from callbacks.reward_statistics import RewardStatistics
from callbacks.teacher_update import TeacherUpdate
from egrsd_pl.datamodule import RolloutDataModule
from egrsd_pl.module import EGRSDModule

TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 100,
    "gradient_clip_val": 0.1,
    "gradient_clip_algorithm": "norm",
    "use_distributed_sampler": False,  # RolloutDataModule shards (and resumes) problems itself
    "log_every_n_steps": 1,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "egrsd"},
    },
}


class EGRSDCLI(LightningCLI):
    """LightningCLI with the algorithm's callbacks forced on."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(RewardStatistics, "reward_stats")
        parser.add_lightning_class_args(GradNormMonitor, "grad_norm")
        parser.add_lightning_class_args(TeacherUpdate, "teacher")
        parser.link_arguments("teacher.schedule", "model.teacher")  # one knob: --teacher.schedule
        parser.add_lightning_class_args(AdapterCheckpoint, "checkpoint")
        parser.add_lightning_class_args(GracefulStop, "graceful_stop")  # SIGTERM / Ctrl-C: step, save, stop
        # avg@K evaluation: always there for `validate`; during `fit` only when --evaluation.every_n_steps > 0
        # or --evaluation.at_end true.
        parser.add_lightning_class_args(PeriodicEvaluation, "evaluation")
        parser.set_defaults({"evaluation.every_n_steps": 0, "evaluation.at_end": False})
        # Live mechanism diagnostics (diag/*): off unless --diagnostics.enabled true.
        parser.add_lightning_class_args(MechanismDiagnostics, "diagnostics")


def build_cli(
    args: list[str] | None = None, *, run: bool = True, cli_class: type[EGRSDCLI] = EGRSDCLI
) -> EGRSDCLI:
    """Builds (and by default runs) the CLI; ``args`` replaces ``sys.argv[1:]`` (for tests).

    With ``run=False`` there is no subcommand: ``args`` are ``fit``'s arguments.
    """
    return cli_class(
        EGRSDModule,
        RolloutDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


# Commands that are not Lightning's: name -> (module with ``main(argv) -> int``, one line of help).
TOOLS: dict[str, tuple[str, str]] = {
    "compare": (
        "egrsd_pl.compare",
        "train and evaluate several methods over seeds; the paper's tables and Fig. 1",
    ),
    "diagnose": (
        "egrsd_pl.diagnostics",
        "entropy deciles, lock/fork/pivot regimes and token pictures of a checkpoint",
    ),
    "testbed": ("egrsd_pl.testbed.__main__", "build or locate the offline testbed models"),
}
LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a method (python main.py fit --config configs/tiny.yaml)",
    "validate": "avg@K evaluation of the base model or a checkpoint (--ckpt_path)",
}


def usage() -> str:
    """``egrsd --help``: every command with one line each."""
    lines = ["usage: egrsd COMMAND [--help] [options]", "", "commands:"]
    commands = {**LIGHTNING_COMMANDS, **{name: text for name, (_, text) in TOOLS.items()}}
    width = max(map(len, commands))
    lines += [f"  {name:<{width}}  {text}" for name, text in commands.items()]
    lines += ["", "`egrsd COMMAND --help` documents every option of a command."]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    """Entry point. Known configuration errors print one line (``EGRSD_DEBUG=1`` shows the traceback)."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        sys.exit(0 if argv else 2)
    try:
        if argv[0] in TOOLS:
            module = importlib.import_module(TOOLS[argv[0]][0])
            sys.exit(module.main(argv[1:]))
        build_cli(argv)
    except (ValueError, FileNotFoundError, ImportError) as error:
        if os.environ.get("EGRSD_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

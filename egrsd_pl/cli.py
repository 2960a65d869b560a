"""The command line: ``python main.py fit --config configs/egrsd.yaml`` (also installed as ``egrsd``).

The composition root: the only module that imports both :mod:`egrsd_pl` and :mod:`callbacks`, so the
package never depends on the callbacks (they import the package, not the reverse). A :class:`~lightning.pytorch.cli.LightningCLI` over :class:`EGRSDModule` and
:class:`RolloutDataModule`. Every knob is a typed, documented constructor argument, so ``--help``
lists them all and ``--model.gamma 0.5`` just works. The callbacks that are part of the algorithm
(reward statistics, teacher schedule) and the pre-clip grad-norm monitor are always installed; their
options live under ``--reward_stats.*``, ``--teacher.*`` and ``--grad_norm.*``; checkpointing
(``--checkpoint.*``), the graceful stop on SIGTERM / Ctrl-C and avg@K evaluation (``--evaluation.*``, what
``validate`` runs) are always there too, as are the live mechanism diagnostics (``--diagnostics.*``, off unless
enabled) and :class:`~egrsd_pl.callbacks.run_summary.RunSummary` (``--summary.*``): a start line, a progress bar in steps
out of ``max_steps`` and a closing summary. ``--trainer.strategy fsdp2`` (:class:`~egrsd_pl.sharding.FSDP2Strategy`)
is built from ``--fsdp2.*``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from egrsd_pl.callbacks.checkpoint import AdapterCheckpoint, find_last_checkpoint
from egrsd_pl.callbacks.diagnostics import MechanismDiagnostics
from egrsd_pl.callbacks.evaluation import PeriodicEvaluation
from egrsd_pl.callbacks.graceful_stop import GracefulStop
from egrsd_pl.callbacks.grad_norm import GradNormMonitor
from egrsd_pl.callbacks.progress import StepProgressBar
from egrsd_pl.callbacks.reward_statistics import RewardStatistics
from egrsd_pl.callbacks.run_summary import RunSummary
from egrsd_pl.callbacks.teacher_update import TeacherUpdate
from egrsd_pl.checkpoint_io import refuse_damaged_checkpoint
from egrsd_pl.datamodule import RolloutDataModule
from egrsd_pl.module import EGRSDModule
from egrsd_pl.rollout.server import ServerError
from egrsd_pl.sharding import STRATEGY_NAME, FSDP2Strategy, register_fsdp2_strategy

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
        # A run that explains itself: start line, step progress bar, closing summary (--summary.enabled false: off).
        parser.add_lightning_class_args(RunSummary, "summary")
        # FSDP2's options, read when --trainer.strategy is fsdp2 (docs/fsdp.md).
        parser.add_class_arguments(FSDP2Strategy, "fsdp2", instantiate=False, sub_configs=True)
        parser.add_argument(
            "--torch_threads",
            type=int | None,
            default=None,
            help="torch's intra-op CPU threads in each process (null: torch's default, one per core). The tiny "
            "testbed is about as fast on 1 thread as on 2 idle cores, and many times faster on a busy CPU, where "
            "threads that wait for each other stall every operation",
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parses; then a ``--ckpt_path`` file that is not an intact checkpoint stops the command in one line
        (file, damage, newest intact checkpoint beside it) before LightningCLI reads the file for its
        hyper-parameters, which would end in torch's traceback."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = (self.config[subcommand] if subcommand else self.config).get("ckpt_path")  # tools: flat
        if ckpt_path is not None:
            refuse_damaged_checkpoint(ckpt_path)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Checks the accelerator and sets ``--torch_threads`` before anything heavy (the module and the
        DataModule load nothing until ``fit``); adds :class:`StepProgressBar` unless the summary or the
        bar is off, or one is given."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        prepare_process(config)
        trainer_config = self._get(self.config_init, "trainer", default={})
        given = trainer_config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        bar_on = trainer_config.get("enable_progress_bar") is not False  # None: Lightning's default, on
        wanted = self._get(self.config_init, "summary").enabled and bar_on
        if wanted and not any(isinstance(c, ProgressBar) for c in given):
            kwargs["callbacks"] = [*given, StepProgressBar()]
        if trainer_config.get("strategy") == STRATEGY_NAME:  # built from --fsdp2.*
            kwargs["strategy"] = FSDP2Strategy(**self._get(self.config_init, "fsdp2").as_dict())
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """``--ckpt_path last``: the newest ``last.ckpt`` of any earlier run of this experiment; none: step 0."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        found = find_last_checkpoint(self.trainer)
        if found is None:
            rank_zero_info(
                "--ckpt_path last: no last.ckpt from an earlier run of this experiment, starting at step 0"
            )
        if found is not None:
            refuse_damaged_checkpoint(found, flag="--ckpt_path last ->")
        config["ckpt_path"] = None if found is None else str(found)


def prepare_process(config: Any) -> None:
    """Before anything heavy: stops a GPU config without a GPU (:func:`check_accelerator`) and applies
    ``--torch_threads``."""
    check_accelerator(config, torch.cuda.is_available())
    if config.get("torch_threads") is not None:
        if config.torch_threads < 1:
            raise ValueError(f"--torch_threads must be >= 1 or null, got {config.torch_threads}")
        torch.set_num_threads(config.torch_threads)


def check_accelerator(config: Any, cuda_available: bool) -> None:
    """Stops a GPU config on a machine without a GPU before anything loads, naming the flags to change."""
    trainer, model = config.get("trainer") or {}, config.get("model") or {}
    if str(trainer.get("accelerator")) not in {"gpu", "cuda"} or cuda_available:
        return
    changes = ["--trainer.accelerator cpu", "--trainer.devices 1"]
    if trainer.get("strategy") not in (None, "auto"):
        changes.append("--trainer.strategy auto")
    if str(trainer.get("precision")) not in {"32-true", "32", "None"}:
        changes.append("--trainer.precision 32-true")
    if model.get("dtype") not in (None, "float32"):
        changes.append("--model.dtype float32")
    if model.get("attn_implementation") == "flash_attention_2":
        changes.append("--model.attn_implementation sdpa")
    rehearsal = Path("configs/cpu_rehearsal.yaml")
    also = (
        f"; or add --config {rehearsal} after this config to rehearse it on the CPU"
        if rehearsal.is_file()
        else ""
    )
    raise ValueError(
        f"this config asks for GPUs (--trainer.accelerator {trainer.get('accelerator')}) but torch sees no CUDA "
        f"device here. To run it on the CPU: {' '.join(changes)} (and a small model, e.g. "
        f"--model.model_name_or_path testbed:tiny); configs/tiny.yaml is a complete CPU run{also}"
    )


def build_cli(
    args: list[str] | None = None, *, run: bool = True, cli_class: type[EGRSDCLI] = EGRSDCLI
) -> EGRSDCLI:
    """Builds (and by default runs) the CLI; ``args`` replaces ``sys.argv[1:]`` (for tests).

    With ``run=False`` there is no subcommand: ``args`` are ``fit``'s arguments. ``args`` handed in from
    Python are meant, so LightningCLI's warning that ``sys.argv`` holds arguments too (the test runner's,
    ``egrsd compare``'s) is silenced; a command line (``main`` without ``args``) passes ``None``.
    """
    register_fsdp2_strategy()  # --trainer.strategy fsdp2
    with warnings.catch_warnings():
        if args is not None:
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return cli_class(
            EGRSDModule,
            RolloutDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )


class _ParseOnly(EGRSDCLI):
    """Parses and validates ``fit``'s arguments; instantiates nothing (no model, no data)."""

    def instantiate_classes(self) -> None:
        pass


def parse_error(args: list[str]) -> str | None:
    """``None`` when ``args`` parse as ``main.py fit`` arguments, else the parser's message (one line).

    ``egrsd compare`` checks every method with it before any run (handed in by :func:`main`: the package
    never imports the CLI).
    """
    captured = io.StringIO()
    logging.disable(logging.INFO)  # "Seed set to ..." once per parse
    try:
        with (
            contextlib.redirect_stderr(captured),
            contextlib.redirect_stdout(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")  # e.g. LightningCLI's "args and sys.argv both given"
            build_cli(args, run=False, cli_class=_ParseOnly)
    except SystemExit:
        return _last_error_line(captured.getvalue())
    except (ValueError, TypeError) as error:
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    finally:
        logging.disable(logging.NOTSET)
    return None


class _ToolCLI(EGRSDCLI):
    """``fit``'s parser with a tool's options on top (:attr:`tool_arguments`); instantiates the module, the
    DataModule and the callbacks (each validates its arguments), never a Trainer."""

    tool_arguments: Callable[[Any], None]

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        type(self).tool_arguments(parser)

    def instantiate_classes(self) -> None:
        prepare_process(self.config)
        self.config_init = self.parser.instantiate_classes(self.config)
        self.model, self.datamodule = self.config_init.model, self.config_init.data


def parse_run(args: list[str], add_arguments: Callable[[Any], None]) -> tuple[Any, Any]:
    """``(config, instantiated)`` of ``args`` parsed as ``main.py fit`` arguments plus a tool's own options.

    ``egrsd diagnose`` reads its run with it (handed in by :func:`main`: the package never imports the CLI),
    so stacked ``--config`` files and every ``--model.*`` / ``--data.*`` / ``--evaluation.*`` override mean
    what they mean to ``fit``.

    Args:
        args: The tool's command line (without the command name).
        add_arguments: Adds the tool's options to the jsonargparse parser.
    """
    cli_class = type("_RunToolCLI", (_ToolCLI,), {"tool_arguments": staticmethod(add_arguments)})
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="LightningCLI's args parameter"
        )  # `egrsd diagnose ...`: args are argv[2:]
        cli = build_cli(args, run=False, cli_class=cli_class)
    return cli.config, cli.config_init


def parse_config(args: list[str]) -> Any:
    """``args`` parsed as ``main.py fit`` arguments (nothing instantiated): what ``egrsd serve`` reads."""
    return build_cli(args, run=False, cli_class=_ParseOnly).config


def _last_error_line(text: str) -> str:
    """The informative line of jsonargparse's error output (``error: ...``), shortened."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith("error:") or ": error:" in line:
            message = " ".join(lines[index : index + 3])
            return message.split("error:", 1)[1].strip()[:400]
    return (lines[-1] if lines else "the parser rejected the arguments")[:400]


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
    "serve": ("egrsd_pl.serve", "start a vLLM server for a config's model (generation on GPUs of its own)"),
}
TOOL_OPTIONS: dict[str, dict[str, Any]] = {
    "compare": {"parse_error": parse_error},
    "diagnose": {"parse_run": parse_run},
    "serve": {"parse_config": parse_config},
}
"""What the composition root hands each tool: the CLI's own parser, which the package cannot import."""
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
            options = TOOL_OPTIONS.get(argv[0], {})
            sys.exit(module.main(argv[1:], **options))
        # Only arguments handed in from Python go through `args`; a command line is LightningCLI's own
        # sys.argv (given both, it warns on every run that `args` is meant for calls from Python).
        build_cli(None if args is None else argv)
    except (ValueError, FileNotFoundError, ImportError, ServerError) as error:
        if os.environ.get("EGRSD_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # python -m egrsd_pl.cli fit ... (what egrsd compare runs)
    main()

"""A run that explains itself: what it trains and where to watch it, then what happened and what to do next."""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from egrsd_pl.callbacks.evaluation import PeriodicEvaluation

# (metric logged by the module, row label, format of a value)
TRACKED: tuple[tuple[str, str, str], ...] = (
    ("train/reward_mean", "reward", "{:.3f}"),
    ("train/accuracy", "accuracy", "{:.3f}"),
    ("train/completion_len", "completion length (tokens)", "{:.1f}"),
)


class RunSummary(pl.Callback):
    """One line when ``fit`` starts and a closing summary when it ends, on rank 0.

    The start line names the model, the objective, the run folder and the ``tensorboard`` command.
    The summary compares the mean of the first and last ``window`` optimizer steps of reward,
    accuracy and completion length (``train/*``), lists every evaluation of the run with its
    accuracy and length and prints the last one's table (read from the ``results.json`` /
    ``results.md`` that :class:`PeriodicEvaluation` writes), and gives the last checkpoint, its PEFT
    adapter folder and the command that resumes the run. The per-step values are kept in the
    checkpoint, so a resumed run summarises all its steps. The CLI forces it on (``--summary.*``)
    together with :class:`~egrsd_pl.callbacks.progress.StepProgressBar`; ``--summary.enabled false`` turns both off.

    Args:
        enabled: Print the start line and the summary (and, from the CLI, use the step progress bar).
        window: Optimizer steps averaged at each end of the run.
    """

    def __init__(self, enabled: bool = True, window: int = 10) -> None:
        if window < 1:
            raise ValueError(f"--summary.window must be >= 1, got {window}")
        self.enabled = enabled
        self.window = window
        self.history: list[tuple[int, dict[str, float]]] = []  # (global step, tracked metrics)
        self._started = time.monotonic()
        self._first_step = 0
        self._log_dir: str | None = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.monotonic()
        self._first_step = trainer.global_step
        self._log_dir = trainer.log_dir  # on every rank: under DDP the property is a broadcast
        if self.enabled and trainer.is_global_zero:
            print(start_line(trainer, pl_module, self._log_dir), flush=True)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if self.history and self.history[-1][0] == step:
            return  # gradient accumulation: the optimizer step has not advanced
        values = {
            name: float(trainer.callback_metrics[name])
            for name, _, _ in TRACKED
            if name in trainer.callback_metrics
        }
        if values:
            self.history.append((step, values))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and trainer.is_global_zero:
            print(self.summary(trainer, pl_module), flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [[step, values] for step, values in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(step), dict(values)) for step, values in state_dict.get("history", [])]

    # ------------------------------------------------------------------ text
    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """The closing summary (see the class docstring)."""
        minutes, seconds = divmod(round(time.monotonic() - self._started), 60)
        steps = trainer.global_step - self._first_step
        lines = [
            "",
            "=" * 30 + " run summary " + "=" * 30,
            f"{describe_method(pl_module)}: {trainer.global_step} of {trainer.max_steps} steps "
            f"({steps} in this run, {minutes} min {seconds:02d} s)",
        ]
        lines += first_last_table(self.history, self.window)
        lines += evaluation_lines(report_dir(trainer, self._log_dir), testbed_report(pl_module))
        lines += checkpoint_lines(trainer)
        logger_dir = tensorboard_dir(trainer)
        if logger_dir is not None:
            lines.append(f"watch:        tensorboard --logdir {logger_dir}")
        lines.append("=" * 73)
        return "\n".join(lines)


def describe_method(pl_module: pl.LightningModule) -> str:
    """``egrsd (gamma 0.3) on testbed:tiny``, from the module's hyper-parameters."""
    hp = getattr(pl_module, "hparams", {})
    objective = hp.get("objective", type(pl_module).__name__)
    knobs = [f"gamma {hp['gamma']:g}"] if objective in {"egrsd", "cl_egrsd"} and "gamma" in hp else []
    if hp.get("window"):
        knobs.append(f"window {hp['window']}")
    text = objective + (f" ({', '.join(knobs)})" if knobs else "")
    return f"{text} on {hp.get('model_name_or_path', '?')}"


def start_line(trainer: pl.Trainer, pl_module: pl.LightningModule, log_dir: str | None) -> str:
    """The line printed when ``fit`` starts (``log_dir``: ``trainer.log_dir``, read on every rank)."""
    steps = f"{trainer.max_steps} steps" if trainer.max_steps > 0 else "no step limit"
    where = f"; run folder {log_dir}" if log_dir else ""
    board = tensorboard_dir(trainer)
    watch = f"; watch it: tensorboard --logdir {board}" if board is not None else ""
    return f"egrsd: training {describe_method(pl_module)}, {steps}{where}{watch}"


def first_last_table(history: Sequence[tuple[int, dict[str, float]]], window: int) -> list[str]:
    """Rows ``metric | first n steps | last n steps`` (``n`` = ``window``, fewer for short runs)."""
    if not history:
        return ["no training step was logged"]
    n = max(1, min(window, len(history) // 2))
    first, last = history[:n], history[-n:]
    lines = [f"{'':28}{'first: ' + _span(first):>20}{'last: ' + _span(last):>20}"]
    for name, label, fmt in TRACKED:
        before = [v[name] for _, v in first if name in v]
        after = [v[name] for _, v in last if name in v]
        if before and after:
            mean_before, mean_after = (fmt.format(sum(x) / len(x)) for x in (before, after))
            lines.append(f"  {label:26}{mean_before:>20}{mean_after:>20}")
    return lines


def report_dir(trainer: pl.Trainer, log_dir: str | None) -> Path | None:
    """Folder of the evaluation reports of this run (``PeriodicEvaluation.report_dir`` or ``<log_dir>/eval``)."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, PeriodicEvaluation):
            if callback.report_dir is not None:
                return Path(callback.report_dir)
            return Path(log_dir or ".") / "eval"
    return None


def testbed_report(pl_module: pl.LightningModule) -> dict[str, Any] | None:
    """``testbed.json`` of the model folder, when the model is a testbed build that measured itself."""
    folder = getattr(pl_module, "model_path", None)
    marker = Path(folder) / "testbed.json" if folder else None
    if marker is None or not marker.is_file():
        return None
    report = json.loads(marker.read_text())
    return report if "greedy_accuracy" in report else None


def evaluation_lines(folder: Path | None, testbed: dict[str, Any] | None) -> list[str]:
    """Every evaluation in ``folder`` (step, accuracy, length) and the newest one's table."""
    lines = ["evaluations (held-out, see --evaluation.*):"]
    if testbed is not None:
        lines.append(
            f"  before training (testbed.json, greedy, {testbed['eval_problems']} problems): "
            f"{100 * testbed['greedy_accuracy']:.1f} % at {testbed['mean_completion_length']:.0f} tokens"
        )
    results = []
    for path in folder.glob("*/results.json") if folder is not None and folder.is_dir() else []:
        data = json.loads(path.read_text())
        results.append(
            (int(data["step"]), str(data["label"]), float(data["avg"]), float(data["avg_len"]), path)
        )
    if not results:
        lines.append("  none in this run (--evaluation.every_n_steps N or --evaluation.at_end true add some)")
        return lines
    results.sort()
    for step, label, avg, avg_len, _ in results:
        lines.append(f"  {label} (step {step}): avg {avg:.2f} % at {avg_len:.0f} tokens")
    newest = results[-1][-1].with_name("results.md")
    if newest.is_file():
        lines += ["", f"last evaluation ({newest}):", newest.read_text().rstrip(), ""]
    return lines


def checkpoint_lines(trainer: pl.Trainer) -> list[str]:
    """The last checkpoint, its PEFT adapter folder, and the command that resumes the run."""
    callback = trainer.checkpoint_callback
    if not isinstance(callback, ModelCheckpoint) or not callback.dirpath:
        return ["checkpoint:   none (no checkpoint callback)"]
    folder = Path(callback.dirpath)
    last = Path(callback.last_model_path) if callback.last_model_path else None
    adapters = sorted(folder.glob("*_adapter"), key=_step_of)
    lines = [f"checkpoint:   {last if last is not None else folder}"]
    if adapters:
        lines.append(f"PEFT adapter: {adapters[-1]}  (PeftModel.from_pretrained(base_model, this folder))")
    lines.append(f"resume:       {resume_command(sys.argv)}")
    return lines


def resume_command(argv: Sequence[str]) -> str:
    """The command line that started this run with ``--ckpt_path last`` (replacing any ``--ckpt_path``)."""
    program = Path(argv[0]).name if argv else "main.py"
    head = "python main.py" if program == "main.py" else "egrsd"
    args, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        if not arg.startswith("--ckpt_path="):
            args.append(arg)
    return " ".join([head, *map(shlex.quote, args), "--ckpt_path", "last"])


def tensorboard_dir(trainer: pl.Trainer) -> str | None:
    """``<save_dir>/<name>`` of the TensorBoard logger (every version of the run), if there is one."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return str(Path(logger.save_dir) / str(logger.name))
    return None


def _span(part: Sequence[tuple[int, dict[str, float]]]) -> str:
    return f"steps {part[0][0]}-{part[-1][0]}" if len(part) > 1 else f"step {part[0][0]}"


def _step_of(path: Path) -> int:
    match = re.search(r"step=(\d+)", path.name)
    return int(match.group(1)) if match else -1

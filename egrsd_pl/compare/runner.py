"""The runs of a comparison: one ``fit`` and one ``validate`` subprocess per (method, seed), resumable.

Layout under the output folder ``DIR``::

    DIR/runs/<method>/seed_<s>/          TensorBoard events of the run (tensorboard --logdir DIR/runs)
        checkpoints/last.ckpt            ... and every checkpoint of the run, with its PEFT adapter
        settings.json                    base config, overrides and seed the run was started with
        fit.done                         written when ``fit`` exited cleanly
        fit.log, validate.log            each subprocess's output (appended across attempts)
        validate/                        the evaluation's events and config
        eval/last/results.json           the evaluation of the final checkpoint (``eval/base`` untrained)
        eval/epoch=E-step=S/results.json with ``--snapshots``: the evaluation of each saved checkpoint
        snapshot.log                     the output of those evaluations

A run is *done* when its ``results.json`` exists (with ``--snapshots``: and every snapshot's); a run with
``fit.done`` only needs its evaluation; any other run (re)starts ``fit`` with ``--ckpt_path last``, which
continues from ``checkpoints/last.ckpt`` when a previous attempt left one and starts afresh otherwise. A run
whose ``settings.json`` differs from the current command (another base config, other overrides) is never
resumed or reused: the command stops.

Snapshots (``--snapshots``, the paper's Table 4, S1–S4) are the step checkpoints that
:class:`egrsd_pl.callbacks.checkpoint.AdapterCheckpoint` writes every ``--checkpoint.every_n_train_steps``
and at the final step (``epoch=E-step=S.ckpt``; ``last.ckpt`` is not one). Each is evaluated once with
``validate --ckpt_path`` into ``eval/<its name>/``; the snapshot at the step of ``last.ckpt`` (the
callback writes both files at that step, so they hold the same weights) reuses ``eval/last`` instead of
being evaluated twice.
"""

from __future__ import annotations

import json
import re
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from egrsd_pl.checkpoint_io import refuse_damaged_checkpoint
from egrsd_pl.compare.methods import Method
from egrsd_pl.json_files import write_json

FIT_DEFAULTS = ["--evaluation.every_n_steps", "0", "--evaluation.at_end", "false"]
"""Arguments of every ``fit`` right after the base config: the comparison evaluates once, with ``validate``
(the common overrides after ``--`` may turn periodic evaluation back on)."""


SNAPSHOT_NAME = re.compile(r"(?:^|-)step=(\d+)(?:-|$)")
"""A step checkpoint's name (stem), e.g. ``epoch=0-step=25``; group 1 is the optimizer step."""


@dataclass(frozen=True)
class Run:
    """One (method, seed) of a comparison and where its files live.

    Attributes:
        method: The method.
        seed: Its seed.
        directory: ``DIR/runs/<method>/seed_<s>``.
        snapshots: Also evaluate every step checkpoint (``--snapshots``).
    """

    method: Method
    seed: int
    directory: Path
    snapshots: bool = False

    @property
    def name(self) -> str:
        return f"{self.method.name}/seed_{self.seed}"

    @property
    def results_path(self) -> Path:
        """``results.json`` of the run's evaluation (``eval/last`` after training, ``eval/base`` without)."""
        return self.directory / "eval" / ("last" if self.method.fit else "base") / "results.json"

    @property
    def fit_done_path(self) -> Path:
        return self.directory / "fit.done"

    @property
    def settings_path(self) -> Path:
        """``settings.json``: what the run was started with (base config, common and method overrides)."""
        return self.directory / "settings.json"

    @property
    def last_checkpoint(self) -> Path:
        return self.directory / "checkpoints" / "last.ckpt"

    def snapshot_checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, checkpoint)`` of every step checkpoint of the run, by step (none without training)."""
        folder = self.directory / "checkpoints"
        found = [(SNAPSHOT_NAME.search(p.stem), p) for p in folder.glob("*.ckpt")] if self.method.fit else []
        return sorted((int(match.group(1)), path) for match, path in found if match is not None)

    def snapshot_results(self) -> list[tuple[int, Path]]:
        """``(step, results.json)`` of every snapshot, evaluated or not: ``eval/<checkpoint name>`` or, at the
        step of the evaluated ``last.ckpt``, ``eval/last`` (the same weights)."""
        last_step = (
            json.loads(self.results_path.read_text()).get("step") if self.results_path.is_file() else None
        )
        return [
            (
                step,
                self.results_path
                if step == last_step
                else self.directory / "eval" / path.stem / "results.json",
            )
            for step, path in self.snapshot_checkpoints()
        ]

    def pending_snapshots(self) -> list[Path]:
        """The step checkpoints still to evaluate (after ``last.ckpt``'s evaluation, which one of them reuses)."""
        if not self.snapshots or not self.results_path.is_file():
            return []
        results = dict(self.snapshot_results())
        return [path for step, path in self.snapshot_checkpoints() if not results[step].is_file()]

    def status(self) -> str:
        """``done`` (results exist, with ``snapshots`` every snapshot's too), ``snapshots`` (the final
        checkpoint is evaluated, some snapshot is not), ``evaluate`` (trained or untrained, not evaluated),
        ``resume`` (``last.ckpt`` of an interrupted fit) or ``new``."""
        if self.results_path.is_file():
            return "snapshots" if self.pending_snapshots() else "done"
        if not self.method.fit or self.fit_done_path.is_file():
            return "evaluate"
        return "resume" if self.last_checkpoint.is_file() else "new"


@dataclass(frozen=True)
class Plan:
    """How every run of a comparison is invoked.

    Attributes:
        config: The base config (``--config``) of every run.
        output: The comparison's folder ``DIR``.
        common: Arguments after ``--`` on the ``egrsd compare`` line: they follow the base config in
            every ``fit`` and ``validate`` (a method's own overrides come after them and win).
        python: The interpreter of the subprocesses.
        snapshots: Also evaluate every step checkpoint of each trained run (``--snapshots``).
    """

    config: str
    output: Path
    common: list[str] = field(default_factory=list)
    python: str = sys.executable
    snapshots: bool = False

    def runs(self, methods: Sequence[Method], seeds: Sequence[int]) -> list[Run]:
        """Every (method, seed), seed-major: a comparison stopped part-way has every method's first seeds."""
        return [
            Run(m, s, self.output / "runs" / m.name / f"seed_{s}", snapshots=self.snapshots)
            for s in seeds
            for m in methods
        ]

    def _location(self, run: Run, *, sub_dir: str | None = None) -> list[str]:
        logger = [
            "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.init_args.save_dir", str(self.output / "runs"),
            "--trainer.logger.init_args.name", run.method.name,
            "--trainer.logger.init_args.version", f"seed_{run.seed}",
        ]  # fmt: skip
        if sub_dir is not None:
            logger += ["--trainer.logger.init_args.sub_dir", sub_dir]
        seeds = ["--seed_everything", str(run.seed), "--evaluation.seed", str(run.seed)]
        return [*seeds, *logger]

    def base_args(self) -> list[str]:
        """``--config BASE`` and the common overrides (what a method's overrides are parsed after)."""
        return ["--config", self.config, *self.common]

    def fit_command(self, run: Run) -> list[str]:
        """``python -m egrsd_pl.cli fit``: base config, fit defaults, common overrides, the method's
        overrides, the seed (training and evaluation sampling), the run's folders, ``--ckpt_path last``."""
        return [
            self.python, "-m", "egrsd_pl.cli", "fit",
            "--config", self.config, *FIT_DEFAULTS, *self.common, *run.method.args(),
            *self._location(run),
            "--checkpoint.dirpath", str(run.directory / "checkpoints"),
            "--ckpt_path", "last",
        ]  # fmt: skip

    def validate_command(self, run: Run, checkpoint_path: Path | None = None) -> list[str]:
        """``python -m egrsd_pl.cli validate`` of ``checkpoint_path`` (default: the run's ``last.ckpt``; the
        base model when ``fit`` is off), writing ``results.json`` under ``<run>/eval/<checkpoint name>``."""
        path = checkpoint_path if checkpoint_path is not None else run.last_checkpoint
        checkpoint = ["--ckpt_path", str(path)] if run.method.fit else []
        return [
            self.python, "-m", "egrsd_pl.cli", "validate",
            *self.base_args(), *run.method.args(),
            *self._location(run, sub_dir="validate"),
            "--evaluation.report_dir", str(run.directory / "eval"),
            *checkpoint,
        ]  # fmt: skip

    def pending_commands(self, run: Run) -> list[tuple[str, list[str]]]:
        """The ``(kind, command)`` steps a run still needs as far as known now, ``kind`` in ``fit``,
        ``validate`` and ``snapshot`` (one per step checkpoint; known once ``fit`` and ``validate`` are done,
        since ``fit`` writes the checkpoints and ``validate`` tells which one ``eval/last`` covers)."""
        status = run.status()
        if status == "done":
            return []
        if status == "snapshots":
            return [("snapshot", self.validate_command(run, path)) for path in run.pending_snapshots()]
        steps = [] if status == "evaluate" else [("fit", self.fit_command(run))]
        return [*steps, ("validate", self.validate_command(run))]

    def settings(self, run: Run) -> dict[str, object]:
        """What makes a run's results this run's: base config, common overrides, the method, the seed."""
        method = {"fit": run.method.fit, "overrides": run.method.args()}
        return {"config": self.config, "common": self.common, "method": method, "seed": run.seed}

    def check_settings(self, runs: Sequence[Run]) -> None:
        """Refuses to resume or reuse a run that was started with other settings.

        Raises:
            ValueError: Naming the run, its ``settings.json`` and what differs.
        """
        for run in runs:
            if not run.settings_path.is_file():
                continue
            recorded, current = json.loads(run.settings_path.read_text()), self.settings(run)
            changed = sorted(k for k in current if recorded.get(k) != current[k])
            if changed:
                raise ValueError(
                    f"{run.name}: started with other {', '.join(changed)} ({run.settings_path}: "
                    f"{ {k: recorded.get(k) for k in changed} }, now { {k: current[k] for k in changed} }); "
                    "use another --output or delete that run's folder"
                )

    @staticmethod
    def check_checkpoints(runs: Sequence[Run]) -> None:
        """Refuses to start when the ``last.ckpt`` a pending run would resume from or evaluate is damaged.

        Raises:
            DamagedCheckpointError: One line naming the run, the file, the damage and the newest intact
                checkpoint of its folder.
        """
        for run in runs:
            if run.method.fit and run.status() in {"resume", "evaluate"}:
                refuse_damaged_checkpoint(run.last_checkpoint, flag=f"{run.name}: checkpoint")

    def shell_line(self, run: Run, cwd: Path) -> str:
        """One line for a scheduler: ``cd CWD && <fit> && <validate>`` (only the pending steps; with
        ``--snapshots``, a run's snapshot evaluations are listed once its fit and validate are done)."""
        commands = [shlex.join(command) for _, command in self.pending_commands(run)]
        return " && ".join([f"cd {shlex.quote(str(cwd))}", *commands])


def execute(plan: Plan, runs: Sequence[Run], *, progress: bool = True) -> list[tuple[Run, Path]]:
    """Runs every pending step of ``runs`` one after the other, each subprocess's output in
    ``<run>/<kind>.log``; a progress bar over runs shows the ETA.

    The steps of a run are asked for again after each one (:meth:`Plan.pending_commands`): the snapshots
    to evaluate are known only once ``fit`` and ``validate`` are done. A failed step stops its run (the
    others go on), as does a step that exits cleanly without writing what it should (it would rerun
    forever); a clean ``fit`` writes ``fit.done``.

    Returns:
        ``(run, log)`` of each failed run.
    """
    pending = [run for run in runs if run.status() != "done"]
    failures: list[tuple[Run, Path]] = []
    bar = tqdm(total=len(pending), unit="run", desc="compare", disable=not progress, dynamic_ncols=True)
    try:
        for run in pending:
            run.directory.mkdir(parents=True, exist_ok=True)
            write_json(run.settings_path, plan.settings(run))
            previous: list[str] | None = None
            while steps := plan.pending_commands(run):
                kind, command = steps[0]
                log = run.directory / f"{kind}.log"
                if command == previous:
                    failures.append((run, log))
                    tqdm.write(
                        f"{run.name}: {kind} exited cleanly but wrote no results, see {log}", file=sys.stderr
                    )
                    break
                bar.set_postfix_str(f"{run.name} {kind}")
                tqdm.write(f"{run.name}: {kind} -> {log}", file=sys.stderr)
                if run_logged(command, log) != 0:
                    failures.append((run, log))
                    tqdm.write(f"{run.name}: {kind} FAILED (exit status != 0), see {log}", file=sys.stderr)
                    break
                if kind == "fit":
                    run.fit_done_path.write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
                previous = command
            bar.update(1)
    finally:
        bar.close()
    return failures


def run_logged(command: Sequence[str], log: Path) -> int:
    """Runs ``command`` with stdout and stderr appended to ``log`` (after a header with the command; a
    footer with its wall and CPU time: on a shared machine the CPU time is what the run would take on idle
    cores, up to its parallelism); returns its exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"\n$ {shlex.join(command)}\n# started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        started, cpu = time.monotonic(), _children_cpu_s()
        status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
        wall, cpu = time.monotonic() - started, _children_cpu_s() - cpu
        handle.write(f"# exit status {status} after {wall:.1f} s ({cpu:.1f} s of CPU)\n")
    return status


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children (their own children included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime

"""Checkpoints that resume exactly, with a plain PEFT adapter beside each one, and that survive SIGTERM and Ctrl-C."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import threading
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

ADAPTER_SUFFIX = "_adapter"


def adapter_dir(checkpoint_path: str | os.PathLike[str]) -> Path:
    """The PEFT folder written beside a checkpoint: ``runs/.../step=25.ckpt`` -> ``runs/.../step=25_adapter``."""
    path = Path(checkpoint_path)
    return path.with_name(path.stem + ADAPTER_SUFFIX)


class AdapterCheckpoint(ModelCheckpoint):
    """Lightning's :class:`ModelCheckpoint` with the run's defaults, a PEFT export and interrupt handling.

    Every ``every_n_train_steps`` optimizer steps (paper: 25), at the final step (``max_steps``) and at
    the end of training it writes ``epoch=E-step=S.ckpt`` and refreshes ``last.ckpt``; nothing is
    ever deleted (``save_top_k=-1``). Saves happen at optimizer-step boundaries, in
    ``on_train_batch_end``, before Lightning closes an epoch. A ``.ckpt`` holds what an
    exact resume needs: the LoRA tensors (student and, with ``ema``/``hard_copy``, teacher), the
    optimizer, the loop counters, every callback's state (reward statistics, teacher schedule),
    the data position and the global RNG states. Beside each ``.ckpt`` (``last.ckpt`` included) the
    student adapter is written in PEFT format, ``<stem>_adapter/adapter_config.json`` and
    ``adapter_model.safetensors`` (the teacher adapter, when there is one, in ``<stem>_adapter/teacher/``),
    which ``PeftModel.from_pretrained`` and vLLM's ``LoRARequest`` load without this package.

    ``--ckpt_path last`` finds the newest ``last*.ckpt`` of the experiment: with the default logger
    every run writes into a new ``<save_dir>/<name>/version_N/checkpoints``, so the search covers
    every version folder of ``<save_dir>/<name>`` (unless ``dirpath`` is given).

    SIGTERM (Lightning's handler records it) and a first Ctrl-C (this callback's handler) let the
    current optimizer step finish; then a checkpoint is written and the run stops (SIGTERM: the
    process exits as Lightning does; Ctrl-C: exit status 1). Under DDP the ranks agree on stopping
    with one all-reduce per step, so all of them stop after the same step. Under gradient accumulation
    a SIGTERM that lands mid-step is held until the step's last micro-batch. A second Ctrl-C aborts
    at once without a checkpoint.

    The CLI always installs this callback (``--checkpoint.*``).

    Args:
        dirpath: Folder of the checkpoints (default: ``<log dir>/checkpoints``).
        filename: Checkpoint name pattern (default ``{epoch}-{step}``).
        every_n_train_steps: Optimizer steps between checkpoints (paper: 25; 0: only the final step,
            the end of training and interrupts).
        save_last: Keep ``last.ckpt`` current (needed by ``--ckpt_path last``).
        save_top_k: Checkpoints to keep; -1 keeps all (with ``monitor`` unset, the most recent ``k``).
        monitor: Metric that ranks checkpoints for ``save_top_k`` (unset: recency).
        mode: ``min`` or ``max`` for ``monitor``.
        train_time_interval: Also save after this much wall time.
        save_adapter: Write the PEFT folder beside each checkpoint.
        save_on_interrupt: Finish the step and checkpoint on SIGTERM / Ctrl-C.
        verbose: Log every save.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        every_n_train_steps: int = 25,
        save_last: bool = True,
        save_top_k: int = -1,
        monitor: str | None = None,
        mode: str = "min",
        train_time_interval: timedelta | None = None,
        save_adapter: bool = True,
        save_on_interrupt: bool = True,
        verbose: bool = False,
    ) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"--checkpoint.every_n_train_steps must be >= 0, got {every_n_train_steps}")
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            verbose=verbose,
            save_last=save_last,
            save_top_k=save_top_k,
            mode=mode,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval,
            save_on_train_epoch_end=False,  # steps, not epochs, are the unit of this trainer
        )
        self.save_adapter = save_adapter
        self.save_on_interrupt = save_on_interrupt
        self._user_dirpath = dirpath
        self._ctrl_c = False
        self._sigterm_deferred = False
        self._previous_sigint: Any = None
        self._step_seen = 0  # optimizer steps done at the last on_train_batch_end
        self._at_step_boundary = True  # whether the last micro-batch ended an optimizer step

    # ---------------------------------------------------------------- saving
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.save_adapter:
            if trainer.is_global_zero:
                export_adapters(trainer.lightning_module, adapter_dir(filepath))
            trainer.strategy.barrier("AdapterCheckpoint.export")

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        folder = adapter_dir(filepath)
        if trainer.is_global_zero and folder.is_dir():
            shutil.rmtree(folder)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Rollouts are seeded per step and the loss draws no random numbers; the global RNG is saved for
        # anything else that does (e.g. LoRA dropout > 0). Only rank 0 writes checkpoints: every rank gets
        # its state back, as every rank had after ``seed_everything``.
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run writes into a new logger version folder, so the bookkeeping of the previous
        # folder (best / last paths) does not carry over; ModelCheckpoint would warn about it every time.
        if state_dict.get("dirpath") != self.dirpath:
            self.best_model_path = state_dict["best_model_path"]
            return
        super().load_state_dict(state_dict)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        found = super()._find_last_checkpoints(trainer)
        if self._user_dirpath is not None or not trainer.loggers:
            return found
        logger = trainer.loggers[0]
        root = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name))
        pattern = re.compile(
            rf"^{re.escape(self.CHECKPOINT_NAME_LAST)}(-v\d+)?{re.escape(self.FILE_EXTENSION)}$"
        )
        for path in Path(root).glob(f"*/checkpoints/*{self.FILE_EXTENSION}"):
            if pattern.match(path.name):
                found.add(os.path.normpath(path))
        return found

    # ------------------------------------------------------------ interrupts
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._ctrl_c = self._sigterm_deferred = False
        self._step_seen, self._at_step_boundary = trainer.global_step, True
        if self.save_on_interrupt and threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        # First Ctrl-C: finish the step, checkpoint, stop. The next one raises KeyboardInterrupt at once.
        self._ctrl_c = True
        self._restore_sigint()
        rank_zero_info(
            "Ctrl-C: finishing this optimizer step, then saving a checkpoint (Ctrl-C again to abort)"
        )

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    @staticmethod
    def is_final_step(global_step: int, max_steps: int) -> bool:
        """Whether optimizer step ``global_step`` is the run's last (``max_steps = -1``: no step limit)."""
        return max_steps > 0 and global_step >= max_steps

    @staticmethod
    def should_stop(ctrl_c: bool, sigterm: bool) -> bool:
        """Whether this rank asks to checkpoint and stop after the current optimizer step."""
        return ctrl_c or sigterm

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.is_final_step(
            trainer.global_step, trainer.max_steps
        ) and not self._should_skip_saving_checkpoint(trainer):
            # Saved here, not in on_train_end: Lightning closes the epoch in between, and a checkpoint written
            # after that would resume in a fresh epoch instead of where the data stopped.
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        # Under gradient accumulation only the micro-batch that stepped the optimizer ends a step: stopping
        # anywhere else would lose the accumulated gradients and the step's pending rewards.
        stepped, self._step_seen = trainer.global_step != self._step_seen, trainer.global_step
        self._at_step_boundary = stepped
        if not self.save_on_interrupt:
            return
        if not stepped:
            self._defer_sigterm(trainer)
            return
        local = self.should_stop(self._ctrl_c, trainer.received_sigterm or self._sigterm_deferred)
        # A collective every step: a signal that reached one rank stops all of them after this same step.
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        self._save_interrupt_checkpoint(trainer)
        if self._ctrl_c:
            raise KeyboardInterrupt  # Lightning: graceful shutdown, exit status 1
        raise SIGTERMException  # Lightning's own way out after SIGTERM

    def _defer_sigterm(self, trainer: L.Trainer) -> None:
        """Mid-accumulation, Lightning would stop right after this micro-batch: take the SIGTERM over and
        act on it at the end of the optimizer step instead."""
        connector = getattr(trainer, "_signal_connector", None)
        if trainer.received_sigterm and connector is not None and hasattr(connector, "received_sigterm"):
            self._sigterm_deferred = True
            connector.received_sigterm = False

    def _save_interrupt_checkpoint(self, trainer: L.Trainer) -> None:
        if self._last_global_step_saved == trainer.global_step:
            return  # the periodic save of this step already ran
        candidates = self._monitor_candidates(trainer)
        if self.save_last:
            self._save_last_checkpoint(trainer, candidates)
        else:
            self._save_checkpoint(trainer, self.format_checkpoint_name(candidates))
        rank_zero_info(
            f"interrupted after optimizer step {trainer.global_step}: saved {self.last_model_path!r}"
        )

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_sigint()
        # Lightning raises SIGTERMException itself after any micro-batch when the signal lands after this
        # callback's check. Save only at an optimizer-step boundary (a complete step), and only in a single
        # process: under DDP the other ranks may be elsewhere and a save is a collective.
        late_sigterm = isinstance(exception, SIGTERMException) and self.save_on_interrupt
        if late_sigterm and self._last_global_step_saved != trainer.global_step:
            if trainer.world_size == 1 and self._at_step_boundary:
                self._save_interrupt_checkpoint(trainer)
            else:
                rank_zero_warn(
                    "SIGTERM stopped the run mid-step (gradient accumulation) or after the ranks' stop check; "
                    f"the newest checkpoint is {self.last_model_path or 'the previous one'!r}"
                )
        super().on_exception(trainer, pl_module, exception)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ModelCheckpoint only saves here when it never saved at all; the steps since the last periodic
        # checkpoint must not be lost when a run ends otherwise than at max_steps (max_epochs, max_time).
        self._restore_sigint()
        if trainer.global_step > 0 and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_sigint()
        super().teardown(trainer, pl_module, stage)


def export_adapters(pl_module: L.LightningModule, folder: Path) -> None:
    """Writes the module's LoRA adapters as a PEFT folder: ``default`` at the root, others in subfolders.

    The folder is written next to its final place and renamed into it, so a run killed mid-write never
    leaves a half-written adapter under the final name.
    """
    policy = getattr(pl_module, "policy", None)
    if policy is None or not hasattr(policy, "save_pretrained"):
        raise RuntimeError(
            "AdapterCheckpoint(save_adapter=True) needs a module whose `policy` is a PEFT model"
        )
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    policy.save_pretrained(str(staging), save_embedding_layers=False)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def rng_states() -> dict[str, Any]:
    """The global RNG states of torch (CPU, CUDA), numpy and Python, as types ``torch.load(weights_only=True)`` accepts."""
    version, state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(state), gauss],
        "numpy": [
            kind,
            torch.from_numpy(cast(np.ndarray, keys).astype(np.int64)),
            int(position),
            int(has_gauss),
            float(cached),
        ],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Sets the states :func:`rng_states` collected (CUDA only where the device count matches)."""
    torch.set_rng_state(states["torch"])
    cuda = states.get("torch.cuda", [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))

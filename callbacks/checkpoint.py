"""Checkpoints that resume exactly, written atomically, with a plain PEFT adapter beside each one."""

from __future__ import annotations

import os
import random
import re
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from egrsd_pl.checkpoint_io import AtomicCheckpointIO

ADAPTER_SUFFIX = "_adapter"


def adapter_dir(checkpoint_path: str | os.PathLike[str]) -> Path:
    """The PEFT folder written beside a checkpoint: ``runs/.../step=25.ckpt`` -> ``runs/.../step=25_adapter``."""
    path = Path(checkpoint_path)
    return path.with_name(path.stem + ADAPTER_SUFFIX)


class AdapterCheckpoint(ModelCheckpoint):
    """Lightning's :class:`ModelCheckpoint` with the run's defaults, atomic files and a PEFT export.

    Every ``every_n_train_steps`` optimizer steps (paper: 25), at the final step (``max_steps``), at the
    end of training and when :class:`callbacks.graceful_stop.GracefulStop` stops the run, it writes
    ``epoch=E-step=S.ckpt`` and refreshes ``last.ckpt``; nothing is ever deleted (``save_top_k=-1``).
    Saves happen at optimizer-step boundaries, in ``on_train_batch_end``, before Lightning closes an
    epoch. A ``.ckpt`` holds what an exact resume needs: the LoRA tensors (student and, with
    ``ema``/``hard_copy``, teacher), the optimizer, the loop counters, every callback's state (reward
    statistics, teacher schedule), the data position and the global RNG states.

    Files go through :class:`egrsd_pl.checkpoint_io.AtomicCheckpointIO`, installed in ``setup`` as the
    strategy's ``checkpoint_io`` (Lightning's public plugin interface): each file is written under a
    temporary name and renamed into place, so a run killed mid-write never leaves a truncated
    ``last.ckpt``, and ``--ckpt_path`` on a damaged file stops with one line naming it and the newest
    intact checkpoint beside it. Beside each ``.ckpt`` (``last.ckpt`` included) the same plugin writes
    the student adapter in PEFT format, ``<stem>_adapter/adapter_config.json`` and
    ``adapter_model.safetensors`` (the teacher adapter, when there is one, in ``<stem>_adapter/teacher/``),
    which ``PeftModel.from_pretrained`` and vLLM's ``LoRARequest`` load without this package.

    ``--ckpt_path last`` finds the newest ``last*.ckpt`` of the experiment: with the default logger
    every run writes into a new ``<save_dir>/<name>/version_N/checkpoints``, so the search covers
    every version folder of ``<save_dir>/<name>`` (unless ``dirpath`` is given).

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
        self._user_dirpath = dirpath

    # ---------------------------------------------------------------- saving
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        current = trainer.strategy.checkpoint_io
        inner = current.inner if isinstance(current, AtomicCheckpointIO) else current
        export = self.save_adapter and trainer.is_global_zero  # the plugin only writes on rank 0
        trainer.strategy.checkpoint_io = AtomicCheckpointIO(
            inner,
            after_save=(lambda path: export_adapters(trainer.lightning_module, adapter_dir(path)))
            if export
            else None,
            after_remove=lambda path: shutil.rmtree(adapter_dir(path), ignore_errors=True),
        )

    def save_now(self, trainer: L.Trainer) -> None:
        """Writes this step's checkpoint and ``last.ckpt`` unless this step is saved already (all ranks)."""
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

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

    @staticmethod
    def is_final_step(global_step: int, max_steps: int) -> bool:
        """Whether optimizer step ``global_step`` is the run's last (``max_steps = -1``: no step limit)."""
        return max_steps > 0 and global_step >= max_steps

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.is_final_step(trainer.global_step, trainer.max_steps):
            # Saved here, not in on_train_end: Lightning closes the epoch in between, and a checkpoint written
            # after that would resume in a fresh epoch instead of where the data stopped.
            self.save_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ModelCheckpoint only saves here when it never saved at all; the steps since the last periodic
        # checkpoint must not be lost when a run ends otherwise than at max_steps (max_epochs, max_time).
        if trainer.global_step > 0:
            self.save_now(trainer)
        super().on_train_end(trainer, pl_module)


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

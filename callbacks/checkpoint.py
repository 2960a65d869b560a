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
from lightning.pytorch.trainer.states import TrainerFn

from egrsd_pl.checkpoint_io import AtomicCheckpointIO

ADAPTER_SUFFIX = "_adapter"


def adapter_dir(checkpoint_path: str | os.PathLike[str]) -> Path:
    """The PEFT folder written beside a checkpoint: ``runs/.../step=25.ckpt`` -> ``runs/.../step=25_adapter``."""
    path = Path(checkpoint_path)
    return path.with_name(path.stem + ADAPTER_SUFFIX)


class AdapterCheckpoint(ModelCheckpoint):
    """Lightning's :class:`ModelCheckpoint` with the run's defaults, atomic files and a PEFT export.

    Every ``every_n_train_steps`` optimizer steps (paper: 25), at the final step (``max_steps``), at the
    end of training and when :class:`egrsd_pl.callbacks.graceful_stop.GracefulStop` stops the run, it writes
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

    ``--ckpt_path last`` resumes from the newest ``last*.ckpt`` of the experiment, every logger version
    folder included (:func:`find_last_checkpoint`, called by the CLI).

    Only public ``ModelCheckpoint`` API is used: the constructor's save policy for the periodic saves,
    its hooks, ``format_checkpoint_name`` and ``Trainer.save_checkpoint`` for the final and interrupted
    steps, and the strategy's ``checkpoint_io`` plugin for atomic files and the adapter export.

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
        self._step_saved: int | None = None  # the optimizer step of the newest save (see on_save_checkpoint)

    # ---------------------------------------------------------------- saving
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        current = trainer.strategy.checkpoint_io
        inner = current.inner if isinstance(current, AtomicCheckpointIO) else current
        export = self.save_adapter and trainer.is_global_zero  # the plugin only writes on rank 0
        trainer.strategy.checkpoint_io = AtomicCheckpointIO(
            inner,
            after_save=(
                lambda path, checkpoint: export_adapters(
                    trainer.lightning_module, adapter_dir(path), checkpoint["state_dict"]
                )
            )
            if export
            else None,
            after_remove=lambda path: shutil.rmtree(adapter_dir(path), ignore_errors=True),
        )

    def save_now(self, trainer: L.Trainer) -> None:
        """Writes this step's checkpoint and ``last.ckpt`` unless this step is saved already (all ranks).

        Through public API only: ``format_checkpoint_name`` names the files as the periodic saves name
        them and ``Trainer.save_checkpoint`` writes them (through the atomic plugin). These files are kept
        whatever ``save_top_k`` says: the final step and an interrupted step are never ranked away.
        """
        if (
            trainer.sanity_checking
            or getattr(trainer, "fast_dev_run", False)  # set by Trainer.__init__, not declared on the class
            or trainer.state.fn != TrainerFn.FITTING
            or self._step_saved == trainer.global_step
        ):
            return
        metrics = {
            **trainer.callback_metrics,
            "epoch": torch.tensor(trainer.current_epoch),
            "step": torch.tensor(trainer.global_step),
        }
        trainer.save_checkpoint(self.format_checkpoint_name(metrics))
        if self.save_last:
            self.last_model_path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)
            trainer.save_checkpoint(self.last_model_path)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Rollouts are seeded per step and the loss draws no random numbers; the global RNG is saved for
        # anything else that does (e.g. LoRA dropout > 0). Only rank 0 writes checkpoints: every rank gets
        # its state back, as every rank had after ``seed_everything``.
        checkpoint["rng_states"] = rng_states()
        self._step_saved = trainer.global_step  # every save of this step, periodic ones included

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
        # ModelCheckpoint's own on_train_end is not called: it would rewrite last.ckpt after the epoch closed.
        if trainer.global_step > 0:
            self.save_now(trainer)


def find_last_checkpoint(trainer: L.Trainer) -> Path | None:
    """What ``--ckpt_path last`` resumes from: the newest ``last*.ckpt`` of the experiment, or ``None``.

    The CLI resolves ``last`` with this before ``fit`` starts (Lightning's own lookup only sees the new run's
    folder). A checkpoint callback with an explicit ``dirpath`` is searched as given; otherwise, with a
    logger, every version folder ``<save_dir>/<name>/*/checkpoints`` is, since each run logs into a new one.
    """
    folders = [
        Path(callback.dirpath)
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and callback.dirpath
    ]
    if not folders and trainer.loggers:
        logger = trainer.loggers[0]
        folders = list(
            (Path(logger.save_dir or trainer.default_root_dir) / str(logger.name)).glob("*/checkpoints")
        )
    if not folders:
        folders = [Path(trainer.default_root_dir) / "checkpoints"]
    name = re.compile(
        rf"^{ModelCheckpoint.CHECKPOINT_NAME_LAST}(-v\d+)?{re.escape(ModelCheckpoint.FILE_EXTENSION)}$"
    )
    found = [
        path for folder in folders if folder.is_dir() for path in folder.iterdir() if name.match(path.name)
    ]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def export_adapters(
    pl_module: L.LightningModule, folder: Path, state_dict: dict[str, Any] | None = None
) -> None:
    """Writes the module's LoRA adapters as a PEFT folder: ``default`` at the root, others in subfolders.

    Args:
        pl_module: A module whose ``policy`` is a PEFT model.
        folder: The folder to write.
        state_dict: The tensors to write, keyed as in the module's state dict (``policy.``...), e.g. the
            checkpoint's ``state_dict``: full tensors also under FSDP2, where the policy's own are shards.
            ``None``: the policy's own tensors.

    The folder is written next to its final place and renamed into it, so a run killed mid-write never
    leaves a half-written adapter under the final name.
    """
    policy = getattr(pl_module, "policy", None)
    if policy is None or not hasattr(policy, "save_pretrained"):
        raise RuntimeError(
            "AdapterCheckpoint(save_adapter=True) needs a module whose `policy` is a PEFT model"
        )
    prefix = "policy."
    policy_state = (
        None
        if state_dict is None
        else {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    )
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    policy.save_pretrained(str(staging), save_embedding_layers=False, state_dict=policy_state)
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

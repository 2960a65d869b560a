"""SIGTERM and Ctrl-C finish the current optimizer step, save a checkpoint and stop the run."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from egrsd_pl.callbacks.checkpoint import AdapterCheckpoint

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop(L.Callback):
    """Turns SIGTERM (a scheduler's pre-emption) and a first Ctrl-C into a clean stop after the current step.

    From ``on_train_start`` to the end of training this callback owns the handlers of SIGTERM and SIGINT
    (the previous handlers, Lightning's included, come back afterwards). A signal only sets a flag; at
    the end of each optimizer step the ranks agree with one all-reduce whether any of them got one, so
    all of them stop after the same step. Under gradient accumulation a signal that lands mid-step waits
    for the step's last micro-batch: stopping earlier would lose the accumulated gradients and the
    step's pending rewards. Then every :class:`~egrsd_pl.callbacks.checkpoint.AdapterCheckpoint` writes its
    checkpoint and ``last.ckpt``, and the run ends as Lightning ends one: SIGTERM through
    ``SIGTERMException`` (exit status 0), Ctrl-C through ``KeyboardInterrupt`` (exit status 1). A second
    Ctrl-C aborts at once, without a checkpoint. The CLI always installs this callback.
    """

    def __init__(self) -> None:
        self.received: int | None = None  # the first stop signal received, if any
        self._previous: dict[int, Any] = {}
        self._step_seen = 0  # optimizer steps done at the last on_train_batch_end

    @staticmethod
    def at_step_boundary(global_step: int, step_seen: int) -> bool:
        """Whether the micro-batch that just ended stepped the optimizer (the step counter moved)."""
        return global_step != step_seen

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self._step_seen = None, trainer.global_step
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        self.received = self.received or signum
        name = signal.Signals(signum).name
        rank_zero_info(
            f"{name}: finishing this optimizer step, then saving a checkpoint (Ctrl-C again to abort)"
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = self.at_step_boundary(trainer.global_step, self._step_seen)
        self._step_seen = trainer.global_step
        if not stepped:
            return
        # A collective every step: a signal that reached one rank stops all of them after this same step.
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        for checkpoint in trainer.checkpoint_callbacks:
            if isinstance(checkpoint, AdapterCheckpoint):
                checkpoint.save_now(trainer)
                rank_zero_info(
                    f"stopped after optimizer step {trainer.global_step}: saved {checkpoint.last_model_path!r}"
                )
        self._restore_handlers()
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Lightning: graceful shutdown, exit status 1
        raise SIGTERMException  # Lightning's own way out after SIGTERM (also when another rank got it)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

"""A training progress bar counted in optimizer steps out of ``max_steps``, with an ETA."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """``train: 20%|██  | 12/60 [00:31<02:05, 2.60s/step, loss=..., reward=..., acc=...]``.

    Lightning's bar counts batches of an epoch; the rollout DataModule's epoch has no length, so it
    showed ``Epoch 0/-2`` and no ETA. This one counts ``trainer.global_step`` against
    ``trainer.max_steps`` (no total, hence no ETA, when ``max_steps`` is -1), starts from the resumed
    step after ``--ckpt_path``, and drops the logger's version number from the metrics.

    Args:
        refresh_rate: Redraw every this many batches (as Lightning's ``TQDMProgressBar``).
    """

    # Lightning's format with ``rate_fmt``: "2.6s/step" when a step takes more than a second, not "0.38step/s".
    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)

    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        bar.set_description("train", refresh=False)
        bar.unit = "step"
        return bar

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        # Not Lightning's: it resets the bar to the epoch's batches and names it "Epoch N".
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step  # after --ckpt_path the ETA counts only this run's steps

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable or trainer.global_step == bar.n:
            return  # gradient accumulation: the step has not advanced
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.update(trainer.global_step - bar.n)  # redraws once, with this step's metrics

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

"""Drives the running reward statistics ``r̄, σ_r`` of docs/algorithm.md#step-3-advantage and #step-13-update-the-reward-statistics across ranks."""

from __future__ import annotations

from typing import Any, cast

import lightning as L

from egrsd_pl.module import EGRSDModule
from egrsd_pl.stats import WARMUP_BASELINE, WARMUP_STEPS, RunningRewardStats


class RewardStatistics(L.Callback):
    """Merges each optimizer step's rewards into the Welford statistics that turn rewards into advantages.

    The statistics (:class:`~egrsd_pl.stats.RunningRewardStats`) are one object: this callback creates
    it from its flags and hands it to the module in ``setup`` (``pl_module.reward_statistics``); the
    module reads the advantages of a step from it (earlier steps only) and queues the step's rewards
    in it. Once the optimizer step is done, this callback merges the queued rewards of every
    micro-batch and every rank, exactly once per optimizer step: each rank's ``(count, mean, M2)`` is
    all-gathered and merged in rank order (Chan et al.), so every rank ends up with bit-identical
    statistics. They are saved in every checkpoint (``callbacks["RewardStatistics"]``) and restored on
    resume. The CLI always installs this callback (``--reward_stats.*``); the module refuses to train
    without it.

    Args:
        warmup_steps: Optimizer steps that use the fixed baseline (paper: 10).
        warmup_baseline: That baseline (paper: 0.5).
    """

    def __init__(self, warmup_steps: int = WARMUP_STEPS, warmup_baseline: float = WARMUP_BASELINE) -> None:
        if warmup_steps < 0:
            raise ValueError(f"--reward_stats.warmup_steps must be >= 0, got {warmup_steps}")
        self.stats = RunningRewardStats(warmup_steps=warmup_steps, warmup_baseline=warmup_baseline)
        self._last_updated_step = -1

    @staticmethod
    def should_update(global_step: int, last_updated_step: int) -> bool:
        """True once per optimizer step: when the step counter moved past the last update."""
        return global_step > last_updated_step and global_step > 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        cast(EGRSDModule, pl_module).reward_statistics = self.stats

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # Every rank records the same number of micro-batches (same objective, same step count), so
        # either all ranks reach the collective below or none does.
        if not self.should_update(step, self._last_updated_step) or not self.stats.pending:
            return
        local = self.stats.pending_moments().to(pl_module.device)  # [3] (count, mean, M2)
        self.stats.commit_step(trainer.strategy.all_gather(local).cpu())  # [W, 3] in rank order
        self._last_updated_step = step
        if self.stats.count:
            pl_module.log_dict(
                {"reward_stats/mean": self.stats.mean, "reward_stats/std": self.stats.std}, batch_size=1
            )

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict(), "last_updated_step": self._last_updated_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stats.load_state_dict(state_dict["stats"])
        self._last_updated_step = int(state_dict["last_updated_step"])

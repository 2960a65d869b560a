"""The running reward statistics ``r̄, σ_r`` of SPEC.md steps 3 and 13, merged across ranks."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from egrsd_pl.stats import WARMUP_BASELINE, WARMUP_STEPS, RunningRewardStats, welford_moments


class RewardStatistics(L.Callback):
    """Owns the Welford statistics that turn rewards into advantages.

    The module reads :attr:`stats` to compute this step's advantages (earlier steps only) and hands
    the step's rewards to :meth:`record`; once the optimizer step is done, the rewards of every
    micro-batch and every rank are merged into the statistics, exactly once per optimizer step:
    each rank's ``(count, mean, M2)`` is all-gathered and merged in rank order (Chan et al.), so
    every rank ends up with bit-identical statistics. They are saved in every checkpoint and
    restored on resume. The CLI always installs this callback (``--reward_stats.*``); the module
    refuses to train without it.

    Args:
        warmup_steps: Optimizer steps that use the fixed baseline (paper: 10).
        warmup_baseline: That baseline (paper: 0.5).
    """

    def __init__(self, warmup_steps: int = WARMUP_STEPS, warmup_baseline: float = WARMUP_BASELINE) -> None:
        if warmup_steps < 0:
            raise ValueError(f"--reward_stats.warmup_steps must be >= 0, got {warmup_steps}")
        self.stats = RunningRewardStats(warmup_steps=warmup_steps, warmup_baseline=warmup_baseline)
        self._pending: list[Tensor] = []
        self._last_updated_step = -1

    def record(self, rewards: Tensor) -> None:
        """Queues one micro-batch's ``[N]`` rewards for the update after the optimizer step."""
        self._pending.append(rewards.detach().float().cpu())

    @staticmethod
    def should_update(global_step: int, last_updated_step: int) -> bool:
        """True once per optimizer step: when the step counter moved past the last update."""
        return global_step > last_updated_step and global_step > 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # Every rank records the same number of micro-batches (same objective, same step count), so
        # either all ranks reach the collective below or none does.
        if not self.should_update(step, self._last_updated_step) or not self._pending:
            return
        local = welford_moments(torch.cat(self._pending)).to(pl_module.device)  # [3] (count, mean, M2)
        gathered = trainer.strategy.all_gather(local).reshape(-1, 3).cpu()  # [W, 3], in rank order
        for count, mean, m2 in gathered.tolist():
            self.stats.merge_moments(int(round(count)), mean, m2)
        self.stats.steps += 1
        self._pending.clear()
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

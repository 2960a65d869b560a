"""Running reward statistics (Welford) and the outcome advantage of docs/algorithm.md#step-3-advantage."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

WARMUP_STEPS = 10
WARMUP_BASELINE = 0.5


class RunningRewardStats:
    """Mean and variance of every reward seen so far (Welford / Chan et al. parallel merge).

    The advantage of a step uses only rewards of *earlier* steps: :meth:`advantages` reads the
    statistics, :meth:`record` queues the step's rewards, and :meth:`commit_step` merges them once the
    optimizer step is done (``callbacks.RewardStatistics`` calls it, after an all-gather across ranks).

    Args:
        warmup_steps: Optimizer steps during which ``A_i = r_i - warmup_baseline`` (paper: 10).
        warmup_baseline: Baseline of the warm-up phase (paper: 0.5).
    """

    def __init__(self, warmup_steps: int = WARMUP_STEPS, warmup_baseline: float = WARMUP_BASELINE) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.warmup_baseline = warmup_baseline
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.steps = 0
        self.pending: list[Tensor] = []  # [N] float64 rewards of the current optimizer step

    @property
    def std(self) -> float:
        """Population standard deviation of the rewards seen; NaN before any reward."""
        return math.sqrt(self.m2 / self.count) if self.count > 0 else math.nan

    def record(self, rewards: Tensor) -> None:
        """Queues one micro-batch's ``[N]`` rewards; they enter the statistics at :meth:`commit_step`."""
        self.pending.append(rewards.detach().double().flatten().cpu())

    def pending_moments(self) -> Tensor:
        """``[3]`` float64 ``(count, mean, M2)`` of the rewards queued since the last :meth:`commit_step`."""
        if not self.pending:
            return torch.zeros(3, dtype=torch.float64)
        return welford_moments(torch.cat(self.pending))

    def commit_step(self, gathered: Tensor | None = None) -> None:
        """Step 13: merges one optimizer step's rewards and counts the step.

        Args:
            gathered: ``[W, 3]`` ``(count, mean, M2)`` of every rank's :meth:`pending_moments`, in rank
                order (an all-gather), so that every rank merges the same numbers in the same order and
                ends up with bit-identical statistics; ``None``: this process's own queue.
        """
        moments = self.pending_moments()[None] if gathered is None else gathered.reshape(-1, 3)  # [W, 3]
        for count, mean, m2 in moments.tolist():
            self.merge_moments(int(round(count)), mean, m2)
        self.steps += 1
        self.pending.clear()

    def merge_moments(self, count: int, mean: float, m2: float) -> None:
        """Chan et al. merge of another set's (count, mean, M2) into the running moments."""
        if count <= 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total

    def advantages(self, rewards: Tensor) -> Tensor:
        """Outcome advantage ``A_i`` of docs/algorithm.md#step-3-advantage.

        ``A_i = (r_i - r̄) / σ_r`` from the rewards of earlier steps; ``r_i - 0.5`` during the first
        ``warmup_steps`` optimizer steps, and whenever ``σ_r`` is 0 or undefined (the guard).

        Args:
            rewards: ``[N]`` rewards of the current step.

        Returns:
            ``[N]`` float32 advantages (constants; no gradient).
        """
        rewards = rewards.detach().float()  # [N]
        std = self.std
        if self.steps < self.warmup_steps or not math.isfinite(std) or std == 0.0:
            return rewards - self.warmup_baseline
        return (rewards - self.mean) / std

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
        self.steps = int(state["steps"])


def welford_moments(rewards: Tensor) -> Tensor:
    """``[3]`` float64 tensor ``(count, mean, M2)`` of a reward vector, for an all-gather and :meth:`merge_moments`.

    ``M2`` is the sum of squared deviations from the vector's own mean (0 for an empty vector).
    """
    rewards = rewards.detach().double().flatten()  # [N]
    if rewards.numel() == 0:
        return rewards.new_zeros(3)
    mean = rewards.mean()
    return torch.stack([rewards.new_tensor(rewards.numel()), mean, ((rewards - mean) ** 2).sum()])

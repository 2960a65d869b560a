"""One-step-ahead rollouts (``--data.async_steps 1``): the next batch is sampled while this one trains.

:class:`RolloutPrefetcher` holds at most one request in flight: the rollouts of the next batch, generated in
one background thread by an engine whose policy lives outside the training process
(:attr:`~egrsd_pl.rollout.base.RolloutEngine.generates_apart`: a vLLM server), from the policy synced at the
start of the current step, i.e. one optimizer update older than the policy that will train on them.

Decision (exact resume): the pending rollouts are saved in the checkpoint, not regenerated. They come from
the policy *before* the checkpoint's update, which the checkpoint does not hold; :meth:`state_dict` waits for
them and stores their token ids, log-probs and policy version, and after ``--ckpt_path`` the first step
trains on exactly those (:meth:`take` checks they are for its batch and seed).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from egrsd_pl.rollout.base import Rollout

log = logging.getLogger(__name__)


@dataclass
class PendingRollouts:
    """Rollouts requested ahead: which batch they are for (epoch, 1-based batch of the epoch, problem ids,
    sampler seed) and the rollouts themselves, or the future that brings them."""

    epoch: int
    batch_in_epoch: int
    problem_ids: list[str]
    seed: int
    future: Future[list[Rollout]] | None = None
    rollouts: list[Rollout] | None = None

    def result(self) -> list[Rollout]:
        """The rollouts; waits for the request (and raises its error) if it is still in flight."""
        if self.rollouts is None:
            assert self.future is not None
            self.rollouts, self.future = self.future.result(), None
        return self.rollouts

    def matches(self, epoch: int, batch_in_epoch: int, problem_ids: Sequence[str], seed: int) -> bool:
        return (self.epoch, self.batch_in_epoch, self.problem_ids, self.seed) == (
            epoch,
            batch_in_epoch,
            list(problem_ids),
            seed,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "problem_ids": list(self.problem_ids),
            "seed": self.seed,
            "rollouts": [dataclasses.asdict(rollout) for rollout in self.result()],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PendingRollouts:
        rollouts = [
            Rollout(
                prompt_index=int(r["prompt_index"]),
                completion_ids=tuple(int(t) for t in r["completion_ids"]),
                text=str(r["text"]),
                truncated=bool(r["truncated"]),
                logprobs=None if r["logprobs"] is None else tuple(float(v) for v in r["logprobs"]),
                policy_version=None if r["policy_version"] is None else int(r["policy_version"]),
            )
            for r in state["rollouts"]
        ]
        return cls(
            epoch=int(state["epoch"]),
            batch_in_epoch=int(state["batch_in_epoch"]),
            problem_ids=[str(i) for i in state["problem_ids"]],
            seed=int(state["seed"]),
            rollouts=rollouts,
        )


class RolloutPrefetcher:
    """At most one rollout request in flight, in one background thread; survives a resume (module docstring)."""

    def __init__(self) -> None:
        self.pending: PendingRollouts | None = None
        self._executor: ThreadPoolExecutor | None = None

    def submit(
        self,
        generate: Callable[[], list[Rollout]],
        *,
        epoch: int,
        batch_in_epoch: int,
        problem_ids: Sequence[str],
        seed: int,
    ) -> None:
        """Starts ``generate()`` (the next batch's rollouts) in the background thread."""
        if self.pending is not None:
            raise RuntimeError("a rollout request is already in flight: take() it before submitting the next")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")
        self.pending = PendingRollouts(
            epoch, batch_in_epoch, list(problem_ids), seed, future=self._executor.submit(generate)
        )

    def take(
        self, *, epoch: int, batch_in_epoch: int, problem_ids: Sequence[str], seed: int
    ) -> list[Rollout] | None:
        """The pending rollouts, which must be for this batch (waits for them); ``None`` when none is pending
        (the run's first step, or its first after a resume without a checkpointed request).

        Raises:
            RuntimeError: The pending rollouts are for another batch (a checkpoint of a run with another
                problem order or seed).
        """
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        if not pending.matches(epoch, batch_in_epoch, problem_ids, seed):
            raise RuntimeError(
                f"the rollouts requested one step ahead are for epoch {pending.epoch} batch {pending.batch_in_epoch} "
                f"(seed {pending.seed}), not this step's epoch {epoch} batch {batch_in_epoch} (seed {seed}): the "
                "checkpoint comes from a run with another --data.seed, data or --data.batch_size"
            )
        return pending.result()

    def state_dict(self) -> dict[str, Any] | None:
        """The pending request with its rollouts (waits for them), or ``None``."""
        return None if self.pending is None else self.pending.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.pending = None if state is None else PendingRollouts.from_state_dict(state)

    def close(self) -> None:
        """Waits for a request still in flight (its rollouts, or its error, are dropped) and stops the thread."""
        pending, self.pending = self.pending, None
        if pending is not None and pending.future is not None:
            try:
                pending.future.result()
            except Exception as error:  # the run is over; the error was not the step's
                log.warning("the rollouts requested ahead were not used and failed: %s", error)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

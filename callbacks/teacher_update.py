"""The teacher update schedule of SPEC.md ("Teacher update schedules", the paper's Table 7 ablation)."""

from __future__ import annotations

from typing import Any, get_args

import lightning as L

from egrsd_pl.module import TeacherSchedule


class TeacherUpdate(L.Callback):
    """Moves the teacher adapter toward the student after optimizer steps.

    - ``frozen`` (default): the teacher is the base model with the adapter disabled; nothing to
      update and no extra memory.
    - ``ema``: after every optimizer step ``p_T ← α·p_T + (1 − α)·p_S`` on the LoRA tensors of a
      second adapter (``teacher``), ``α = ema_alpha``.
    - ``hard_copy``: every ``every_k_steps`` optimizer steps the teacher adapter becomes a copy of
      the student's (``α = 0``).

    The update runs in ``on_train_batch_end`` once the optimizer step is done: under gradient
    accumulation that hook fires once per micro-batch, so the callback remembers the last step it
    acted on and never fires twice for one optimizer step. Under DDP every rank holds the same
    student after the step, so each rank updates its own teacher identically, without communication.

    The teacher adapter's tensors belong to the module (they are saved with the student's LoRA
    tensors in every checkpoint); this callback owns the schedule and its position, checks on resume
    that the checkpoint was written under the same schedule, and is always installed by the CLI
    (``--teacher.*``, with ``--teacher.schedule`` linked to ``--model.teacher``).

    Args:
        schedule: ``frozen``, ``ema`` or ``hard_copy``.
        ema_alpha: ``α`` of the ``ema`` schedule, in ``[0, 1)`` (paper: 0.99).
        every_k_steps: ``K`` of the ``hard_copy`` schedule (paper: 20 or 50).
    """

    def __init__(
        self, schedule: TeacherSchedule = "frozen", ema_alpha: float = 0.99, every_k_steps: int = 20
    ) -> None:
        if schedule not in get_args(TeacherSchedule):
            raise ValueError(
                f"--teacher.schedule must be one of {get_args(TeacherSchedule)}, got {schedule!r}"
            )
        if not 0.0 <= ema_alpha < 1.0:
            raise ValueError(f"--teacher.ema_alpha must be in [0, 1), got {ema_alpha}")
        if every_k_steps < 1:
            raise ValueError(f"--teacher.every_k_steps must be >= 1, got {every_k_steps}")
        self.schedule = schedule
        self.ema_alpha = ema_alpha
        self.every_k_steps = every_k_steps
        self.num_updates = 0
        self._last_updated_step = 0  # optimizer steps are counted from 1: step 0 never updates

    @property
    def alpha(self) -> float:
        """Weight of the old teacher in ``p_T ← α·p_T + (1 − α)·p_S`` (0 for a hard copy)."""
        return self.ema_alpha if self.schedule == "ema" else 0.0

    def should_update(self, step: int) -> bool:
        """Whether the teacher moves after optimizer step ``step`` (the number of steps done, from 1).

        ``frozen``: never; ``ema``: after every step; ``hard_copy``: after steps ``K, 2K, 3K, ...``.
        """
        if step < 1 or self.schedule == "frozen":
            return False
        if self.schedule == "ema":
            return True
        return step % self.every_k_steps == 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        module_schedule = getattr(pl_module.hparams, "teacher", None)
        if stage == "fit" and module_schedule != self.schedule:
            raise ValueError(
                f"--teacher.schedule {self.schedule!r} disagrees with --model.teacher {module_schedule!r}: the "
                "module creates the teacher adapter, this callback updates it (the CLI links the two flags)"
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_updated_step or not self.should_update(step):
            return  # a micro-batch that did not step the optimizer, or not a step of the schedule
        pl_module.update_teacher(alpha=self.alpha)  # type: ignore[operator]
        self._last_updated_step = step
        self.num_updates += 1
        pl_module.log("teacher/num_updates", float(self.num_updates), batch_size=1)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The module loads non-strictly (the base weights are not in checkpoints), so a missing teacher
        # adapter would pass silently and the teacher would restart from the base: refuse instead.
        has_teacher = any(".teacher." in key and "lora_" in key for key in checkpoint.get("state_dict", {}))
        if self.schedule != "frozen" and not has_teacher:
            raise ValueError(
                f"--teacher.schedule {self.schedule!r}: the checkpoint holds no teacher adapter (was it written "
                "with --teacher.schedule frozen?); resuming would silently restart the teacher from the base"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "num_updates": self.num_updates,
            "last_updated_step": self._last_updated_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["schedule"] != self.schedule:
            raise ValueError(
                f"the checkpoint was trained with --teacher.schedule {state_dict['schedule']!r}, not "
                f"{self.schedule!r}: a teacher schedule cannot change on resume"
            )
        self.num_updates = int(state_dict["num_updates"])
        self._last_updated_step = int(state_dict["last_updated_step"])

"""Drives the teacher schedule (docs/algorithm.md#teacher-update-schedules, the paper's Table 7 ablation)."""

from __future__ import annotations

from typing import Any, cast, get_args

import lightning as L

from egrsd_pl.module import EGRSDModule
from egrsd_pl.teacher import Teacher, TeacherSchedule, update_due


class TeacherUpdate(L.Callback):
    """Moves the module's :class:`~egrsd_pl.teacher.Teacher` toward the student after optimizer steps.

    - ``frozen`` (default): the teacher is the base model with the adapter disabled; nothing to
      update and no extra memory.
    - ``ema``: after every optimizer step ``p_T ← α·p_T + (1 − α)·p_S`` on the LoRA tensors of a
      second adapter (``teacher``), ``α = ema_alpha``.
    - ``hard_copy``: every ``every_k_steps`` optimizer steps the teacher adapter becomes a copy of
      the student's (``α = 0``).

    The teacher (adapter tensors and the schedule's position) belongs to ``pl_module.teacher``; this
    callback holds the schedule's knobs and drives it, as Lightning's ``WeightAveraging`` drives its
    average. The update runs in ``on_train_batch_end`` once the optimizer step is done: under gradient
    accumulation that hook fires once per micro-batch, so the teacher's last updated step guards
    against firing twice for one optimizer step. Under DDP every rank holds the same student after the
    step, so each rank updates its own teacher identically, without communication. The schedule's
    position is saved in every checkpoint (``callbacks["TeacherUpdate"]``), and a resume refuses a
    checkpoint written under another schedule. The CLI always installs this callback (``--teacher.*``,
    with ``--teacher.schedule`` linked to ``--model.teacher``).

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
        self.teacher: Teacher | None = None  # the module's, bound in setup

    @property
    def alpha(self) -> float:
        """Weight of the old teacher in ``p_T ← α·p_T + (1 − α)·p_S`` (0 for a hard copy)."""
        return self.ema_alpha if self.schedule == "ema" else 0.0

    def should_update(self, step: int) -> bool:
        """Whether the teacher moves after optimizer step ``step`` (see :func:`egrsd_pl.teacher.update_due`)."""
        return update_due(self.schedule, step, self.every_k_steps)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        teacher = cast(EGRSDModule, pl_module).teacher
        if stage == "fit" and teacher.schedule != self.schedule:
            raise ValueError(
                f"--teacher.schedule {self.schedule!r} disagrees with --model.teacher {teacher.schedule!r}: the "
                "module creates the teacher adapter, this callback updates it (the CLI links the two flags)"
            )
        teacher.driver = type(self).__name__
        self.teacher = teacher

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        teacher, step = self._bound(), trainer.global_step
        if step == teacher.last_updated_step or not self.should_update(step):
            return  # a micro-batch that did not step the optimizer, or not a step of the schedule
        teacher.update(alpha=self.alpha, step=step)
        pl_module.log("teacher/num_updates", float(teacher.num_updates), batch_size=1)

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
        return self._bound().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._bound().load_state_dict(state_dict)

    def _bound(self) -> Teacher:
        if self.teacher is None:
            raise RuntimeError(
                "TeacherUpdate is not set up: it drives the module's teacher, bound in setup()"
            )
        return self.teacher

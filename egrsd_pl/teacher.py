"""The teacher of self-distillation: the student's own backbone, under one of three schedules (docs/algorithm.md#teacher-update-schedules).

- ``frozen`` (the paper's default): the base model with the LoRA adapter disabled; no extra memory.
- ``ema``: a second adapter ``teacher``, moved after every optimizer step by
  ``p_T ← α·p_T + (1 − α)·p_S`` on its LoRA tensors.
- ``hard_copy``: the same second adapter becomes a copy of the student's every ``K`` optimizer steps.

:class:`Teacher` owns the adapter and its position in the schedule (updates done, last step updated),
so the state that must survive a resume sits in one object. ``callbacks.TeacherUpdate`` drives it
after optimizer steps, as Lightning's ``WeightAveraging`` drives its average; the module only runs
the backbone under :meth:`Teacher.weights`.

Decision (docs/algorithm.md#teacher-update-schedules): ``ema`` averages the LoRA factors ``A`` and ``B``
separately. ``EMA(B)·EMA(A)`` is not ``EMA(BA)``: one update differs from it by
``−α(1 − α)(B_T − B_S)(A_T − A_S)``, small while teacher and student stay close. In exchange the teacher
stays a rank-``r`` LoRA adapter on the shared backbone (no second copy of the weights, exported and
loaded like the student's), whereas an exact average of ``BA`` would need a full-rank delta per layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor

TeacherSchedule = Literal["frozen", "ema", "hard_copy"]
STUDENT_ADAPTER = "default"
TEACHER_ADAPTER = "teacher"


def lora_parameters(policy: Any, adapter: str = STUDENT_ADAPTER) -> dict[str, Tensor]:
    """The LoRA tensors of one adapter of a PEFT model, keyed by name with the adapter name removed."""
    suffix = f".{adapter}.weight"
    return {
        name[: -len(suffix)]: param
        for name, param in policy.named_parameters()
        if "lora_" in name and name.endswith(suffix)
    }


def update_due(schedule: TeacherSchedule, step: int, every_k_steps: int) -> bool:
    """Whether the teacher moves after optimizer step ``step`` (the number of steps done, from 1).

    ``frozen``: never; ``ema``: after every step; ``hard_copy``: after steps ``K, 2K, 3K, ...``.
    """
    if step < 1 or schedule == "frozen":
        return False
    if schedule == "ema":
        return True
    return step % every_k_steps == 0


class Teacher:
    """The teacher weights on the student's backbone, and where the schedule stands.

    Args:
        schedule: ``frozen``, ``ema`` or ``hard_copy``.
    """

    def __init__(self, schedule: TeacherSchedule = "frozen") -> None:
        self.schedule = schedule
        self.policy: Any = None
        self.num_updates = 0
        self.last_updated_step = 0  # optimizer steps are counted from 1: step 0 never updates
        self.driver: str | None = None  # the name of what moves the adapter (callbacks.TeacherUpdate)

    @property
    def has_adapter(self) -> bool:
        """Whether the teacher is a second adapter (``ema``, ``hard_copy``) rather than the bare base."""
        return self.schedule != "frozen"

    def attach(self, policy: Any, lora_config: Any) -> None:
        """Binds the teacher to the PEFT ``policy``; adds the ``teacher`` adapter as a copy of the student."""
        self.policy = policy
        if not self.has_adapter:
            return
        policy.add_adapter(TEACHER_ADAPTER, lora_config)
        self.blend(alpha=0.0)  # the teacher starts as the student (= the base, LoRA B = 0)
        policy.set_adapter(STUDENT_ADAPTER)

    @contextlib.contextmanager
    def weights(self) -> Iterator[None]:
        """Runs the backbone as the teacher: adapter disabled (``frozen``) or the teacher adapter."""
        if not self.has_adapter:
            with self.policy.disable_adapter():
                yield
            return
        self.policy.set_adapter(TEACHER_ADAPTER)
        try:
            yield
        finally:
            self.policy.set_adapter(STUDENT_ADAPTER)  # also makes the student adapter trainable again

    def update(self, alpha: float, step: int) -> None:
        """Moves the teacher after optimizer step ``step`` and records where the schedule stands."""
        self.blend(alpha)
        self.num_updates += 1
        self.last_updated_step = step

    @torch.no_grad()
    def blend(self, alpha: float) -> None:
        """``teacher ← α·teacher + (1-α)·student`` on the adapter tensors (``α = 0``: hard copy)."""
        teacher = lora_parameters(self.policy, TEACHER_ADAPTER)
        if not teacher:
            raise RuntimeError(
                "the teacher update needs --teacher.schedule ema or hard_copy (no teacher adapter)"
            )
        for key, student_param in lora_parameters(self.policy, STUDENT_ADAPTER).items():
            teacher[key].mul_(alpha).add_(student_param.detach(), alpha=1.0 - alpha)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position (the adapter tensors travel in the module's state dict)."""
        return {
            "schedule": self.schedule,
            "num_updates": self.num_updates,
            "last_updated_step": self.last_updated_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["schedule"] != self.schedule:
            raise ValueError(
                f"the checkpoint was trained with --teacher.schedule {state['schedule']!r}, not "
                f"{self.schedule!r}: a teacher schedule cannot change on resume"
            )
        self.num_updates = int(state["num_updates"])
        self.last_updated_step = int(state["last_updated_step"])

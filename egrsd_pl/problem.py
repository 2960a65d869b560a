"""The unit of training and evaluation data: one math problem with its reference solution and gold answer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One problem.

    Attributes:
        id: Stable identifier (row id of the source, or a generated one).
        problem: The problem statement ``x`` shown to the student.
        solution: The reference solution ``s*`` shown to the privileged teacher (may be empty for
            evaluation-only benchmarks).
        answer: The gold final answer, compared with the last ``\\boxed{}`` of a completion.
    """

    id: str
    problem: str
    solution: str
    answer: str

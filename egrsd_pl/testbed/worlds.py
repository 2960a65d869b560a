"""The testbed worlds: which problems, chains and model size a build uses (``testbed:<world>``).

One builder (:mod:`.build`, :mod:`.warmstart`) serves every world; a world only says what differs:

- ``tiny`` (:mod:`.synthetic`): the shipped testbed. Its teacher copies the reference solution.
- ``mechanism`` (:mod:`.mechanism`): chains with free choices the reference does not decide (order of
  independent products, interchangeable phrasings), so its privileged teacher is concise *and* uncertain
  at pivots and forks (docs/testbed.md, "The mechanism world").
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, cast, get_args

from egrsd_pl.problem import Problem
from egrsd_pl.testbed.mechanism import mechanism_problems
from egrsd_pl.testbed.synthetic import Split, worked_problems

WorldName = Literal["tiny", "mechanism"]
WORLD_NAMES: tuple[WorldName, ...] = get_args(WorldName)


class WorkedLike(Protocol):
    """What the builder needs of a problem: its texts and warm-start targets."""

    @property
    def id(self) -> str: ...

    @property
    def text(self) -> str: ...

    @property
    def solution(self) -> str: ...

    @property
    def problem(self) -> Problem: ...

    def completion(self, rng: random.Random, *, verbose: bool, teacher: bool = False) -> str: ...

    def tokenizer_texts(self, rng: random.Random) -> list[str]: ...


@dataclass(frozen=True)
class World:
    """One testbed world.

    Attributes:
        name: ``testbed:<name>``.
        version: Bump when this world's corpus, tokenizer, model or recipe changes: it keys the cache.
        default_budget_s: Nominal warm-start seconds of ``testbed:<name>`` (``round(budget_s / 0.09)`` steps).
        hidden_size: Width of the tiny Qwen3.
        num_layers: Its decoder layers.
        problems: ``(n, seed=, split=) -> worked problems``, deterministic, splits disjoint.
        student_smoothing: Label smoothing of the student-format warm-start examples (0: none).
        teacher_verbose_share: Share of the teacher-format examples trained towards a verbose chain when the
            build asks for none (:class:`~egrsd_pl.testbed.warmstart.SFTConfig`).
    """

    name: WorldName
    version: int
    default_budget_s: float
    hidden_size: int
    num_layers: int
    problems: Callable[..., Sequence[WorkedLike]]
    student_smoothing: float = 0.0
    teacher_verbose_share: float = 0.0

    def held_out(self, n: int, *, seed: int, split: Split = "test") -> list[Problem]:
        """``n`` problems of ``split`` as :class:`~egrsd_pl.problem.Problem` records."""
        return [worked.problem for worked in self.problems(n, seed=seed, split=split)]


WORLDS: dict[WorldName, World] = {
    "tiny": World("tiny", 4, 210.0, 128, 2, worked_problems),
    "mechanism": World(
        "mechanism", 2, 210.0, 128, 2, mechanism_problems, student_smoothing=0.01, teacher_verbose_share=0.15
    ),
}


def world(name: str) -> World:
    """The world called ``name``; a one-line error names the known ones."""
    if name not in WORLDS:
        raise ValueError(f"unknown testbed world {name!r}; use one of {', '.join(WORLD_NAMES)}")
    return WORLDS[cast(WorldName, name)]

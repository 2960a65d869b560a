"""Synthetic multi-step arithmetic word problems with concise and verbose chains of thought.

Every problem is a short story whose answer needs one to three additions or one-digit
multiplications, e.g.::

    Mia has 23 apples and buys 3 bags with 14 apples in each. How many apples does Mia have now?

Its reference solution ``s*`` (shown to the privileged teacher) is the concise chain plus the
answer sentence::

    Bought: 3 * 14 = 42.
    Total: 23 + 42 = 65.
    Mia has 65 apples now. \\boxed{65}

The warm-start corpus also renders *verbose* chains of the same problem: an opening remark,
re-checks after the steps, a false start corrected now and then, and a closing recap. Everything
is drawn from seeded ``random.Random`` instances, so a ``(seed, split)`` pair always yields the
same problems, and the split of a problem is a function of its text (a hash), so the train,
validation and test splits are disjoint for every seed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from egrsd_pl.problem import Problem

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
# Share of the hash space (out of 20) that belongs to each split: 80 % / 10 % / 10 %.
_SPLIT_BUCKETS: dict[str, range] = {"train": range(0, 16), "validation": range(16, 18), "test": range(18, 20)}

_NAMES = ("Mia", "Leo", "Ana", "Sam", "Zoe", "Max", "Ivy", "Ben", "Eva", "Tom", "Lea", "Noah", "Ada", "Kai")
_ITEMS = ("apples", "pens", "cards", "stamps", "shells", "coins", "books", "marbles", "stickers", "eggs")
_CONTAINERS = ("bags", "boxes", "packs", "jars", "crates", "baskets")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
# Number ranges (inclusive): they set how hard the arithmetic is for a tiny model.
_TWO_ADDENDS = (10, 99)
_THREE_ADDENDS = (5, 50)
_START_COUNT = (10, 60)
_CONTAINER_COUNT = (2, 9)
_PER_CONTAINER = (2, 19)

_OPENERS = (
    "Let me think step by step.",
    "Let me first see what we want: the number of {items}.",
    "Let me read the problem again.",
)
_CHECKS = (
    "Check: {a} {op} {b} = {c}. Yes.",
    "Let me double-check {a} {op} {b}. It is {c}.",
)
_FALSE_START = "{label}: {a} {op} {b} = {wrong}. No, wait. {a} {op} {b} = {c}."
_RECAPS = (
    "So the answer is {answer}. Let me make sure. Yes, it looks right.",
    "To sum up, the result is {answer}.",
)


@dataclass(frozen=True)
class Step:
    """One arithmetic step of a chain: ``{label}: {left} {op} {right} = {result}.``"""

    label: str
    left: int
    op: Literal["+", "*"]
    right: int

    @property
    def result(self) -> int:
        return self.left + self.right if self.op == "+" else self.left * self.right

    def line(self) -> str:
        return f"{self.label}: {self.left} {self.op} {self.right} = {self.result}."


@dataclass(frozen=True)
class WorkedProblem:
    """A problem with the structure needed to render its chains of thought.

    Attributes:
        id: Stable id, ``synth-`` plus a hash of the text.
        text: The problem statement.
        steps: The arithmetic steps, in order; the last result is the answer.
        answer_sentence: The short sentence that precedes ``\\boxed{answer}``.
        items: The counted noun (used by the verbose openers).
    """

    id: str
    text: str
    steps: tuple[Step, ...]
    answer_sentence: str
    items: str

    @property
    def answer(self) -> int:
        return self.steps[-1].result

    @property
    def solution(self) -> str:
        """The concise reference solution ``s*``: the steps, then the answer line."""
        return f"{self.concise_chain()}\n{self.final_line()}"

    @property
    def problem(self) -> Problem:
        """The record the rest of the package sees."""
        return Problem(id=self.id, problem=self.text, solution=self.solution, answer=str(self.answer))

    def final_line(self) -> str:
        """The answer line that ends every completion: ``{sentence} \\boxed{answer}``."""
        return f"{self.answer_sentence} \\boxed{{{self.answer}}}"

    def concise_chain(self) -> str:
        """The reasoning of the reference solution: one line per step."""
        return "\n".join(step.line() for step in self.steps)

    def completion(self, rng: random.Random, *, verbose: bool, teacher: bool = False) -> str:
        """A warm-start target: the reference solution, or (``verbose``) a verbose chain and the answer line.

        The concise one draws nothing from ``rng``: the default warm-start stream is what it always was.
        Student and teacher (``teacher``) targets are rendered alike.
        """
        return f"{self.verbose_chain(rng)}\n{self.final_line()}" if verbose else self.solution

    def tokenizer_texts(self, rng: random.Random) -> list[str]:
        """Text of this problem for the tokenizer's training corpus."""
        return [self.text, self.solution, self.verbose_chain(rng)]

    def verbose_chain(self, rng: random.Random) -> str:
        """A correct but wasteful chain: opener, re-checks, corrected false starts, recap.

        Each insertion is drawn independently from ``rng`` (at most one false start per chain);
        the steps and the result are the concise chain's, so a verbose chain is never wrong, only long.
        """
        lines = []
        if rng.random() < 0.9:
            lines.append(rng.choice(_OPENERS).format(items=self.items))
        false_start = rng.randrange(len(self.steps)) if rng.random() < 0.2 else -1
        for index, step in enumerate(self.steps):
            if index == false_start:
                wrong = step.result + rng.choice((-10, -2, -1, 1, 2, 10))
                lines.append(_FALSE_START.format(**_fields(step), wrong=max(wrong, 0)))
            else:
                lines.append(step.line())
            if rng.random() < 0.8:
                lines.append(rng.choice(_CHECKS).format(**_fields(step)))
        if rng.random() < 0.7:
            lines.append(rng.choice(_RECAPS).format(answer=self.answer))
        return "\n".join(lines)


def _fields(step: Step) -> dict[str, object]:
    return {"label": step.label, "a": step.left, "op": step.op, "b": step.right, "c": step.result}


def _table_fact(rng: random.Random) -> tuple[int, int]:
    """A one-digit multiplication fact: 2..9 containers of 2..19 items."""
    return rng.randint(*_CONTAINER_COUNT), rng.randint(*_PER_CONTAINER)


def _add_two(rng: random.Random, name: str, items: str) -> tuple[str, list[Step], str]:
    a, b = rng.randint(*_TWO_ADDENDS), rng.randint(*_TWO_ADDENDS)
    text = f"{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?"
    return text, [Step("Total", a, "+", b)], f"{name} has {a + b} {items} now."


def _add_three(rng: random.Random, name: str, items: str) -> tuple[str, list[Step], str]:
    a, b, c = (rng.randint(*_THREE_ADDENDS) for _ in range(3))
    d1, d2, d3 = rng.sample(_DAYS, 3)
    text = (
        f"{name} collects {a} {items} on {d1}, {b} on {d2} and {c} on {d3}. "
        f"How many {items} does {name} collect in all?"
    )
    steps = [Step("First two days", a, "+", b), Step("All three days", a + b, "+", c)]
    return text, steps, f"{name} collects {a + b + c} {items} in all."


def _multiply(rng: random.Random, name: str, items: str) -> tuple[str, list[Step], str]:
    k, b = _table_fact(rng)
    box = rng.choice(_CONTAINERS)
    text = f"{name} buys {k} {box} with {b} {items} in each. How many {items} does {name} buy?"
    return text, [Step("Total", k, "*", b)], f"{name} buys {k * b} {items}."


def _multiply_add(rng: random.Random, name: str, items: str) -> tuple[str, list[Step], str]:
    a, (k, b) = rng.randint(*_START_COUNT), _table_fact(rng)
    box = rng.choice(_CONTAINERS)
    text = (
        f"{name} has {a} {items} and buys {k} {box} with {b} {items} in each. "
        f"How many {items} does {name} have now?"
    )
    steps = [Step("Bought", k, "*", b), Step("Total", a, "+", k * b)]
    return text, steps, f"{name} has {a + k * b} {items} now."


def _two_products(rng: random.Random, name: str, items: str) -> tuple[str, list[Step], str]:
    (k1, b1), (k2, b2) = _table_fact(rng), _table_fact(rng)
    box1, box2 = rng.sample(_CONTAINERS, 2)
    text = (
        f"{name} buys {k1} {box1} with {b1} {items} each and {k2} {box2} with {b2} {items} each. "
        f"How many {items} does {name} buy in total?"
    )
    steps = [
        Step(f"In the {box1}", k1, "*", b1),
        Step(f"In the {box2}", k2, "*", b2),
        Step("Total", k1 * b1, "+", k2 * b2),
    ]
    return text, steps, f"{name} buys {k1 * b1 + k2 * b2} {items} in total."


_KINDS: tuple[tuple[Callable[[random.Random, str, str], tuple[str, list[Step], str]], float], ...] = (
    (_add_two, 0.2),
    (_add_three, 0.2),
    (_multiply, 0.1),
    (_multiply_add, 0.25),
    (_two_products, 0.25),
)


def split_of(text: str) -> Split:
    """The split a problem text belongs to (a hash of the text, so splits never overlap)."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 20
    return next(name for name in SPLITS if bucket in _SPLIT_BUCKETS[name])


def worked_problems(n: int, *, seed: int, split: Split = "train") -> list[WorkedProblem]:
    """``n`` distinct problems of ``split``, deterministic in ``(seed, split)``.

    Args:
        n: Number of problems.
        seed: Seed of the generator; different seeds give different (possibly overlapping) lists.
        split: ``train`` (80 % of the hash space), ``validation`` or ``test`` (10 % each).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"egrsd-testbed/{seed}/{split}")
    kinds, weights = zip(*_KINDS, strict=True)
    seen: set[str] = set()
    problems: list[WorkedProblem] = []
    while len(problems) < n:
        kind = rng.choices(kinds, weights)[0]
        text, steps, sentence = kind(rng, rng.choice(_NAMES), items := rng.choice(_ITEMS))
        if text in seen or split_of(text) != split:
            continue
        seen.add(text)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        problems.append(WorkedProblem(f"synth-{digest}", text, tuple(steps), sentence, items))
    return problems


def synthetic_problems(n: int, *, seed: int, split: Split = "train") -> list[Problem]:
    """``n`` distinct synthetic problems of ``split`` as :class:`~egrsd_pl.problem.Problem` records.

    ``solution`` is the concise reference solution (steps, then ``{sentence} \\boxed{answer}``),
    ``answer`` the gold integer as a string. Deterministic in ``(seed, split)``; splits are disjoint.
    """
    return [worked.problem for worked in worked_problems(n, seed=seed, split=split)]

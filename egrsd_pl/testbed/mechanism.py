"""The ``mechanism`` world: arithmetic whose concise solutions still branch where the reference does not decide.

``testbed:tiny``'s privileged teacher copies the reference solution ``s*`` token by token, so it is almost
never uncertain and the entropy gate has nothing to act on. In this world every chain of thought -- the
reference, the teacher's own, the student's -- is *one rendering, drawn at random,* of a problem whose
solution has free choices that do not change the answer:

- **order** of independent sub-computations: the products of a problem, one line each, in any order; the
  operands of a product and the addends of the total in any order. Once a line or operand is chosen the
  rest of the line is arithmetic, so the teacher's uncertainty is a one-token spike that resolves at once:
  a *pivot* (paper §5.5: ``Ĥ ≥ τ_high``, ``Ĥ^CL ≤ τ_low``);
- **phrasing**: the label of the total line (``Total`` / ``Sum`` / ``Together``), and the answer sentence,
  eight consecutive words each drawn from four interchangeable ones (``Thus altogether we find our whole
  count is \\boxed{87}``): eight uncertain tokens in a row, so the first three are *forks* (``Ĥ`` and its
  window minimum over ``W = 5`` both ``≥ τ_high``) and the rest pivots;
- everything else (the numbers, ``=``, the results, the punctuation) is determined: *locks*.

A rendering draws its choices from its own ``random.Random``, independently of ``s*``: the reference shows
one order and phrasing, the teacher-format warm-start examples continue with another drawn afresh, so the
teacher learns a calibrated uncertainty at the choices (it cannot read them off ``s*``) while staying
concise (no opener, re-check, false start or recap, but in the world's small ``teacher_verbose_share``,
:mod:`.worlds`). Student-format examples are concise or verbose
(:data:`~egrsd_pl.testbed.warmstart.VERBOSE_SHARE`), with the insertions of :mod:`.synthetic`; their choices
follow :data:`STUDENT_HABIT`, and they are trained with the world's ``student_smoothing``, so the student is
less sure than the teacher at choices and never quite sure at locks (docs/testbed.md, "The mechanism world").

Problems come from seeded ``random.Random`` instances and the split is the hash of the text
(:func:`~egrsd_pl.testbed.synthetic.split_of`), as in :mod:`.synthetic`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from egrsd_pl.problem import Problem
from egrsd_pl.testbed.synthetic import (
    _CHECKS,
    _CONTAINERS,
    _DAYS,
    _FALSE_START,
    _ITEMS,
    _NAMES,
    _OPENERS,
    _RECAPS,
    SPLITS,
    Split,
    split_of,
)

T = TypeVar("T")
# Probability that a student-format rendering takes the habitual choice (the problem's order, the first word)
# instead of a uniform one. The student has habits, the teacher none: at a choice the teacher is at its most
# uncertain (uniform) while the student is not, so the teacher-student gap grows with the teacher's entropy.
STUDENT_HABIT = 0.6
_COUNT = (2, 9)  # containers bought
_PER_CONTAINER = (2, 9)  # items in each: the products are the one-digit times table
_START = (10, 60)
_ADDEND = (5, 50)
_TOTAL_LABELS = ("Total", "Sum", "Together")
# The answer sentence: one word of each slot, in this order, then `` \boxed{answer}``. Every word is one
# token of the world's tokenizer (tests/test_testbed_mechanism.py), so the sentence is 8 uncertain tokens.
ANSWER_SLOTS: tuple[tuple[str, ...], ...] = (
    ("So", "Thus", "Hence", "Then"),
    (" overall", " altogether", " finally", " clearly"),
    (" we", " I", " you", " they"),
    (" find", " get", " see", " have"),
    (" the", " our", " this", " that"),
    (" total", " full", " whole", " final"),
    (" count", " number", " sum", " amount"),
    (" is", " equals", " gives", " makes"),
)


@dataclass(frozen=True)
class Product:
    """An independent sub-computation: ``{count} {container} with {each} items in each``."""

    container: str
    count: int
    each: int

    @property
    def result(self) -> int:
        return self.count * self.each


@dataclass(frozen=True)
class MechanismProblem:
    """A problem of the mechanism world: independent products (possibly none) and loose addends, summed.

    Attributes:
        id: Stable id, ``mech-`` plus a hash of the text.
        text: The problem statement.
        products: The independent products, each one line of a chain.
        addends: Numbers added as they are (a starting count, or the days' counts).
        items: The counted noun.
    """

    id: str
    text: str
    products: tuple[Product, ...]
    addends: tuple[int, ...]
    items: str

    @property
    def answer(self) -> int:
        return sum(p.result for p in self.products) + sum(self.addends)

    @property
    def solution(self) -> str:
        """The reference solution ``s*``: one concise rendering, its choices seeded by the problem id."""
        return self.completion(
            random.Random(f"egrsd-mechanism-reference/{self.id}"), verbose=False, teacher=True
        )

    @property
    def problem(self) -> Problem:
        return Problem(id=self.id, problem=self.text, solution=self.solution, answer=str(self.answer))

    def lines(self, rng: random.Random, habit: float = 0.0) -> list[tuple[str, str, str, str, int]]:
        """One rendering's arithmetic lines as ``(label, left, op, right, result)``: the products in a random
        order, each with its operands in a random order, then the total of every term in a random order and
        its label; with probability ``habit`` each choice is the habitual one instead (:func:`_choose`)."""
        lines = []
        for product in _arrange(rng, self.products, habit):
            left, right = _arrange(rng, (product.count, product.each), habit)
            lines.append((product.container.capitalize(), str(left), "*", str(right), product.result))
        terms = _arrange(rng, [p.result for p in self.products] + list(self.addends), habit)
        label = _choose(rng, _TOTAL_LABELS, habit)
        lines.append((label, " + ".join(map(str, terms[:-1])), "+", str(terms[-1]), self.answer))
        return lines

    def answer_line(self, rng: random.Random, habit: float = 0.0) -> str:
        """The answer sentence: one word of each of :data:`ANSWER_SLOTS`, then ``\\boxed{answer}``."""
        return "".join(_choose(rng, words, habit) for words in ANSWER_SLOTS) + f" \\boxed{{{self.answer}}}"

    def completion(self, rng: random.Random, *, verbose: bool, teacher: bool = False) -> str:
        """A correct chain of thought and the answer line, every choice drawn from ``rng``.

        Concise: the arithmetic lines only. Verbose: an opener, re-checks, at most one corrected false
        start and a recap around the same lines (the insertions of ``testbed:tiny``). A teacher's (and the
        reference's) choices are uniform; a student's follow its :data:`STUDENT_HABIT`.
        """
        habit = 0.0 if teacher else STUDENT_HABIT
        lines = self.lines(rng, habit)
        if not verbose:
            chain = [f"{label}: {a} {op} {b} = {c}." for label, a, op, b, c in lines]
        else:
            chain = _verbose(lines, rng, items=self.items, answer=self.answer)
        return "\n".join([*chain, self.answer_line(rng, habit)])

    def tokenizer_texts(self, rng: random.Random) -> list[str]:
        """Text of this problem for the tokenizer's training corpus."""
        return [self.text, self.solution, self.completion(rng, verbose=True)]


def _choose(rng: random.Random, options: Sequence[str], habit: float) -> str:
    """The first (habitual) option with probability ``habit``, else one drawn uniformly (the first too)."""
    return options[0] if habit > 0 and rng.random() < habit else rng.choice(options)


def _arrange(rng: random.Random, values: Sequence[T], habit: float) -> list[T]:
    """``values`` in their given (habitual) order with probability ``habit``, else in a uniform random order."""
    return list(values) if habit > 0 and rng.random() < habit else rng.sample(list(values), len(values))


def _verbose(
    lines: list[tuple[str, str, str, str, int]], rng: random.Random, *, items: str, answer: int
) -> list[str]:
    chain = []
    if rng.random() < 0.9:
        chain.append(rng.choice(_OPENERS).format(items=items))
    false_start = rng.randrange(len(lines)) if rng.random() < 0.2 else -1
    for index, (label, a, op, b, c) in enumerate(lines):
        fields = {"label": label, "a": a, "op": op, "b": b, "c": c}
        if index == false_start:
            wrong = max(c + rng.choice((-10, -2, -1, 1, 2, 10)), 0)
            chain.append(_FALSE_START.format(**fields, wrong=wrong))
        else:
            chain.append(f"{label}: {a} {op} {b} = {c}.")
        if rng.random() < 0.8:
            chain.append(rng.choice(_CHECKS).format(**fields))
    if rng.random() < 0.7:
        chain.append(rng.choice(_RECAPS).format(answer=answer))
    return chain


def _each(products: list[Product], items: str) -> str:
    phrases = [f"{p.count} {p.container} with {p.each} {items} each" for p in products]
    return ", ".join(phrases[:-1]) + f" and {phrases[-1]}"


def _products(rng: random.Random, n: int) -> list[Product]:
    return [
        Product(container, rng.randint(*_COUNT), rng.randint(*_PER_CONTAINER))
        for container in rng.sample(_CONTAINERS, n)
    ]


def _bought(rng: random.Random, name: str, items: str, n: int) -> tuple[str, list[Product], list[int]]:
    products = _products(rng, n)
    text = f"{name} buys {_each(products, items)}. How many {items} does {name} buy in total?"
    return text, products, []


def _start_and_bought(rng: random.Random, name: str, items: str) -> tuple[str, list[Product], list[int]]:
    start, products = rng.randint(*_START), _products(rng, 2)
    text = f"{name} has {start} {items} and buys {_each(products, items)}. How many {items} does {name} have now?"
    return text, products, [start]


def _days(rng: random.Random, name: str, items: str) -> tuple[str, list[Product], list[int]]:
    counts = [rng.randint(*_ADDEND) for _ in range(3)]
    d1, d2, d3 = rng.sample(_DAYS, 3)
    text = (
        f"{name} collects {counts[0]} {items} on {d1}, {counts[1]} on {d2} and {counts[2]} on {d3}. "
        f"How many {items} does {name} collect in all?"
    )
    return text, [], counts


_KINDS: tuple[
    tuple[Callable[[random.Random, str, str], tuple[str, list[Product], list[int]]], float], ...
] = (
    (lambda rng, name, items: _bought(rng, name, items, 2), 0.35),
    (lambda rng, name, items: _bought(rng, name, items, 3), 0.25),
    (_start_and_bought, 0.25),
    (_days, 0.15),
)


def mechanism_problems(n: int, *, seed: int, split: Split = "train") -> list[MechanismProblem]:
    """``n`` distinct problems of ``split``, deterministic in ``(seed, split)``; splits are disjoint."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"egrsd-mechanism/{seed}/{split}")
    kinds, weights = zip(*_KINDS, strict=True)
    seen: set[str] = set()
    problems: list[MechanismProblem] = []
    while len(problems) < n:
        kind = rng.choices(kinds, weights)[0]
        items = rng.choice(_ITEMS)
        text, products, addends = kind(rng, rng.choice(_NAMES), items)
        if text in seen or split_of(text) != split:
            continue
        seen.add(text)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        problems.append(MechanismProblem(f"mech-{digest}", text, tuple(products), tuple(addends), items))
    return problems

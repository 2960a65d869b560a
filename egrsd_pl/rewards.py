"""Answer checking and the length-shaped reward (docs/algorithm.md#step-2-reward).

A completion is scored in five steps (:meth:`AnswerVerifier.verify_batch`):

1. :func:`extract_final_answer`: the text after the last ``</think>``; a ``<think>`` that is never
   closed means no answer. A completion without any think tag is all answer (what a non-thinking
   model emits). If the chat template already opened ``<think>`` in the *prompt* (Qwen3-2507
   thinking models), set ``think_opened_in_prompt=True``: a completion without ``</think>`` then has
   no answer.
2. :func:`extract_boxed_answer`: the last ``\\boxed{...}`` (or ``\\fbox{...}``) of that text. No
   boxed answer means no answer: math-verify's own extraction would otherwise accept a bare trailing
   number and, among several boxed answers, may take the first.
3. Cheap guards, before any sympy: an answer longer than ``max_answer_chars``, nested deeper than
   ``max_nesting_depth`` brackets, or holding an integer power tower / factorial with more than
   ``max_power_digits`` digits (``10^{10^{10^{10}}}``) is wrong. Real answers are far inside these
   limits (all 8,181 gold answers of the bundled data: at most 210 characters, nesting depth 4).
4. Fast path: when gold and answer are both plain decimal numbers, equal values are correct and two
   different integers are wrong, without math-verify (which agrees on these; a decimal that differs
   from the gold goes on to math-verify, whose rounding to 6 places may still accept it). 82 % of
   the bundled gold answers are plain integers.
5. math-verify, gold first: ``verify(parse("\\boxed{gold}"), parse("\\boxed{answer}"))`` with its
   default extraction and comparison options, in a persistent worker subprocess (:mod:`egrsd_pl.verification_worker`).

Why a subprocess: math-verify bounds its time with ``signal.alarm``, which raises in any thread
but the main one (and with the timeouts disabled a pathological answer hangs the trainer), and
big-integer arithmetic inside sympy cannot be interrupted by a signal at all. The worker is a plain
``subprocess.Popen`` of this interpreter (not ``multiprocessing``: Lightning's DataLoader workers
are daemonic processes, which may not have ``multiprocessing`` children), so verification works the
same in the main thread, a worker thread, a DataLoader worker and every DDP rank. In the worker,
math-verify runs in the main thread with its own timeouts (``math_verify_timeout_s``) and an
address-space limit; the parent waits at most ``timeout_s`` for each answer, then kills the worker
(the answer is wrong) and starts a new one on the next call. This module never evaluates model
text; math-verify's expression parser (sympy's ``parse_expr``, which uses ``eval``) only receives
strings of digits, operators and parentheses matched by its regex, and runs in the worker.

Measured cost per answer (2-core CPU shared with other jobs, load average ~7.6, so read the
ratios): fast path ~15 µs including the extraction from a 1,000-character completion; cache hit
~8 µs; math-verify on MATH-500's non-integer answers ~28 ms in the worker vs ~35 ms calling it in
process (the pipe round trip is lost in the noise: a trivial check costs ~1.0 ms vs ~1.3 ms);
worker start ~1 s, once per process and after each kill. Guarded answers cost microseconds.
Under heavy CPU contention a legitimate but slow check can pass its timeouts and count as wrong;
``stats["timeouts"]`` counts these (none in the bundled data at the defaults).
"""

from __future__ import annotations

import logging
import math
import os
import re
import select
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from decimal import Decimal
from types import TracebackType
from typing import cast

from egrsd_pl.verification_worker import MathVerifyWorker

log = logging.getLogger(__name__)

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_PLAIN_INTEGER = re.compile(r"-?\d+")
# Integer power towers and factorials, read after dropping braces and spaces: "10^{10^{10}}" -> "10^10^10".
_TOWER = re.compile(r"\d+(?:\.\d+)?(?:\^-?\d+(?:\.\d+)?)+")
_FACTORIAL = re.compile(r"(\d+(?:\.\d+)?(?:\^-?\d+(?:\.\d+)?)*)\)?!")
_DROP_FOR_TOWERS = str.maketrans("", "", "{} \t\n")
_MAX_FACTORIAL_ARGUMENT = 100_000


def extract_final_answer(completion: str, *, think_opened_in_prompt: bool = False) -> str | None:
    """The answer part of a completion: the text after the last ``</think>``.

    Args:
        completion: Decoded completion (keep the think tags: Qwen3's ``<think>``/``</think>`` are not
            special tokens, so ``skip_special_tokens=True`` keeps them).
        think_opened_in_prompt: The prompt already ends with ``<think>`` (chat templates that open the
            thinking block themselves); then a completion without ``</think>`` has no answer.

    Returns:
        The answer text, or ``None`` when a ``<think>`` was never closed. A completion without any
        think tag is returned whole (a non-thinking model's answer).
    """
    if _THINK_CLOSE in completion:
        answer = completion.rsplit(_THINK_CLOSE, 1)[1]
        return None if _THINK_OPEN in answer else answer
    if _THINK_OPEN in completion or think_opened_in_prompt:
        return None
    return completion


def extract_boxed_answer(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` of ``text``, stripped.

    Braces are balanced (nested groups such as ``\\boxed{\\frac{1}{2}}`` are kept whole); escaped
    braces ``\\{``/``\\}`` do not count. Only the braced form is recognised (``\\boxed 5`` is not).

    Returns:
        The content, or ``None`` when there is no boxed answer or the last one is never closed (a
        truncated completion). An empty box gives ``""``.
    """
    starts = list(_BOX_START.finditer(text))
    if not starts:
        return None
    match = starts[-1]
    depth, index = 1, match.end()
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2  # an escaped character, e.g. \{ or \\
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[match.end() : index].strip()
        index += 1
    return None


def length_shaped_reward(correct: bool, length: int, max_length: int, beta: float = 0.5) -> float:
    """docs/algorithm.md#step-2-reward: ``r = 1[correct] · (1 + β · (1 − length / max_length))``.

    Args:
        correct: Whether the completion's final boxed answer is right (none or unverifiable: ``False``).
        length: Completion length ``|y|`` in tokens, in ``[0, max_length]``.
        max_length: ``L_max``, the completion cap (paper: 1,024).
        beta: ``β_L`` (paper: 0.5); 0 gives the plain 0/1 reward.

    Returns:
        0 for a wrong answer, otherwise a reward in ``[1, 1 + β]``; shorter correct answers earn more.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not 0 <= length <= max_length:
        raise ValueError(f"length must be in [0, max_length={max_length}], got {length}")
    if not beta >= 0:  # also rejects NaN
        raise ValueError(f"beta must be >= 0, got {beta}")
    return 1.0 + beta * (1.0 - length / max_length) if correct else 0.0


class AnswerVerifier:
    """Scores batches of completions against gold answers in bounded time, in any thread or process.

    See the module docstring for the steps and their cost. Thread-safe (one batch at a time); a
    process forked from the owner starts its own worker. Use as a context manager or call
    :meth:`close`. ``stats`` counts answers by how they were decided (``no_answer``, ``guarded``,
    ``fast_path``, ``cached``, ``math_verify``), ``timeouts`` (math-verify's own, or the deadline
    that kills a worker; each such answer is wrong) and ``worker_starts``.

    Args:
        timeout_s: Longest wait for one math-verify answer before the worker is killed (wrong).
        math_verify_timeout_s: math-verify's own timeouts in the worker (whole seconds, per parse
            and per comparison).
        max_answer_chars: Longer boxed answers are wrong without a check.
        max_nesting_depth: Boxed answers nesting more brackets ``([{`` are wrong without a check.
        max_power_digits: Boxed answers with an integer power tower or factorial of more digits are
            wrong without a check.
        think_opened_in_prompt: See :func:`extract_final_answer`.
        worker_memory_limit_bytes: Address-space limit of the worker (``None``: none).
        startup_timeout_s: Longest wait for a worker to import math-verify.
        cache_size: Remembered ``(gold, answer)`` verdicts.
        num_workers: math-verify worker processes; a batch keeps one answer in flight per worker.
    """

    def __init__(
        self,
        *,
        timeout_s: float = 5.0,
        math_verify_timeout_s: int = 3,
        max_answer_chars: int = 1000,
        max_nesting_depth: int = 12,
        max_power_digits: int = 1_000_000,
        think_opened_in_prompt: bool = False,
        worker_memory_limit_bytes: int | None = 4 << 30,
        startup_timeout_s: float = 120.0,
        cache_size: int = 16_384,
        num_workers: int = 1,
    ) -> None:
        for name, value in (
            ("timeout_s", timeout_s),
            ("math_verify_timeout_s", math_verify_timeout_s),
            ("max_answer_chars", max_answer_chars),
            ("max_nesting_depth", max_nesting_depth),
            ("max_power_digits", max_power_digits),
            ("startup_timeout_s", startup_timeout_s),
            ("num_workers", num_workers),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not isinstance(math_verify_timeout_s, int):
            raise ValueError(
                f"math_verify_timeout_s must be a whole number of seconds, got {math_verify_timeout_s}"
            )
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.timeout_s = float(timeout_s)
        self.math_verify_timeout_s = math_verify_timeout_s
        self.max_answer_chars = max_answer_chars
        self.max_nesting_depth = max_nesting_depth
        self.max_power_digits = max_power_digits
        self.think_opened_in_prompt = think_opened_in_prompt
        self.worker_memory_limit_bytes = worker_memory_limit_bytes
        self.startup_timeout_s = float(startup_timeout_s)
        self.cache_size = cache_size
        self.num_workers = num_workers
        self.stats = dict.fromkeys(
            ("no_answer", "guarded", "fast_path", "cached", "math_verify", "timeouts", "worker_starts"), 0
        )
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()
        self._workers: list[MathVerifyWorker | None] = [None] * num_workers

    # ------------------------------------------------------------------ public API
    def verify_batch(self, completions: Sequence[str], golds: Sequence[str]) -> list[bool]:
        """Whether each completion's final boxed answer equals its gold answer.

        Args:
            completions: ``N`` decoded completions.
            golds: ``N`` gold answers as in a dataset's ``answer`` column (bare LaTeX such as
                ``\\frac{1}{2}``; one pair of surrounding ``$`` or a ``\\boxed{}`` is removed).

        Returns:
            ``N`` verdicts; no answer, a guarded answer, an unverifiable one or a timeout is ``False``.
        """
        if len(completions) != len(golds):
            raise ValueError(f"got {len(completions)} completions but {len(golds)} golds")
        pairs: list[tuple[str, str] | None] = []
        counts = {"no_answer": 0, "guarded": 0}
        for completion, gold in zip(completions, golds, strict=True):
            final = extract_final_answer(completion, think_opened_in_prompt=self.think_opened_in_prompt)
            answer = extract_boxed_answer(final) if final is not None else None
            reason = "no_answer" if not answer else "guarded" if self._is_pathological(answer) else None
            if reason is not None:
                counts[reason] += 1
                pairs.append(None)
            else:
                pairs.append((_bare_gold(gold), cast(str, answer)))  # reason is None: a non-empty answer
        boxed = [(f"\\boxed{{{g}}}", f"\\boxed{{{a}}}", _fast_verdict(g, a)) for g, a in filter(None, pairs)]
        verdicts = iter(self._compare(boxed, counts))
        return [next(verdicts) if pair is not None else False for pair in pairs]

    def compare_batch(self, gold_texts: Sequence[str], answer_texts: Sequence[str]) -> list[bool]:
        """math-verify's default check ``verify(parse(gold_text), parse(answer_text))`` on raw texts.

        No think/boxed extraction and no guards (the time bound still holds); this is the comparison
        :meth:`verify_batch` uses after wrapping both answers in ``\\boxed{}``.
        """
        if len(gold_texts) != len(answer_texts):
            raise ValueError(f"got {len(gold_texts)} gold texts but {len(answer_texts)} answer texts")
        return self._compare([(g, a, None) for g, a in zip(gold_texts, answer_texts, strict=True)])

    def close(self) -> None:
        """Stops the workers (a later call starts new ones)."""
        with self._lock:
            for worker in filter(None, self._workers):
                worker.stop()
            self._workers = [None] * self.num_workers

    def __getstate__(self) -> dict:
        """Pickles the settings only (spawned DataLoader workers): the copy starts its own workers."""
        state = self.__dict__.copy()
        state.update(_cache=OrderedDict(), _lock=None, _workers=[None] * self.num_workers)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _owner_pid=os.getpid())

    def __enter__(self) -> AnswerVerifier:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _is_pathological(self, answer: str) -> bool:
        if len(answer) > self.max_answer_chars or _nesting_depth(answer) > self.max_nesting_depth:
            return True
        return _power_digits(answer) > self.max_power_digits

    def _compare(
        self, items: list[tuple[str, str, bool | None]], counts: dict[str, int] | None = None
    ) -> list[bool]:
        """Verdicts for ``(gold_text, answer_text, fast_verdict)``; ``None`` asks math-verify."""
        if os.getpid() != self._owner_pid:  # forked: the workers and the lock belong to the parent
            self._lock, self._owner_pid = threading.Lock(), os.getpid()
            for worker in filter(None, self._workers):
                worker.abandon()
            self._workers = [None] * self.num_workers
        with self._lock:
            for name, count in (counts or {}).items():
                self.stats[name] += count
            known: dict[tuple[str, str], bool | None] = {}
            for gold_text, answer_text, fast in items:
                key = (gold_text, answer_text)
                if fast is not None:
                    self.stats["fast_path"] += 1
                elif key in known or key in self._cache:
                    self.stats["cached"] += 1
                    if key not in known:
                        self._cache.move_to_end(key)
                        known[key] = self._cache[key]
                else:
                    known[key] = None  # asked below
            asked = [key for key, verdict in known.items() if verdict is None]
            known.update(zip(asked, self._ask_workers(asked), strict=True))
            if self.cache_size:
                for key in asked:
                    self._cache[key] = bool(known[key])
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return [fast if fast is not None else bool(known[(g, a)]) for g, a, fast in items]

    def _ask_workers(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """math-verify verdicts, one pair in flight per worker, each answered within ``timeout_s``."""
        verdicts: list[bool] = [False] * len(pairs)
        queue = list(range(len(pairs)))[::-1]
        in_flight: dict[int, tuple[int, float]] = {}  # worker slot -> (pair index, deadline)
        retried: set[int] = set()
        while queue or in_flight:
            for slot in range(self.num_workers):
                if queue and slot not in in_flight:
                    started = self._started_worker(slot)
                    index = queue.pop()
                    started.send(*pairs[index])
                    in_flight[slot] = (index, time.monotonic() + self.timeout_s)
                    self.stats["math_verify"] += 1
            by_fd = {self._workers[slot].fileno(): slot for slot in in_flight}  # type: ignore[union-attr]
            wait = max(0.0, min(deadline for _, deadline in in_flight.values()) - time.monotonic())
            readable, _, _ = select.select(list(by_fd), [], [], wait)
            for fd in readable:
                slot = by_fd[fd]
                reply = self._workers[slot].receive()  # type: ignore[union-attr]
                if reply is not None:
                    verdicts[in_flight.pop(slot)[0]], timed_out = reply
                    self.stats["timeouts"] += timed_out
            now = time.monotonic()
            for slot, (index, deadline) in list(in_flight.items()):
                worker = self._workers[slot]
                assert worker is not None
                if not worker.dead and now < deadline:
                    continue
                if worker.dead and index not in retried:  # it may have died before this answer: retry once
                    retried.add(index)
                    queue.append(index)
                else:  # no verdict in time, or a second death: the answer is wrong
                    self.stats["timeouts"] += 1
                    log.warning(
                        "math-verify gave no verdict within %.1f s; restarting its worker", self.timeout_s
                    )
                worker.stop()
                self._workers[slot] = None
                del in_flight[slot]
        return verdicts

    def _started_worker(self, slot: int) -> MathVerifyWorker:
        """The worker in ``slot``; an empty slot starts all missing workers (they import in parallel)."""
        if self._workers[slot] is None:
            missing = [i for i, worker in enumerate(self._workers) if worker is None]
            for i in missing:
                self._workers[i] = MathVerifyWorker(
                    self.math_verify_timeout_s, self.worker_memory_limit_bytes
                )
            for i in missing:
                self._workers[i].wait_ready(self.startup_timeout_s)  # type: ignore[union-attr]
                self.stats["worker_starts"] += 1
        return self._workers[slot]  # type: ignore[return-value]


def _bare_gold(gold: str) -> str:
    gold = gold.strip()
    if len(gold) >= 2 and gold.startswith("$") and gold.endswith("$") and not gold.startswith("$$"):
        gold = gold[1:-1].strip()
    if gold.startswith(_BOX_COMMANDS) and (inner := extract_boxed_answer(gold)) is not None:
        return inner
    return gold


def _fast_verdict(gold: str, answer: str) -> bool | None:
    """Verdict for two plain decimal numbers that math-verify would give too; ``None``: ask it."""
    if not (_PLAIN_NUMBER.fullmatch(gold) and _PLAIN_NUMBER.fullmatch(answer)):
        return None
    if Decimal(gold) == Decimal(answer):
        return True
    if _PLAIN_INTEGER.fullmatch(gold) and _PLAIN_INTEGER.fullmatch(answer):
        return False
    return None  # e.g. 0.5 vs 0.5000001: math-verify rounds to 6 decimals


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}":
            depth = max(depth - 1, 0)
    return deepest


def _power_digits(text: str) -> float:
    """Rough digit count of the largest integer power tower in ``text`` (``inf`` for a huge factorial)."""
    flat = text.translate(_DROP_FOR_TOWERS)
    for match in _FACTORIAL.finditer(flat):
        if _log10_of_tower(match.group(1)) > math.log10(_MAX_FACTORIAL_ARGUMENT):
            return math.inf
    return max((_log10_of_tower(match.group()) for match in _TOWER.finditer(flat)), default=0.0)


def _log10_of_tower(tower: str) -> float:
    """``log10`` of ``a^b^c...`` (right-associative, signs dropped, bases below 2 taken as 2); may be ``inf``."""
    levels = [abs(float(level)) for level in tower.split("^")]
    log_value = math.log10(max(levels[-1], 1.0))
    for base in reversed(levels[:-1]):
        exponent = math.inf if log_value > 300 else 10.0**log_value
        log_value = exponent * math.log10(max(base, 2.0))
    return log_value

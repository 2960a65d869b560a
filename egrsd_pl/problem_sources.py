"""Problem datasets: local JSONL / JSON / Parquet files, the synthetic testbed, or the Hugging Face hub.

Every row becomes a :class:`~egrsd_pl.problem.Problem` after validation. The gold answer comes from
the answer column; where a row (or the whole dataset) has none, it is the last ``\\boxed{}`` of the
solution. A malformed row raises :class:`DatasetError` naming the file, the 1-based row (for JSONL
the line number) and the flag to fix, e.g.::

    data/train.jsonl row 17: column 'problem' is missing (columns: question, answer); set --data.problem_column

With ``skip_invalid=True`` malformed rows are skipped instead, counted per reason, summarised in one
warning and returned in a :class:`LoadReport` by :func:`load_problems_with_report`. Prompts that are
too long for the model are skipped and counted by :func:`filter_by_prompt_length`, never truncated.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from egrsd_pl.problem import Problem
from egrsd_pl.rewards import extract_boxed_answer

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
SYNTHETIC_PREFIX = "synthetic:"
_MAX_EXAMPLES = 5


class DatasetError(ValueError):
    """A dataset that cannot be loaded, or a malformed row (the message names the file and row)."""


@dataclass
class LoadReport:
    """What :func:`load_problems_with_report` read.

    Attributes:
        source: The source as given.
        rows_read: Rows looked at (all rows, or fewer when ``limit`` was reached).
        loaded: Problems returned.
        skipped: Skipped malformed rows per reason (``missing_column``, ``wrong_type``, ``empty``,
            ``no_answer``, ``not_an_object``, ``invalid_json``, ``duplicate_id``); empty unless
            ``skip_invalid``.
        examples: The first few skip messages, each naming its file and row.
    """

    source: str
    rows_read: int = 0
    loaded: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: ``skipped 3 of 3000 rows of data/x.jsonl (2 empty, 1 no_answer); first: ...``."""
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())
        first = f"; first: {self.examples[0]}" if self.examples else ""
        return f"skipped {sum(self.skipped.values())} of {self.rows_read} rows of {self.source} ({reasons}){first}"


@dataclass(frozen=True)
class _Columns:
    problem: str
    solution: str | None
    answer: str | None
    id: str | None


class _InvalidRow(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_problems(
    source: str,
    *,
    split: str = "train",
    problem_column: str = "problem",
    solution_column: str | None = "solution",
    answer_column: str | None = "answer",
    id_column: str | None = "id",
    limit: int | None = None,
    skip_invalid: bool = False,
) -> list[Problem]:
    """Loads and validates problems; see :func:`load_problems_with_report` for the arguments."""
    problems, _ = load_problems_with_report(
        source,
        split=split,
        problem_column=problem_column,
        solution_column=solution_column,
        answer_column=answer_column,
        id_column=id_column,
        limit=limit,
        skip_invalid=skip_invalid,
    )
    return problems


def load_problems_with_report(
    source: str,
    *,
    split: str = "train",
    problem_column: str = "problem",
    solution_column: str | None = "solution",
    answer_column: str | None = "answer",
    id_column: str | None = "id",
    limit: int | None = None,
    skip_invalid: bool = False,
) -> tuple[list[Problem], LoadReport]:
    """Loads and validates problems, and reports what was skipped.

    Args:
        source: A ``.jsonl``/``.json``/``.parquet`` file, a directory of them (read in name order),
            ``synthetic:<n>`` (``n`` problems of :func:`egrsd_pl.testbed.synthetic.synthetic_problems`, seed 0;
            ``synthetic:mechanism:<n>``: of the mechanism world, :mod:`egrsd_pl.testbed.mechanism`),
            or a Hugging Face hub dataset name (``datasets.load_dataset(source, split=split)``;
            ``name@config`` picks a configuration, e.g. ``openai/gsm8k@main``).
        split: Hub split; for ``synthetic:`` the testbed split; for a JSON file holding
            ``{split: [rows]}`` the key to read.
        problem_column: Column of the problem statement (a non-empty string).
        solution_column: Column of the reference solution; ``None`` for benchmarks without one
            (the solution is then empty and the answer column is required).
        answer_column: Column of the gold answer (a string; an integer is converted). ``None``, or a
            row without it, takes the last ``\\boxed{}`` of the solution.
        id_column: Column of a row id (string or integer); ``None`` or a row without it gives
            ``<file stem>-<row>``. Ids must be unique.
        limit: Stop after this many valid problems.
        skip_invalid: Skip and count malformed rows instead of raising on the first one.

    Returns:
        The problems in source order, and the :class:`LoadReport`.

    Raises:
        DatasetError: The source cannot be read, or (without ``skip_invalid``) a row is malformed.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--data.limit must be >= 1 or null, got {limit}")
    if not problem_column:
        raise ValueError("--data.problem_column must name a column")
    columns = _Columns(problem_column, solution_column, answer_column, id_column)
    report = LoadReport(source=source)
    if source.startswith(SYNTHETIC_PREFIX):
        problems = _synthetic(source, split, limit)
        report.rows_read = report.loaded = len(problems)
        return problems, report

    problems = []
    first_row_of_id: dict[str, _Where] = {}
    for where, row in _rows(source, split):
        report.rows_read += 1
        try:
            if isinstance(row, _InvalidRow):
                raise row
            problem = _problem(row, columns, default_id=where.default_id)
            if problem.id in first_row_of_id:
                first = first_row_of_id[problem.id]
                used_by = f"row {first.row}" if first.name == where.name else f"{first.name} row {first.row}"
                raise _InvalidRow("duplicate_id", f"id {problem.id!r} was already used by {used_by}")
        except _InvalidRow as invalid:
            message = f"{where.name} row {where.row}: {invalid}"
            if not skip_invalid:
                raise DatasetError(message) from None
            report.skipped[invalid.reason] += 1
            if len(report.examples) < _MAX_EXAMPLES:
                report.examples.append(message)
            continue
        first_row_of_id[problem.id] = where
        problems.append(problem)
        if limit is not None and len(problems) >= limit:
            break
    if report.rows_read == 0:
        named = source if Path(source).exists() else f"split {split!r} of {source}"
        raise DatasetError(f"{named} is empty: it holds no rows (one problem per row is needed)")
    report.loaded = len(problems)
    if report.skipped:
        log.warning("%s (--data.skip_invalid)", report.summary())
    return problems, report


def filter_by_prompt_length(
    problems: Sequence[Problem], lengths: Sequence[int], max_prompt_tokens: int
) -> tuple[list[Problem], int]:
    """Keeps the problems whose prompt fits; over-long prompts are skipped and counted, never truncated.

    Args:
        problems: Problems in order.
        lengths: Prompt length in tokens of each problem (same order).
        max_prompt_tokens: Longest prompt kept.

    Returns:
        The kept problems (order preserved) and the number skipped.
    """
    if len(problems) != len(lengths):
        raise ValueError(f"got {len(problems)} problems but {len(lengths)} prompt lengths")
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    kept = [problem for problem, length in zip(problems, lengths, strict=True) if length <= max_prompt_tokens]
    return kept, len(problems) - len(kept)


# ---------------------------------------------------------------------- rows -> problems
def _problem(row: Any, columns: _Columns, default_id: str) -> Problem:
    if not isinstance(row, Mapping):
        raise _InvalidRow("not_an_object", f"expected an object with columns, got {type(row).__name__}")
    problem = _text(row, columns.problem, "problem_column")
    solution = _text(row, columns.solution, "solution_column") if columns.solution else ""
    answer = _answer(row, columns.answer)
    if answer is None:
        answer = extract_boxed_answer(solution)
        if not answer:
            has = (
                f"column {columns.answer!r} is missing or empty"
                if columns.answer
                else "no answer column is set"
            )
            fallback = (
                "the solution has no \\boxed{} answer" if columns.solution else "no solution column is set"
            )
            raise _InvalidRow("no_answer", f"{has} and {fallback}; set --data.answer_column")
    row_id = default_id
    if columns.id is not None and row.get(columns.id) is not None:
        value = row[columns.id]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _InvalidRow(
                "wrong_type", f"column {columns.id!r} is {type(value).__name__}, expected a string"
            )
        row_id = str(value)
    return Problem(id=row_id, problem=problem, solution=solution, answer=answer)


def _text(row: Mapping, column: str, flag: str) -> str:
    if column not in row:
        present = ", ".join(map(str, row)) or "none"
        raise _InvalidRow(
            "missing_column", f"column {column!r} is missing (columns: {present}); set --data.{flag}"
        )
    value = row[column]
    if value is None:
        raise _InvalidRow("missing_column", f"column {column!r} is null")
    if not isinstance(value, str):
        raise _InvalidRow("wrong_type", f"column {column!r} is {type(value).__name__}, expected a string")
    if not value.strip():
        raise _InvalidRow("empty", f"column {column!r} is empty")
    return value


def _answer(row: Mapping, column: str | None) -> str | None:
    """The answer column's value as a stripped string; ``None`` when absent or empty."""
    if column is None or row.get(column) is None:
        return None
    value = row[column]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _InvalidRow("wrong_type", f"column {column!r} is {type(value).__name__}, expected a string")
    return str(value).strip() or None


# ---------------------------------------------------------------------- sources -> rows
@dataclass(frozen=True)
class _Where:
    name: str  # the file (or hub source) as shown in messages
    row: int  # 1-based; the line number for JSONL
    default_id: str


def _rows(source: str, split: str) -> Iterator[tuple[_Where, Any]]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in FILE_SUFFIXES)
        if not files:
            raise DatasetError(f"{source}: no {'/'.join(FILE_SUFFIXES)} files in this directory")
        for file in files:
            yield from _file_rows(file, str(file), split)
    elif path.is_file():
        yield from _file_rows(path, source, split)
    elif path.suffix in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise DatasetError(f"{source}: no such file or directory")
    else:
        yield from _hub_rows(source, split)


def _file_rows(path: Path, name: str, split: str) -> Iterator[tuple[_Where, Any]]:
    if path.suffix == ".jsonl":
        rows: Iterable[tuple[int, Any]] = _jsonl_rows(path)
    elif path.suffix == ".json":
        rows = enumerate(_json_records(path, name, split), start=1)
    elif path.suffix == ".parquet":
        rows = enumerate(_parquet_records(path, name), start=1)
    else:
        raise DatasetError(f"{name}: unsupported file type {path.suffix!r} (use {', '.join(FILE_SUFFIXES)})")
    for row_number, row in rows:
        yield _Where(name, row_number, f"{path.stem}-{row_number}"), row


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as error:
                yield (
                    line_number,
                    _InvalidRow("invalid_json", f"not valid JSON ({error.msg} at column {error.colno})"),
                )


def _json_records(path: Path, name: str, split: str) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetError(f"{name}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if isinstance(data, Mapping) and isinstance(data.get(split), list):
        data = data[split]
    if not isinstance(data, list):
        raise DatasetError(
            f"{name}: expected a JSON list of rows (or {{{split!r}: [rows]}}), got {type(data).__name__}"
        )
    return data


def _parquet_records(path: Path, name: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as parquet

    try:
        return parquet.read_table(path).to_pylist()
    except Exception as error:  # noqa: BLE001 - any reader failure is a bad file
        raise DatasetError(f"{name}: cannot read Parquet ({type(error).__name__}: {error})") from None


def _hub_rows(source: str, split: str) -> Iterator[tuple[_Where, Any]]:
    import datasets

    path, _, config = source.partition("@")  # "openai/gsm8k@main": a dataset with named configurations
    try:
        configs = (config,) if config else ()
        dataset = datasets.load_dataset(path, *configs, split=split)
    except Exception as error:  # noqa: BLE001 - offline, unknown name, bad split: all one message
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DatasetError(
            f"{source}: cannot load split {split!r} from the Hugging Face hub ({type(error).__name__}: {detail}); "
            f"for a local file check the path"
        ) from None
    name = f"{source} [{split}]"
    for index, row in enumerate(dataset, start=1):
        yield _Where(name, index, f"{source.rsplit('/', 1)[-1]}-{split}-{index}"), row


def _synthetic(source: str, split: str, limit: int | None) -> list[Problem]:
    world_name, _, count = source[len(SYNTHETIC_PREFIX) :].rpartition(":")
    if not count.isdigit() or int(count) < 1 or world_name not in ("", "mechanism"):
        raise DatasetError(
            f"{source}: expected synthetic:<number of problems> or synthetic:mechanism:<number>, e.g. synthetic:4000"
        )
    from egrsd_pl.testbed.synthetic import Split
    from egrsd_pl.testbed.worlds import world

    n = int(count) if limit is None else min(int(count), limit)
    return world(world_name or "tiny").held_out(n, seed=0, split=cast(Split, split))

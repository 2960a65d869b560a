"""Problem loading: local files, the shared training data, validation errors, skipping, hub errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from egrsd_pl.problem import Problem
from egrsd_pl.problem_sources import (
    DatasetError,
    filter_by_prompt_length,
    load_problems,
    load_problems_with_report,
)
from egrsd_pl.rewards import extract_boxed_answer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


GOOD = {"id": "a", "problem": "1 + 1?", "solution": "It is \\boxed{2}.", "answer": "2"}


# ---------------------------------------------------------------------- the shared training data
@pytest.mark.parametrize("name", ["math_train.jsonl", "gsm8k_train.jsonl"])
def test_training_files_load_with_their_answers(name):
    path = DATA / "train" / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    problems = load_problems(str(path))
    assert len(problems) == 3000  # train/README.md: 3000 rows each
    assert len({p.id for p in problems}) == 3000
    assert all(p.answer == extract_boxed_answer(p.solution) for p in problems)
    # without the answer column the gold comes from the solution's last \boxed{}, identically
    derived = load_problems(str(path), answer_column=None)
    assert [p.answer for p in derived] == [p.answer for p in problems]


def test_benchmark_without_solutions_loads_with_solution_column_none():
    path = DATA / "bench" / "aime25.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    problems = load_problems(str(path), solution_column=None)
    assert len(problems) == 30
    assert problems[0].id == "aime25-I-1" and problems[0].solution == ""


# ---------------------------------------------------------------------- formats and columns
def test_jsonl_json_parquet_and_directory(tmp_path):
    rows = [GOOD, {**GOOD, "id": "b", "problem": "2 + 2?", "answer": "4"}]
    _write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps({"train": [{**GOOD, "id": "c"}], "test": []}))
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    parquet.write_table(pyarrow.Table.from_pylist([{**GOOD, "id": "d"}]), tmp_path / "c.parquet")
    assert [p.id for p in load_problems(str(tmp_path / "a.jsonl"))] == ["a", "b"]
    assert [p.id for p in load_problems(str(tmp_path / "b.json"))] == ["c"]
    assert load_problems(str(tmp_path / "c.parquet")) == [Problem("d", "1 + 1?", "It is \\boxed{2}.", "2")]
    assert [p.id for p in load_problems(str(tmp_path))] == ["a", "b", "c", "d"]  # files in name order
    assert [p.id for p in load_problems(str(tmp_path), limit=3)] == ["a", "b", "c"]


def test_configurable_columns_generated_ids_and_boxed_gold(tmp_path):
    path = _write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"question": "x?", "worked": "so \\boxed{\\frac{1}{2}}"},
            {"question": "y?", "worked": "\\boxed{3}", "n": 7},
        ],
    )
    problems = load_problems(str(path), problem_column="question", solution_column="worked", id_column="n")
    assert problems == [
        Problem("q-1", "x?", "so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # id from the line number
        Problem("7", "y?", "\\boxed{3}", "3"),  # integer id converted
    ]


def test_integer_answers_are_converted(tmp_path):
    path = _write_jsonl(tmp_path / "aime.jsonl", [{"id": 1, "problem": "p", "answer": 204}])
    assert load_problems(str(path), solution_column=None) == [Problem("1", "p", "", "204")]


def test_synthetic_source():
    pytest.importorskip("egrsd_pl.testbed.synthetic")
    problems = load_problems("synthetic:5", limit=3)
    assert len(problems) == 3
    assert all(p.answer == extract_boxed_answer(p.solution) for p in problems)
    with pytest.raises(DatasetError, match="synthetic:<number of problems>"):
        load_problems("synthetic:many")


# ---------------------------------------------------------------------- malformed rows
@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"question": "q", "answer": "1"},
            "bad.jsonl row 2: column 'problem' is missing (columns: question, answer); set --data.problem_column",
        ),
        ({**GOOD, "problem": "   "}, "bad.jsonl row 2: column 'problem' is empty"),
        ({**GOOD, "problem": 17}, "bad.jsonl row 2: column 'problem' is int, expected a string"),
        ({**GOOD, "solution": None}, "bad.jsonl row 2: column 'solution' is null"),
        ({**GOOD, "answer": [2]}, "bad.jsonl row 2: column 'answer' is list, expected a string"),
        (
            {"id": "z", "problem": "p", "solution": "no box here"},
            "bad.jsonl row 2: column 'answer' is missing or empty and the solution has no \\boxed{} answer",
        ),
        (["not", "an", "object"], "bad.jsonl row 2: expected an object with columns, got list"),
        ('{"problem": "p",', "bad.jsonl row 2: not valid JSON"),
        (GOOD, "bad.jsonl row 2: id 'a' was already used by row 1"),
    ],
)
def test_malformed_rows_name_the_file_and_row(tmp_path, row, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [GOOD, row])
    with pytest.raises(DatasetError) as error:
        load_problems(str(path))
    assert str(error.value).startswith(str(path)[: -len("bad.jsonl")] + message)


def test_benchmark_rows_need_an_answer_without_a_solution_column(tmp_path):
    path = _write_jsonl(tmp_path / "bench.jsonl", [{"id": "1", "problem": "p", "answer": ""}])
    with pytest.raises(
        DatasetError, match=r"row 1: column 'answer' is missing or empty and no solution column is set"
    ):
        load_problems(str(path), solution_column=None)


def test_duplicate_ids_across_files_name_both(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [GOOD])
    _write_jsonl(tmp_path / "b.jsonl", [{**GOOD, "id": "x"}, GOOD])
    with pytest.raises(DatasetError) as error:
        load_problems(str(tmp_path))
    assert (
        str(error.value)
        == f"{tmp_path / 'b.jsonl'} row 2: id 'a' was already used by {tmp_path / 'a.jsonl'} row 1"
    )


def test_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n\n" + json.dumps({**GOOD, "id": "b", "problem": ""}) + "\n")
    with pytest.raises(DatasetError, match=r"gaps.jsonl row 4: column 'problem' is empty"):
        load_problems(str(path))


def test_skip_invalid_counts_and_reports(tmp_path, caplog):
    rows = [
        GOOD,
        {**GOOD, "id": "b", "problem": ""},  # empty
        {**GOOD, "id": "c", "problem": ""},  # empty
        '{"broken',  # invalid_json
        {"id": "d", "problem": "p", "solution": "no box"},  # no_answer
        {**GOOD, "id": "e"},
    ]
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="egrsd_pl.problem_sources"):
        problems, report = load_problems_with_report(str(path), skip_invalid=True)
    assert [p.id for p in problems] == ["a", "e"]
    assert (report.rows_read, report.loaded) == (6, 2)
    assert dict(report.skipped) == {"empty": 2, "invalid_json": 1, "no_answer": 1}
    assert report.examples[0] == f"{path} row 2: column 'problem' is empty"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one summary, not one line per row
    assert warnings[0].startswith(f"skipped 4 of 6 rows of {path} (2 empty, 1 invalid_json, 1 no_answer)")


# ---------------------------------------------------------------------- sources that cannot be read
def test_missing_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DatasetError, match="no such file or directory"):
        load_problems(str(tmp_path / "nope.jsonl"))


def test_unreadable_json_file(tmp_path):
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(DatasetError, match=r"x.json: not valid JSON"):
        load_problems(str(tmp_path / "x.json"))


def test_hub_config_after_at_sign_is_passed_to_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(*args, split):
        calls.append((args, split))
        return [{"question": "1+1?", "answer": "2"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    problems = load_problems(
        "openai/gsm8k@main", split="test", problem_column="question", solution_column=None
    )
    assert calls == [(("openai/gsm8k", "main"), "test")]
    assert [(p.problem, p.answer) for p in problems] == [("1+1?", "2")]


def test_hub_error_is_one_clear_line(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetError) as error:
        load_problems("siyanzhao/Openthoughts_math_30k_opsd")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "siyanzhao/Openthoughts_math_30k_opsd: cannot load split 'train' from the Hugging Face hub"
    )
    assert "ConnectionError" in message


def test_hub_rows_take_the_gold_from_the_solution(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [{"problem": "p1", "solution": "so \\boxed{12}"}, {"problem": "p2", "solution": "\\boxed{x+1}"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: rows)  # OPSD's columns: no answer
    problems = load_problems("siyanzhao/Openthoughts_math_30k_opsd")
    assert [(p.id, p.answer) for p in problems] == [
        ("Openthoughts_math_30k_opsd-train-1", "12"),
        ("Openthoughts_math_30k_opsd-train-2", "x+1"),
    ]


def test_limit_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="--data.limit"):
        load_problems(str(_write_jsonl(tmp_path / "a.jsonl", [GOOD])), limit=0)


# ---------------------------------------------------------------------- prompt length
def test_filter_by_prompt_length_skips_and_counts():
    problems = [Problem(str(i), "p", "s", "1") for i in range(4)]
    kept, skipped = filter_by_prompt_length(problems, [10, 300, 256, 257], max_prompt_tokens=256)
    assert [p.id for p in kept] == ["0", "2"]  # 10 and 256 fit; 300 and 257 do not
    assert skipped == 2
    with pytest.raises(ValueError, match="prompt lengths"):
        filter_by_prompt_length(problems, [1, 2], max_prompt_tokens=256)

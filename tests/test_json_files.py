"""Every JSON file the package writes is strict JSON (``null`` for an undefined number, never ``NaN``)."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Any

import pytest

from egrsd_pl.evaluation import BenchmarkScores, EvalResult, load_history, write_report
from egrsd_pl.json_files import dumps, finite_or_none, write_json
from egrsd_pl.rollout.base import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]


def _reject(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


def strict_load(text: str) -> Any:
    """What ``JSON.parse`` accepts: Python's parser with ``NaN`` / ``Infinity`` / ``-Infinity`` refused."""
    return json.loads(text, parse_constant=_reject)


def test_the_strict_parser_refuses_what_python_writes_by_default():
    with pytest.raises(ValueError, match="not JSON: NaN"):
        strict_load(json.dumps({"x": math.nan}))
    with pytest.raises(ValueError, match="not JSON: -Infinity"):
        strict_load(json.dumps([-math.inf]))


def test_non_finite_numbers_become_null_at_any_depth():
    value = {"a": math.nan, "b": [math.inf, 1.5, (2, -math.inf)], "c": {"d": "NaN", "e": None, "f": True}}
    expected = {"a": None, "b": [None, 1.5, [2, None]], "c": {"d": "NaN", "e": None, "f": True}}
    assert finite_or_none(value) == expected
    assert strict_load(dumps(value)) == expected
    assert dumps({"x": [math.nan, 0.25]}) == '{"x": [null, 0.25]}'
    assert dumps({"t": "é"}) == '{"t": "\\u00e9"}' and dumps({"t": "é"}, ensure_ascii=False) == '{"t": "é"}'


def test_write_json_is_indented_strict_json(tmp_path: Path):
    path = write_json(tmp_path / "x.json", {"selectivity": math.nan, "n": 3})
    assert path.read_text() == '{\n  "selectivity": null,\n  "n": 3\n}\n'


def test_an_evaluation_report_with_an_undefined_eff_is_strict_json_and_reads_back(tmp_path: Path):
    # No completion tokens: AvgLen 0, so Eff = Acc / (AvgLen / 1000) is undefined (NaN in memory).
    sampling = SamplingConfig(temperature=1.0, num_rollouts=1, max_new_tokens=8)
    result = EvalResult(
        k=1, benchmarks={"a": BenchmarkScores(0.0, 0.0, 0.0, 0.0, 1, 1)}, samples=[], sampling=sampling
    )
    assert math.isnan(result.eff)
    paths = write_report(result, tmp_path / "base", step=0)
    summary = strict_load(paths["json"].read_text())
    assert summary["eff"] is None and summary["avg_len"] == 0.0
    for line in paths["completions"].read_text().splitlines():
        strict_load(line)
    assert [(p.label, p.avg, p.avg_len) for p in load_history(tmp_path)] == [("step_000000", 0.0, 0.0)]


# Serialisation that is not a file of ours: the answer checker's pipe protocol (strings and booleans),
# and list/dict values written as command-line arguments of `egrsd compare`'s runs.
NOT_FILES = {"egrsd_pl/verification_worker.py", "egrsd_pl/compare/methods.py"}


def json_dump_calls(path: Path) -> list[int]:
    """Lines of ``json.dump(...)`` / ``json.dumps(...)`` calls in ``path``."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"dump", "dumps"}
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "json"
        ):
            lines.append(node.lineno)
    return lines


def test_every_json_the_package_writes_goes_through_the_strict_helper():
    sources = [*(ROOT / "egrsd_pl").rglob("*.py"), *(ROOT / "callbacks").rglob("*.py")]
    offenders = {
        str(path.relative_to(ROOT)): lines
        for path in sources
        if (lines := json_dump_calls(path))
        and str(path.relative_to(ROOT)) not in NOT_FILES | {"egrsd_pl/json_files.py"}
    }
    assert offenders == {}, "write JSON with egrsd_pl.json_files.dumps / write_json"

"""``egrsd compare`` without training: seed statistics, the Pareto frontier, the tables, methods files and
the commands of pending runs, on hand-made ``results.json`` files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from egrsd_pl.cli import main as egrsd_main
from egrsd_pl.cli import parse_error
from egrsd_pl.compare import main as compare_main
from egrsd_pl.compare.aggregate import (
    SeedStat,
    pareto_frontier,
    read_result,
    seed_stat,
    summarize,
    token_efficiency,
)
from egrsd_pl.compare.methods import Method, MethodsError, check_methods, override_args, read_methods
from egrsd_pl.compare.report import (
    accuracy_table,
    difference_table,
    efficiency_table,
    label_offsets,
    write_comparison,
)
from egrsd_pl.compare.runner import Plan, execute
from egrsd_pl.compare.significance import holm_adjust, welch_difference

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
METHOD_FILES = sorted((ROOT / "configs" / "compare").glob("*.yaml"))
OVERLAYS = {"tiny.yaml": "tiny_vllm.yaml", "mechanism_run.yaml": "mechanism.yaml"}  # overlay: its base config

# Hand-made evaluations: (synthetic avg@4, gsm8k avg@4, synthetic len, gsm8k len) per seed.
# no_train: Avg. 60, 64 -> mean 62, std sqrt((2² + 2²) / 1) = 2.828; AvgLen 200, 220 -> 210 ± 14.14;
#           Eff 60 / 0.2 = 300 and 64 / 0.22 = 290.909 -> 295.45 ± 9.0909 / sqrt(2) = 6.43.
# egrsd:    Avg. 65, 67, 69 -> 67 ± 2; AvgLen 150 each -> 150 ± 0; Eff 433.33, 446.67, 460 -> 446.67 ± 13.33.
# sft:      Avg. 40, AvgLen 50 (both seeds) -> Eff 800; shortest, so on the frontier.
# grpo:     one seed, Avg. 67 at AvgLen 200: as accurate as EGRSD but longer -> dominated; std undefined.
RESULTS = {
    "no_train": {0: (70, 50, 100, 300), 1: (74, 54, 120, 320)},
    "egrsd": {0: (80, 50, 90, 210), 1: (82, 52, 100, 200), 2: (84, 54, 110, 190)},
    "sft": {0: (50, 30, 50, 50), 1: (50, 30, 50, 50)},
    "grpo": {0: (80, 54, 150, 250)},
}
METHODS = [
    ("no_train", "no-train", False),
    ("sft", "SFT", True),
    ("grpo", "GRPO", True),
    ("egrsd", "EGRSD", True),
]


def results_json(synthetic: float, gsm8k: float, len_synthetic: float, len_gsm8k: float) -> dict:
    """What ``main.py validate`` writes (only the keys the comparison reads, plus one it ignores)."""
    benchmarks = {
        "synthetic": {"avg_at_k": synthetic, "mean_length": len_synthetic, "truncated": 0.0},
        "gsm8k": {"avg_at_k": gsm8k, "mean_length": len_gsm8k, "truncated": 0.0},
    }
    avg, avg_len = (synthetic + gsm8k) / 2, (len_synthetic + len_gsm8k) / 2
    return {"label": "last", "step": 60, "k": 4, "avg": avg, "avg_len": avg_len, "benchmarks": benchmarks}


def reject_constant(name: str) -> float:
    raise AssertionError(f"comparison.json holds {name}: not strict JSON")


def write_results(root: Path) -> dict[str, list]:
    results: dict[str, list] = {}
    for method, seeds in RESULTS.items():
        for seed, values in seeds.items():
            path = root / method / f"seed_{seed}" / "eval" / "last" / "results.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(results_json(*values)))
            results.setdefault(method, []).append(read_result(path, method, seed))
    return results


def test_seed_stat_is_mean_and_sample_std():
    assert seed_stat([60, 62, 64]) == (62.0, 2.0, 3)  # sqrt((4 + 0 + 4) / 2) = 2
    one = seed_stat([5.0])
    assert one.mean == 5.0 and math.isnan(one.std) and one.n == 1
    assert token_efficiency(67.24, 11064) == pytest.approx(6.077, abs=1e-3)  # the paper's EGRSD Eff 6.08


@pytest.mark.parametrize(
    ("values", "reference"),
    [([65, 67, 69], [60, 64]), ([40, 41], [60, 64]), ([1.5, 9.0, 3.25, 4.0], [2.0, 2.5, 2.25])],
)
def test_welch_difference_matches_scipy_on_the_raw_values(values: list[float], reference: list[float]):
    # independent computation: scipy's Welch test on the per-seed values (not on mean, std, n)
    expected = stats.ttest_ind(values, reference, equal_var=False)
    interval = expected.confidence_interval(0.95)
    got = welch_difference(seed_stat(values), seed_stat(reference))
    assert got.p_value == pytest.approx(expected.pvalue, rel=1e-9)
    assert got.df == pytest.approx(expected.df, rel=1e-9)
    assert (got.low, got.high) == (
        pytest.approx(interval.low, rel=1e-9),
        pytest.approx(interval.high, rel=1e-9),
    )
    assert (got.n, got.n_reference) == (len(values), len(reference))


def test_welch_difference_hand_checked_and_edge_cases():
    # the docstring's example: se² = 4/3 + 8/2, df = 5.333² / ((4/3)²/2 + 4²/1) = 1.684, t = 5 / 2.309 = 2.165
    d = welch_difference(SeedStat(67, 2, 3), SeedStat(62, 8**0.5, 2))
    assert (d.delta, d.se, d.df) == (5, pytest.approx(5.3333**0.5, abs=1e-4), pytest.approx(1.6842, abs=1e-4))
    assert d.p_value == pytest.approx(0.1861, abs=1e-4) and not d.exact
    # no spread on one side: Welch is defined, df = n_other - 1 = 1 (a Cauchy): p = 1 - 2 atan(11) / pi
    one_sided = welch_difference(SeedStat(40, 0, 2), SeedStat(62, 8**0.5, 2))
    assert one_sided.df == 1 and one_sided.p_value == pytest.approx(
        1 - 2 * math.atan(11) / math.pi, rel=1e-12
    )
    assert one_sided.high - one_sided.delta == pytest.approx(2 * math.tan(0.475 * math.pi), rel=1e-12)
    # no spread on either side: the difference is exact (p 0, CI [Δ, Δ]); equal means: p 1
    exact = welch_difference(SeedStat(50, 0, 2), SeedStat(150, 0, 3))
    assert exact.exact and (exact.delta, exact.low, exact.high, exact.p_value) == (-100, -100, -100, 0)
    assert math.isnan(exact.df)
    same = welch_difference(SeedStat(7, 0, 2), SeedStat(7, 0, 2))
    assert same.exact and (same.delta, same.p_value) == (0, 1)
    # one seed on either side: no test, the difference of means only
    for lonely in (welch_difference(SeedStat(67, math.nan, 1), SeedStat(62, 2, 3)),
                   welch_difference(SeedStat(67, 2, 3), SeedStat(62, math.nan, 1))):  # fmt: skip
        assert lonely.delta == 5 and not lonely.exact
        assert all(math.isnan(v) for v in (lonely.se, lonely.df, lonely.low, lonely.high, lonely.p_value))
    assert math.isnan(welch_difference(SeedStat(math.nan, math.nan, 0), SeedStat(62, 2, 3)).delta)


def test_holm_adjust_hand_checked():
    # m = 3 defined: sorted 0.01, 0.03, 0.04 -> 3 · 0.01 = 0.03; 2 · 0.03 = 0.06; max(0.06, 1 · 0.04) = 0.06
    adjusted = holm_adjust([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06)]
    assert math.isnan(adjusted[3])
    assert holm_adjust([0.6, 0.5]) == [1.0, 1.0]  # 2 · 0.5 = 1; capped at 1, monotone
    assert holm_adjust([0.0, 0.2]) == [0.0, 0.2] and holm_adjust([]) == []


def test_pareto_frontier_higher_accuracy_lower_length():
    points = {"a": (60, 100), "b": (62, 120), "c": (59, 110), "d": (62, 130), "e": (math.nan, 10)}
    # c: a is more accurate and shorter; d: b ties on accuracy and is shorter; e has no accuracy.
    assert pareto_frontier(points) == {"a", "b"}
    assert pareto_frontier({"x": (1, 1), "y": (1, 1)}) == {"x", "y"}  # equal points do not dominate


def test_summaries_hand_checked(tmp_path: Path):
    summaries = {s.name: s for s in summarize(METHODS, write_results(tmp_path))}
    no_train, egrsd, sft, grpo = (summaries[n] for n in ("no_train", "egrsd", "sft", "grpo"))
    assert no_train.avg.mean == 62 and no_train.avg.std == pytest.approx(2.828427, abs=1e-6)
    assert no_train.avg_len.mean == 210 and no_train.avg_len.std == pytest.approx(14.142136, abs=1e-6)
    assert no_train.eff.mean == pytest.approx(295.4545, abs=1e-4)
    assert no_train.eff.std == pytest.approx(6.4282, abs=1e-4)
    assert egrsd.accuracy["synthetic"] == (82, 2, 3) and egrsd.accuracy["gsm8k"] == (52, 2, 3)
    assert (egrsd.avg.mean, egrsd.avg.std, egrsd.avg_len.std) == (67, 2, 0)
    assert egrsd.eff.mean == pytest.approx(446.6667, abs=1e-4) and egrsd.eff.std == pytest.approx(
        13.3333, abs=1e-4
    )
    assert sft.eff.mean == 800 and grpo.avg.n == 1 and math.isnan(grpo.avg.std)
    assert {n for n, s in summaries.items() if s.on_frontier} == {"egrsd", "sft"}
    assert egrsd.seeds == [0, 1, 2]


def test_markdown_tables_hand_checked(tmp_path: Path):
    summaries = summarize(METHODS, write_results(tmp_path / "runs"))
    table2 = accuracy_table(summaries).splitlines()
    assert table2[0] == "| Method | seeds | synthetic avg@4 | gsm8k avg@4 | Avg. |"
    assert "| EGRSD | 3 | 82.00 ± 2.00 | 52.00 ± 2.00 | 67.00 ± 2.00 |" in table2
    assert "| GRPO | 1 | 80.00 | 54.00 | 67.00 |" in table2  # one seed: no spread to show
    table5 = efficiency_table(summaries).splitlines()
    assert "| EGRSD | 3 | 67.00 ± 2.00 | 150.0 ± 0.0 | 446.67 ± 13.33 | ● |" in table5
    assert "| no-train | 2 | 62.00 ± 2.83 | 210.0 ± 14.1 | 295.45 ± 6.43 |  |" in table5
    # Against no-train, one table per metric, Holm over the methods of each table (GRPO, one seed, has no test
    # and is not counted: m = 2). Acc: SFT 40 - 62 = -22 with no spread of its own, se = sqrt(0 + 2.828²/2) = 2,
    # df = n_ref - 1 = 1 (a Cauchy: p = 1 - 2 atan(|t|) / pi, t_0.975 = tan(0.475 pi) = 12.706):
    # t = -11, p = 1 - 2 atan(11) / pi = 0.0577, CI -22 ± 25.41 = [-47.41, +3.41]; EGRSD (the docstring
    # example of welch_difference) p 0.186, CI [-6.95, +16.95]. Holm: 2 · 0.0577 = 0.115, max(0.115, 0.186).
    # AvgLen: SFT 50 - 210 = -160, se 10, df 1, t = -16, p = 1 - 2 atan(16) / pi = 0.0397 -> Holm 0.079;
    # EGRSD -60, t = -6, p = 0.105, CI -60 ± 127.06. Eff (scipy: EGRSD p 0.00052, SFT 0.00574): Holm
    # 2 · 0.00052 = 0.00104 and max(0.00104, 1 · 0.00574) = 0.00574: both marked.
    differences = difference_table(summaries).splitlines()
    assert differences[0].startswith("Against no-train (Δ = method − no-train over seeds; 95 % CI")
    assert "| Method | seeds | Δ Acc | 95 % CI | p | p (Holm) |" in differences
    assert "| SFT | 2 vs 2 | -22.00 | [-47.41, +3.41] | 0.058 | 0.115 |" in differences
    assert "| GRPO | 1 vs 2 | +5.00 | — | — | — |" in differences  # one seed: no test, never NaN
    assert "| EGRSD | 3 vs 2 | +5.00 | [-6.95, +16.95] | 0.186 | 0.186 |" in differences
    assert "| SFT | 2 vs 2 | -160.0 | [-287.1, -32.9] | 0.040 | 0.079 |" in differences
    assert "| EGRSD | 3 vs 2 | -60.0 | [-187.1, +67.1] | 0.105 | 0.105 |" in differences
    assert "| EGRSD | 3 vs 2 | +151.21 | [+122.35, +180.07] | <0.001 | 0.001 * |" in differences
    assert "| SFT | 2 vs 2 | +504.55 | [+446.79, +562.30] | 0.006 | 0.006 * |" in differences
    # Against EGRSD (--reference egrsd): SFT Acc -27, se = sqrt(0 + 2²/3) = 1.1547, df = 3 - 1 = 2, t = -23.38;
    # with 2 df p = 1 - |t| / sqrt(t² + 2) = 1 - 23.383 / 23.425 = 0.0018, t_0.975 = 4.303, CI -27 ± 4.97;
    # Holm 2 · 0.0018 = 0.004 < 0.05: marked. SFT AvgLen: 50 - 150 with no spread on either side: exact, p 0.
    against = difference_table(summaries, "egrsd").splitlines()
    assert against[0].startswith("Against EGRSD (Δ = method − EGRSD")
    assert "| SFT | 2 vs 3 | -27.00 | [-31.97, -22.03] | 0.002 | 0.004 * |" in against
    assert "| no-train | 2 vs 3 | -5.00 | [-16.95, +6.95] | 0.186 | 0.186 |" in against
    assert "| SFT | 2 vs 3 | -100.0 | exact | 0 | 0 * |" in against
    assert "| no-train | 2 vs 3 | +60.0 | [-67.1, +187.1] | 0.105 | 0.105 |" in against
    assert not any(line.startswith("| EGRSD |") for line in against)
    assert difference_table(summaries, "ppo") == ""  # no such method: no table
    paths = write_comparison(
        summaries, tmp_path, command="egrsd compare …", pending=1, reference="egrsd", seeds=[0, 1, 2]
    )
    assert "Against EGRSD" in paths["markdown"].read_text()
    data = json.loads(
        paths["json"].read_text(), parse_constant=reject_constant
    )  # strict: no NaN, no Infinity
    assert set(data["differences"]) == {"no_train", "egrsd"}
    sft = data["differences"]["egrsd"]["methods"]["sft"]
    assert sft["avg"]["p_value"] == pytest.approx(0.0018, abs=1e-4) and sft["avg"]["significant"] is True
    assert (sft["avg"]["n"], sft["avg"]["n_reference"]) == (2, 3)
    assert sft["avg_len"] == {
        "delta": -100.0, "se": 0.0, "df": None, "ci_low": -100.0, "ci_high": -100.0, "p_value": 0.0,
        "p_holm": 0.0, "n": 2, "n_reference": 3, "exact": True, "significant": True,
    }  # fmt: skip
    grpo = data["differences"]["egrsd"]["methods"]["grpo"]["avg"]
    assert grpo["delta"] == 0 and grpo["p_value"] is grpo["ci_low"] is grpo["p_holm"] is None
    assert data["methods"]["egrsd"]["eff"]["mean"] == pytest.approx(446.6667, abs=1e-4)
    assert data["methods"]["grpo"]["avg"]["std"] is None  # JSON has no NaN
    assert [Path(r["run_dir"]).name for r in data["methods"]["egrsd"]["runs"]] == [
        "seed_0",
        "seed_1",
        "seed_2",
    ]
    assert "1 run(s) are not finished" in paths["markdown"].read_text()
    assert paths["plot"].stat().st_size > 0


def test_reference_that_is_already_the_default_is_reported_once(tmp_path: Path):
    # Without an untrained method the default reference is the first trained one; --reference naming it
    # (a gamma sweep against RLSD) gave the same "Against ..." block twice in comparison.md.
    trained = [m for m in METHODS if m[0] != "no_train"]
    results = write_results(tmp_path / "runs")
    summaries = summarize(trained, {name: results[name] for name, _, _ in trained})
    paths = write_comparison(summaries, tmp_path, command="egrsd compare …", pending=0, reference="sft")
    markdown = paths["markdown"].read_text()
    assert markdown.count("Against SFT (") == 1
    assert set(json.loads(paths["json"].read_text())["differences"]) == {"sft"}
    paths = write_comparison(summaries, tmp_path, command="egrsd compare …", pending=0, reference="egrsd")
    markdown = paths["markdown"].read_text()  # another reference: both blocks, each once
    assert markdown.count("Against SFT (") == 1 and markdown.count("Against EGRSD (") == 1


def test_runs_of_one_method_must_share_benchmarks(tmp_path: Path):
    results = write_results(tmp_path)
    results["egrsd"][1] = results["egrsd"][1]._replace(accuracy={"synthetic": 1.0})
    with pytest.raises(ValueError, match="must share the evaluation"):
        summarize(METHODS, results)


def test_override_args_spell_yaml_values_for_the_cli():
    args = override_args({"model.gamma": 0.3, "evaluation.at_end": False, "x.y": None, "b": [{"name": "s"}]})
    assert args == [
        "--model.gamma",
        "0.3",
        "--evaluation.at_end",
        "false",
        "--x.y",
        "null",
        "--b",
        '[{"name": "s"}]',
    ]


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: p.name)
def test_shipped_methods_files_name_their_command_and_parse(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# egrsd compare --config configs/") and f"configs/compare/{path.name}" in first
    if path.name in OVERLAYS:  # an overlay of a base config, not a methods file
        base = ["--config", str(ROOT / "configs" / OVERLAYS[path.name]), "--config", str(path)]
        assert check_methods(path, [Method("m", "m")], base, parse_error) is None
        return
    methods = read_methods(path)
    check_methods(path, methods, ["--config", TINY], parse_error)


def test_paper_methods_are_the_papers():
    methods = {m.name: m for m in read_methods(ROOT / "configs" / "compare" / "paper.yaml")}
    assert list(methods) == ["no_train", "sft", "grpo", "opsd", "crisp", "rlsd", "egrsd", "cl_egrsd"]
    assert not methods["no_train"].fit
    assert methods["egrsd"].overrides == {"model.objective": "egrsd", "model.gamma": 0.3, "model.window": 0}
    assert methods["cl_egrsd"].overrides["model.window"] == 3
    gammas = [m.overrides["model.gamma"] for m in read_methods(ROOT / "configs" / "compare" / "gamma.yaml")]
    assert gammas == [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9]  # Table 4's rows


def test_mechanism_methods_are_issue_21s_and_the_sweep_reuses_their_runs():
    compare = ROOT / "configs" / "compare"
    methods = {m.name: m for m in read_methods(compare / "mechanism.yaml")}
    assert list(methods) == ["no_train", "rlsd", "egrsd", "cl_egrsd_w3", "cl_egrsd_w5"]
    assert not methods["no_train"].fit
    gates = {
        n: (m.overrides["model.gamma"], m.overrides["model.window"]) for n, m in methods.items() if m.fit
    }
    assert gates == {"rlsd": (0.0, 0), "egrsd": (0.3, 0), "cl_egrsd_w3": (0.3, 3), "cl_egrsd_w5": (0.3, 5)}
    sweep = {m.name: m for m in read_methods(compare / "mechanism_gamma.yaml")}
    assert [m.overrides["model.gamma"] for m in sweep.values()] == [0.0, 0.3, 0.6, 0.9]
    for shared in ("rlsd", "egrsd"):  # same name and overrides: the same run folder, reused by the sweep
        assert sweep[shared].args() == methods[shared].args()


@pytest.mark.parametrize(
    ("spec", "key", "message"),
    [
        ("egrsd: {model.objective: egrsd, model.gama: 0.3}", "model.gama", "gama"),
        ("egrsd: {model.objective: ppo}", "model.objective", "ppo"),
    ],
)
def test_bad_methods_file_fails_before_any_run(tmp_path: Path, capsys, spec: str, key: str, message: str):
    path = tmp_path / "bad.yaml"
    path.write_text(f"methods:\n  no_train: {{fit: false}}\n  {spec}\n")
    with pytest.raises(MethodsError) as error:
        check_methods(path, read_methods(path), ["--config", TINY], parse_error)
    text = str(error.value)
    assert text.startswith(f"{path}: method 'egrsd': key '{key}':") and message in text
    assert "\n" not in text
    with pytest.raises(SystemExit) as status:  # through `egrsd compare`, as a user runs it
        egrsd_main(
            [
                "compare",
                "--config",
                TINY,
                "--methods",
                str(path),
                "--output",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
    assert status.value.code == 2 and not (tmp_path / "out").exists()  # nothing ran, nothing written
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {text}"]


def test_labels_of_methods_on_top_of_each_other_are_stacked():
    # span 100 x 100: (50, 50), (51, 51) and (49, 52) lie within 4 of the first; (10, 90) is alone
    assert label_offsets([(0, 0), (50, 50), (51, 51), (49, 52), (100, 100), (10, 90)]) == [
        5,
        5,
        -6,
        -17,
        5,
        5,
    ]


def test_reference_must_be_a_compared_method(tmp_path: Path, capsys):
    paper = str(ROOT / "configs" / "compare" / "paper.yaml")
    with pytest.raises(SystemExit) as status:
        egrsd_main(["compare", "--config", TINY, "--methods", paper, "--only", "egrsd", "--reference", "rlsd",
                    "--output", str(tmp_path / "out"), "--collect"])  # fmt: skip
    assert status.value.code == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err.strip() == f"error: --reference rlsd: not a compared method of {paper}"


def test_methods_file_shape_errors(tmp_path: Path):
    path = tmp_path / "m.yaml"
    for text, expected in [
        ("egrsd: {}\n", "expected a non-empty mapping"),
        ("methods:\n  a: {fit: maybe}\n", "key 'fit' must be true or false"),
        ("methods:\n  a/b: {}\n", "a name is letters"),
        ("methods:\n  a: {ckpt_path: x}\n", "set by egrsd compare"),
        ("methods:\n  a: {label: X}\n  b: {label: X}\n", "label 'X' is used by more than one method"),
    ]:
        path.write_text(text)
        with pytest.raises(MethodsError, match=expected):
            read_methods(path)


def test_commands_and_pending_runs(tmp_path: Path):
    plan = Plan(
        config="configs/tiny.yaml", output=tmp_path, common=["--trainer.max_steps", "3"], python="python"
    )
    methods = [
        Method("no_train", "no-train", fit=False),
        Method("egrsd", "EGRSD", overrides={"model.gamma": 0.5}),
    ]
    runs = plan.runs(methods, [0, 1])
    assert [r.name for r in runs] == ["no_train/seed_0", "egrsd/seed_0", "no_train/seed_1", "egrsd/seed_1"]
    fit = plan.fit_command(runs[3])
    assert fit[:6] == ["python", "-m", "egrsd_pl.cli", "fit", "--config", "configs/tiny.yaml"]
    # the common overrides come before the method's (a method is more specific), the run's own flags last
    assert fit.index("--trainer.max_steps") < fit.index("--model.gamma") < fit.index("--seed_everything")
    assert fit[fit.index("--seed_everything") + 1] == "1" and fit[-2:] == ["--ckpt_path", "last"]
    validate = plan.validate_command(runs[3])
    assert validate[validate.index("--ckpt_path") + 1] == str(
        tmp_path / "runs/egrsd/seed_1/checkpoints/last.ckpt"
    )
    assert "--ckpt_path" not in plan.validate_command(runs[0])  # no_train evaluates the base model
    assert [kind for kind, _ in plan.pending_commands(runs[1])] == ["fit", "validate"]
    assert [kind for kind, _ in plan.pending_commands(runs[0])] == ["validate"]
    runs[1].directory.mkdir(parents=True)
    runs[1].fit_done_path.write_text("done\n")
    assert [kind for kind, _ in plan.pending_commands(runs[1])] == ["validate"]
    runs[2].results_path.parent.mkdir(parents=True)
    runs[2].results_path.write_text("{}")
    assert runs[2].status() == "done" and plan.pending_commands(runs[2]) == []
    line = plan.shell_line(runs[1], Path("/some/where"))
    assert line.startswith("cd /some/where && python -m egrsd_pl.cli validate ") and " fit " not in line


def test_a_run_started_with_other_settings_is_not_reused(tmp_path: Path):
    method = Method("egrsd", "EGRSD", overrides={"model.gamma": 0.3})
    plan = Plan(config="configs/tiny.yaml", output=tmp_path, common=["--trainer.max_steps", "3"])
    run = plan.runs([method], [0])[0]
    run.directory.mkdir(parents=True)
    run.settings_path.write_text(json.dumps(plan.settings(run)))
    plan.check_settings([run])  # same command: resumes
    other = Plan(config="configs/tiny.yaml", output=tmp_path, common=["--trainer.max_steps", "5"])
    with pytest.raises(ValueError, match=r"egrsd/seed_0: started with other common .*another --output"):
        other.check_settings([run])
    changed = Method("egrsd", "EGRSD", overrides={"model.gamma": 0.5})
    with pytest.raises(ValueError, match="started with other method"):
        plan.check_settings(plan.runs([changed], [0]))


class FakeSubprocesses:
    """Stands in for :func:`egrsd_pl.compare.runner.run_logged`: records each command and does what its
    ``fit``/``validate`` would leave on disk, without a model.

    ``fit`` writes ``epoch=0-step=S.ckpt`` every ``--checkpoint.every_n_train_steps`` up to
    ``--trainer.max_steps`` and ``last.ckpt`` (each file holds its step, as text); ``validate`` writes
    ``<report_dir>/<checkpoint stem or base>/results.json`` with Avg. ``50 + step + seed`` and AvgLen
    ``100 - step``, as :class:`egrsd_pl.callbacks.evaluation.PeriodicEvaluation` names its reports.
    """

    def __init__(self, write_results: bool = True) -> None:
        self.commands: list[list[str]] = []
        self.write_results = write_results

    def __call__(self, command: list[str], log: Path) -> int:
        self.commands.append(list(command))

        def value(flag: str) -> str:
            return command[len(command) - 1 - command[::-1].index(flag) + 1]  # the last occurrence wins

        if command[3] == "fit":
            folder = Path(value("--checkpoint.dirpath"))
            folder.mkdir(parents=True, exist_ok=True)
            max_steps, every = (
                int(value("--trainer.max_steps")),
                int(value("--checkpoint.every_n_train_steps")),
            )
            for step in range(every, max_steps + 1, every):
                (folder / f"epoch=0-step={step}.ckpt").write_text(str(step))
            (folder / "last.ckpt").write_text(str(max_steps))
            (folder / ".last.ckpt.partial").write_text("a save in progress: not a snapshot")
        elif self.write_results:
            checkpoint = Path(value("--ckpt_path")) if "--ckpt_path" in command else None
            step = int(checkpoint.read_text()) if checkpoint else 0
            seed = int(value("--seed_everything"))
            result = {"label": "x", "step": step, "k": 2, "avg": 50 + step + seed, "avg_len": 100 - step}
            result["benchmarks"] = {"synthetic": {"avg_at_k": 50 + step + seed}}
            out = Path(value("--evaluation.report_dir")) / (checkpoint.stem if checkpoint else "base")
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(result))
        return 0

    def evaluated(self) -> list[str]:
        """``<method>/seed_<s>:<checkpoint name>`` of every validate (``base`` without a checkpoint)."""
        names = []
        for command in self.commands:
            if command[3] == "validate":
                run = Path(command[command.index("--evaluation.report_dir") + 1]).parent
                stem = (
                    Path(command[command.index("--ckpt_path") + 1]).stem
                    if "--ckpt_path" in command
                    else "base"
                )
                names.append(f"{run.parent.name}/{run.name}:{stem}")
        return names


def test_snapshots_every_checkpoint_evaluated_once_and_resumed(tmp_path: Path, monkeypatch, capsys):
    fake = FakeSubprocesses()
    monkeypatch.setattr("egrsd_pl.compare.runner.run_logged", fake)
    methods = tmp_path / "methods.yaml"
    methods.write_text("methods:\n  no_train: {label: no-train, fit: false}\n  egrsd: {label: EGRSD}\n")
    output = tmp_path / "cmp"
    argv = ["--config", TINY, "--methods", str(methods), "--seeds", "0", "1", "--output", str(output)]
    argv += [
        "--snapshots",
        "--no-progress",
        "--",
        "--trainer.max_steps",
        "4",
        "--checkpoint.every_n_train_steps",
        "2",
    ]
    assert compare_main(argv, parse_error=parse_error) == 0
    # 4 steps, a checkpoint every 2: step=2 and step=4 per run; step=4 is last.ckpt's step, so eval/last covers it
    assert sorted(fake.evaluated()) == [
        "egrsd/seed_0:epoch=0-step=2", "egrsd/seed_0:last", "egrsd/seed_1:epoch=0-step=2", "egrsd/seed_1:last",
        "no_train/seed_0:base", "no_train/seed_1:base",
    ]  # fmt: skip
    assert sum(command[3] == "fit" for command in fake.commands) == 2
    run = output / "runs" / "egrsd" / "seed_1"
    # Avg. = 50 + step + seed: step 2 -> 52, 53 (52.50 ± 0.71); step 4 -> 54, 55; the runs' means over
    # snapshots 53 and 54 -> 53.50 ± 0.71. AvgLen = 100 - step: 98 and 96 on both seeds, mean 97.
    markdown = (output / "comparison.md").read_text()
    assert "| Method | seeds | S1 (step 2) | S2 (step 4) | mean over snapshots |" in markdown
    assert "| EGRSD | 2 | 52.50 ± 0.71 | 54.50 ± 0.71 | 53.50 ± 0.71 |" in markdown
    assert "| EGRSD | 2 | 98.0 ± 0.0 | 96.0 ± 0.0 | 97.0 ± 0.0 |" in markdown
    assert "| no-train |" not in markdown.split("## Snapshots")[1]  # nothing to snapshot without training
    data = json.loads((output / "comparison.json").read_text(), parse_constant=reject_constant)
    snapshots = data["snapshots"]
    assert snapshots["steps"] == [2, 4] and list(snapshots["methods"]) == ["egrsd"]
    assert snapshots["methods"]["egrsd"]["mean_over_snapshots"]["avg"]["mean"] == 53.5
    assert [(r["seed"], r["step"], Path(r["path"]).parent.name) for r in snapshots["methods"]["egrsd"]["runs"]] == [
        (0, 2, "epoch=0-step=2"), (0, 4, "last"), (1, 2, "epoch=0-step=2"), (1, 4, "last"),
    ]  # fmt: skip

    fake.commands.clear()  # a second invocation evaluates nothing
    assert compare_main(argv, parse_error=parse_error) == 0 and fake.commands == []
    (run / "eval" / "epoch=0-step=2" / "results.json").unlink()  # one snapshot lost: only it runs again
    capsys.readouterr()
    assert compare_main(["--print-commands", *argv], parse_error=parse_error) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and f"--ckpt_path {run / 'checkpoints' / 'epoch=0-step=2.ckpt'}" in lines[0]
    assert compare_main(argv, parse_error=parse_error) == 0
    assert fake.evaluated() == ["egrsd/seed_1:epoch=0-step=2"]


def test_a_step_that_writes_no_results_fails_instead_of_looping(tmp_path: Path, monkeypatch):
    fake = FakeSubprocesses(write_results=False)
    monkeypatch.setattr("egrsd_pl.compare.runner.run_logged", fake)
    common = ["--trainer.max_steps", "2", "--checkpoint.every_n_train_steps", "2"]
    plan = Plan(config=TINY, output=tmp_path, common=common, snapshots=True)
    runs = plan.runs([Method("egrsd", "EGRSD")], [0])
    failures = execute(plan, runs, progress=False)
    assert [(r.name, log.name) for r, log in failures] == [("egrsd/seed_0", "validate.log")]
    assert [command[3] for command in fake.commands] == ["fit", "validate"]  # validate once, then stop


def test_comparison_json_is_strict_with_undefined_values(tmp_path: Path):
    # AvgLen 0 makes Eff undefined (NaN) for every run of `short`; a NaN Avg. (what json writes for a float
    # NaN) makes `broken`'s Avg. and every difference on it undefined: all null in comparison.json, — in md.
    runs: dict[str, list] = {}
    for method, seed, avg, avg_len in [("short", 0, 10, 0), ("short", 1, 12, 0), ("broken", 0, math.nan, 5)]:
        path = tmp_path / method / f"seed_{seed}" / "eval" / "last" / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(
            json.dumps({"k": 1, "avg": avg, "avg_len": avg_len, "benchmarks": {"s": {"avg_at_k": avg}}})
        )
        runs.setdefault(method, []).append(read_result(path, method, seed))
    summaries = summarize([("short", "short", True), ("broken", "broken", True)], runs)
    paths = write_comparison(summaries, tmp_path / "out", command="egrsd compare …", pending=0)
    data = json.loads(paths["json"].read_text(), parse_constant=reject_constant)
    assert data["methods"]["short"]["eff"] == {"mean": None, "std": None, "n": 2}
    assert data["methods"]["broken"]["runs"][0]["avg"] is None
    assert data["methods"]["broken"]["runs"][0]["accuracy"] == {"s": None}
    broken = data["differences"]["short"]["methods"]["broken"]
    assert broken["avg"]["delta"] is None and broken["avg"]["p_value"] is None
    assert "| broken | 1 vs 2 | — | — | — | — |" in paths["markdown"].read_text()

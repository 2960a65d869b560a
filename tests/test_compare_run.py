"""``egrsd compare`` end to end on the tiny testbed: 2 methods x 2 seeds, 2 optimizer steps, a small
evaluation; then resuming: nothing reruns, a deleted result reruns only its run, ``--print-commands``
lists exactly the pending runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "egrsd_pl.compare", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )


def attempts(run_dir: Path) -> dict[str, int]:
    """How many times each subprocess of a run was started (one ``$ command`` header per attempt)."""
    return {
        log.stem: sum(line.startswith("$ ") for line in log.read_text().splitlines())
        for log in sorted(run_dir.glob("*.log"))
    }


@pytest.mark.slow
def test_compare_two_methods_two_seeds_resumes(tiny_model_dir: Path, tmp_path: Path):
    methods = tmp_path / "methods.yaml"
    methods.write_text(
        "methods:\n"
        "  no_train: {label: no-train, fit: false}\n"
        "  egrsd: {label: EGRSD, model.objective: egrsd, model.gamma: 0.3}\n"
    )
    output = tmp_path / "cmp"
    own = ["--config", "configs/tiny.yaml", "--methods", str(methods), "--seeds", "0", "1"]
    own += ["--output", str(output), "--no-progress"]
    common = ["--", "--model.model_name_or_path", str(tiny_model_dir), "--trainer.max_steps", "2"]
    common += ["--data.batch_size", "4", "--data.max_new_tokens", "48", "--model.log_text_every_n_steps", "0"]
    common += ["--evaluation.benchmarks", "[{name: synthetic, limit: 3}]", "--evaluation.k", "2"]
    common += ["--evaluation.temperature", "1.0", "--evaluation.max_new_tokens", "48"]

    first = compare(*own, *common)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"{output / 'runs' / 'egrsd' / 'seed_1' / 'fit.log'}" in first.stderr  # each log's path is printed
    runs = {f"{m}/seed_{s}": output / "runs" / m / f"seed_{s}" for m in ("no_train", "egrsd") for s in (0, 1)}
    assert attempts(runs["no_train/seed_0"]) == {"validate": 1}
    assert attempts(runs["egrsd/seed_1"]) == {"fit": 1, "validate": 1}
    for name, run in runs.items():
        label = "base" if name.startswith("no_train") else "last"
        result = json.loads((run / "eval" / label / "results.json").read_text())
        assert result["k"] == 2 and result["benchmarks"]["synthetic"]["num_samples"] == 3 * 2
    ckpt = runs["egrsd/seed_0"] / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2
    assert list((runs["egrsd/seed_0"]).glob("events.out.tfevents.*"))  # TensorBoard under DIR/runs

    data = json.loads((output / "comparison.json").read_text())
    assert data["methods"]["egrsd"]["seeds"] == [0, 1] and data["methods"]["no_train"]["trained"] is False
    assert {Path(r["run_dir"]) for r in data["methods"]["egrsd"]["runs"]} == {
        runs["egrsd/seed_0"],
        runs["egrsd/seed_1"],
    }
    seed_avgs = [r["avg"] for r in data["methods"]["egrsd"]["runs"]]
    assert data["methods"]["egrsd"]["avg"]["mean"] == pytest.approx(sum(seed_avgs) / 2)
    markdown = (output / "comparison.md").read_text()
    assert "| EGRSD | 2 |" in markdown and (output / "frontier.png").is_file()

    second = compare(*own, *common)  # everything finished: only re-aggregates
    assert second.returncode == 0, second.stderr[-3000:]
    assert attempts(runs["egrsd/seed_1"]) == {"fit": 1, "validate": 1}
    assert attempts(runs["no_train/seed_1"]) == {"validate": 1}

    (runs["egrsd/seed_1"] / "eval" / "last" / "results.json").unlink()  # trained, not evaluated
    (runs["egrsd/seed_0"] / "eval" / "last" / "results.json").unlink()  # as if fit were interrupted
    (runs["egrsd/seed_0"] / "fit.done").unlink()
    printed = compare(*own, "--print-commands", *common)
    assert printed.returncode == 0, printed.stderr[-3000:]
    lines = printed.stdout.strip().splitlines()
    assert len(lines) == 2, lines  # exactly the two pending runs, seed 0 first
    assert " fit " in lines[0] and " validate " in lines[0] and str(runs["egrsd/seed_0"]) in lines[0]
    assert " fit " not in lines[1] and f"--evaluation.report_dir {runs['egrsd/seed_1'] / 'eval'}" in lines[1]

    third = compare(*own, *common)
    assert third.returncode == 0, third.stderr[-3000:]
    assert attempts(runs["egrsd/seed_1"]) == {"fit": 1, "validate": 2}
    assert attempts(runs["egrsd/seed_0"]) == {"fit": 2, "validate": 2}
    assert attempts(runs["no_train/seed_0"]) == attempts(runs["no_train/seed_1"]) == {"validate": 1}
    second_fit = (runs["egrsd/seed_0"] / "fit.log").read_text().split("\n$ ")[-1]
    assert "Restoring states from the checkpoint path" in second_fit  # continued from last.ckpt
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2
    assert compare(*own, "--print-commands", *common).stdout == ""


@pytest.mark.slow
def test_compare_snapshots_end_to_end(tiny_model_dir: Path, tmp_path: Path):
    """``--snapshots`` for real: 4 optimizer steps with a checkpoint every 2 -> step=2 and step=4 per trained
    run; step=4 is ``last.ckpt``'s step, whose evaluation it reuses; a second invocation evaluates nothing."""
    methods = tmp_path / "methods.yaml"
    methods.write_text("methods:\n  no_train: {label: no-train, fit: false}\n  egrsd: {label: EGRSD}\n")
    output = tmp_path / "cmp"
    own = ["--config", "configs/tiny.yaml", "--methods", str(methods), "--seeds", "0", "1"]
    own += ["--output", str(output), "--snapshots", "--no-progress"]
    common = ["--", "--model.model_name_or_path", str(tiny_model_dir), "--trainer.max_steps", "4"]
    common += [
        "--checkpoint.every_n_train_steps",
        "2",
        "--data.batch_size",
        "2",
        "--data.max_new_tokens",
        "24",
    ]
    common += [
        "--model.log_text_every_n_steps",
        "0",
        "--evaluation.benchmarks",
        "[{name: synthetic, limit: 2}]",
    ]
    common += ["--evaluation.k", "1", "--evaluation.max_new_tokens", "24"]

    first = compare(*own, *common)
    assert first.returncode == 0, first.stderr[-3000:]
    for seed in (0, 1):
        run = output / "runs" / "egrsd" / f"seed_{seed}"
        checkpoints = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
        assert checkpoints == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
        assert attempts(run) == {"fit": 1, "snapshot": 1, "validate": 1}  # each checkpoint evaluated once
        assert sorted(p.name for p in (run / "eval").iterdir() if p.is_dir()) == ["epoch=0-step=2", "last"]
        assert json.loads((run / "eval" / "epoch=0-step=2" / "results.json").read_text())["step"] == 2
        assert json.loads((run / "eval" / "last" / "results.json").read_text())["step"] == 4
        assert attempts(output / "runs" / "no_train" / f"seed_{seed}") == {"validate": 1}
    data = json.loads((output / "comparison.json").read_text())
    snapshots = data["snapshots"]["methods"]["egrsd"]
    assert data["snapshots"]["steps"] == [2, 4] and snapshots["steps"]["2"]["avg"]["n"] == 2
    runs = {(r["seed"], r["step"]): r["avg"] for r in snapshots["runs"]}
    assert snapshots["mean_over_snapshots"]["avg"]["mean"] == pytest.approx(
        ((runs[0, 2] + runs[0, 4]) / 2 + (runs[1, 2] + runs[1, 4]) / 2) / 2
    )
    assert (
        "| Method | seeds | S1 (step 2) | S2 (step 4) | mean over snapshots |"
        in (output / "comparison.md").read_text()
    )

    second = compare(*own, *common)  # a second invocation evaluates nothing
    assert second.returncode == 0, second.stderr[-3000:]
    assert attempts(output / "runs" / "egrsd" / "seed_1") == {"fit": 1, "snapshot": 1, "validate": 1}
    assert attempts(output / "runs" / "no_train" / "seed_1") == {"validate": 1}

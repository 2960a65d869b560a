"""A damaged checkpoint named on the command line stops every command in one line, before anything reads it.

``fit``, ``validate``, ``diagnose`` and ``compare`` each get a truncated ``last.ckpt`` beside two intact
checkpoints; each must exit with status 2 and one line naming the file, the damage and the newest intact
checkpoint (not torch's ``PytorchStreamReader`` traceback from LightningCLI's own read of the file). The
same runs show that a command line does not warn that LightningCLI's ``args`` are meant for Python.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from egrsd_pl.checkpoint_io import DamagedCheckpointError, refuse_damaged_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARGS_WARNING = "LightningCLI's args parameter"
# zipfile's message for a file cut before its central directory (the end of a torch.save archive)
TRUNCATED = "not a complete checkpoint archive (File is not a zip file)"


def write_checkpoints(folder: Path) -> tuple[Path, Path]:
    """``epoch=0-step=2.ckpt`` and ``epoch=0-step=4.ckpt`` intact, ``last.ckpt`` cut in half and newest on disk.

    Returns ``(damaged, newest_intact)``.
    """
    folder.mkdir(parents=True)
    files = []
    for step in (2, 4):
        path = folder / f"epoch=0-step={step}.ckpt"
        torch.save({"global_step": step, "state_dict": {"w": torch.full((64,), float(step))}}, path)
        files.append(path)
    buffer = io.BytesIO()
    torch.save({"global_step": 6, "state_dict": {"w": torch.zeros(64)}}, buffer)
    damaged = folder / "last.ckpt"
    damaged.write_bytes(buffer.getvalue()[: buffer.tell() // 2])
    for age, path in enumerate((damaged, files[1], files[0])):  # mtimes: last.ckpt newest, then step 4
        os.utime(path, (1_700_000_000 - 10 * age,) * 2)
    return damaged, files[1]


def run_main(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def assert_one_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and ARGS_WARNING not in result.stderr
    assert result.stderr.strip().splitlines() == [expected], result.stderr[-3000:]


def test_refusal_names_the_file_the_damage_and_the_newest_intact_checkpoint(tmp_path: Path) -> None:
    damaged, intact = write_checkpoints(tmp_path / "checkpoints")
    with pytest.raises(DamagedCheckpointError) as error:
        refuse_damaged_checkpoint(damaged)
    assert str(error.value) == (
        f"--ckpt_path {str(damaged)!r} is damaged: {TRUNCATED}; the newest intact checkpoint there is {str(intact)!r}"
    )
    refuse_damaged_checkpoint(intact)  # intact: passes
    refuse_damaged_checkpoint(tmp_path / "checkpoints")  # a folder (a PEFT adapter): not checked here
    refuse_damaged_checkpoint(tmp_path / "missing.ckpt")  # missing: the command's own "no such file" error
    for path in (intact, intact.with_name("epoch=0-step=2.ckpt")):
        path.unlink()
    with pytest.raises(DamagedCheckpointError, match=r"is damaged: .*; no intact one is there$"):
        refuse_damaged_checkpoint(damaged)


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_lightning_commands_refuse_a_damaged_ckpt_path_in_one_line(tmp_path: Path, command: str) -> None:
    damaged, intact = write_checkpoints(tmp_path / "checkpoints")
    result = run_main(
        command,
        "--config",
        "configs/tiny.yaml",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--ckpt_path",
        str(damaged),
    )
    assert_one_line(
        result,
        f"error: --ckpt_path {str(damaged)!r} is damaged: {TRUNCATED}; "
        f"the newest intact checkpoint there is {str(intact)!r}",
    )


def test_diagnose_refuses_a_damaged_ckpt_path_in_one_line(tmp_path: Path) -> None:
    damaged, intact = write_checkpoints(tmp_path / "checkpoints")
    result = run_main(
        "diagnose",
        "--config",
        "configs/tiny.yaml",
        "--ckpt_path",
        str(damaged),
        "--output",
        str(tmp_path / "diagnostics"),
    )
    assert_one_line(
        result,
        f"error: --ckpt_path {str(damaged)!r} is damaged: {TRUNCATED}; "
        f"the newest intact checkpoint there is {str(intact)!r}",
    )
    assert not (tmp_path / "diagnostics").exists()  # stopped before anything ran


def test_compare_refuses_a_run_whose_last_checkpoint_is_damaged(tmp_path: Path) -> None:
    # An interrupted run: checkpoints but no fit.done, so `fit --ckpt_path last` would resume from last.ckpt.
    output = tmp_path / "comparison"
    damaged, intact = write_checkpoints(output / "runs" / "egrsd" / "seed_0" / "checkpoints")
    methods = tmp_path / "methods.yaml"
    methods.write_text("methods:\n  egrsd:\n    label: EGRSD\n    model.objective: egrsd\n")
    result = run_main(
        "compare",
        "--config",
        "configs/tiny.yaml",
        "--methods",
        str(methods),
        "--output",
        str(output),
        "--no-progress",
    )
    assert_one_line(
        result,
        f"error: egrsd/seed_0: checkpoint {str(damaged)!r} is damaged: {TRUNCATED}; "
        f"the newest intact checkpoint there is {str(intact)!r}",
    )
    assert not (output / "runs" / "egrsd" / "seed_0" / "fit.log").exists()  # no subprocess was started


def test_a_command_line_does_not_warn_that_args_are_meant_for_python(tmp_path: Path) -> None:
    result = run_main("fit", "--config", "configs/tiny.yaml", "--print_config")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model_name_or_path: testbed:tiny" in result.stdout  # the parse did happen
    assert ARGS_WARNING not in result.stderr


def test_fit_ckpt_path_last_refuses_a_damaged_last_checkpoint_before_training(tmp_path: Path) -> None:
    damaged, intact = write_checkpoints(tmp_path / "checkpoints")
    result = run_main(
        "fit",
        "--config",
        "configs/tiny.yaml",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--checkpoint.dirpath",
        str(tmp_path / "checkpoints"),
        "--ckpt_path",
        "last",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and ARGS_WARNING not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (  # after Lightning's start-up lines (seed, devices)
        f"error: --ckpt_path last -> {str(damaged)!r} is damaged: {TRUNCATED}; "
        f"the newest intact checkpoint there is {str(intact)!r}"
    )


def test_arguments_handed_in_from_python_do_not_warn_either(monkeypatch: pytest.MonkeyPatch) -> None:
    from egrsd_pl.cli import EGRSDCLI, build_cli

    class ParseOnly(EGRSDCLI):
        def instantiate_classes(self) -> None:  # parse only: no model, no data
            pass

    monkeypatch.setattr(sys, "argv", ["pytest", "tests/", "-q"])  # what LightningCLI warns about
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = build_cli(["--config", "configs/tiny.yaml"], run=False, cli_class=ParseOnly).config
    assert config.model.model_name_or_path == "testbed:tiny"
    assert [str(w.message) for w in caught if ARGS_WARNING in str(w.message)] == []

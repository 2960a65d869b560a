"""The command line: every YAML parses with the real parser, bad values fail with the flag's name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from egrsd_pl.cli import EGRSDCLI, build_cli
from egrsd_pl.prompts import DEFAULT_CONCISE_INSTRUCTION

ROOT = Path(__file__).resolve().parents[1]
# configs/compare/ holds methods files of `egrsd compare` (checked in tests/test_compare.py), not fit configs.
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "compare")


class ParseOnly(EGRSDCLI):
    def instantiate_classes(self) -> None:  # parse and validate only: no model, no data
        pass


def parse(*args: str):
    """Parses ``fit`` arguments with the real CLI parser (the same classes and defaults as main.py)."""
    return build_cli(list(args), run=False, cli_class=ParseOnly).config


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses_and_names_its_command(config: Path):
    first_line = config.read_text().splitlines()[0]
    if config.name in {"cpu_rehearsal.yaml", "server.yaml"}:  # overlays, layered over another config
        assert (
            first_line
            == f"# python main.py fit --config configs/egrsd.yaml --config {config.relative_to(ROOT)}"
        )
    else:
        assert first_line == f"# python main.py fit --config {config.relative_to(ROOT)}"
    parsed = parse("--config", str(config))
    assert parsed.model.objective in {"sft", "grpo", "opsd", "rlsd", "egrsd", "cl_egrsd", "crisp"}


@pytest.mark.parametrize("config", ["crisp.yaml", "qwen3_8b/crisp.yaml"])
def test_crisp_configs_refresh_every_50_steps_with_the_default_instruction(config: str):
    cfg = parse("--config", str(ROOT / "configs" / config))
    assert cfg.model.objective == "crisp"
    assert (cfg.teacher.schedule, cfg.teacher.every_k_steps, cfg.model.teacher) == (
        "hard_copy",
        50,
        "hard_copy",
    )
    assert cfg.data.crisp_instruction == DEFAULT_CONCISE_INSTRUCTION  # the YAML's folded text, verbatim
    # The shared protocol, not CRISP's own recipe (README "CRISP").
    assert (cfg.model.lora_rank, cfg.model.learning_rate, cfg.trainer.gradient_clip_val) == (64, 5e-6, 0.1)
    assert (cfg.data.max_new_tokens, cfg.data.temperature) == (1024, 1.1)
    other = parse("--config", str(ROOT / "configs" / config), "--data.crisp_instruction", "Be brief.")
    assert other.data.crisp_instruction == "Be brief."


def test_paper_recipe_values():
    cfg = parse("--config", str(ROOT / "configs" / "egrsd.yaml"))
    assert (cfg.model.objective, cfg.model.gamma, cfg.model.window) == ("egrsd", 0.3, 0)
    assert (cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_dropout) == (64, 128, 0.0)
    assert cfg.model.learning_rate == 5e-6 and list(cfg.model.adam_betas) == [0.9, 0.999]
    assert (cfg.trainer.gradient_clip_val, cfg.trainer.max_steps, cfg.trainer.precision) == (
        0.1,
        100,
        "bf16-mixed",
    )
    assert (cfg.data.batch_size, cfg.data.max_new_tokens, cfg.data.temperature) == (4, 1024, 1.1)
    assert (cfg.data.top_p, cfg.data.top_k, cfg.data.length_beta, cfg.data.num_rollouts) == (0.95, 20, 0.5, 1)


def test_override_reaches_the_module():
    cfg = parse("--config", str(ROOT / "configs" / "tiny.yaml"), "--model.gamma", "0.5")
    assert cfg.model.gamma == 0.5


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_unknown_objective_fails_at_parse_time_naming_the_flag():
    result = run_main("fit", "--config", "configs/tiny.yaml", "--model.objective", "ppo")
    assert result.returncode != 0
    assert "objective" in result.stderr and "ppo" in result.stderr
    assert "Traceback" not in result.stderr


def test_cl_egrsd_without_window_is_one_clear_line(tmp_path: Path):
    result = run_main(
        "fit",
        "--config",
        "configs/tiny.yaml",
        "--model.objective",
        "cl_egrsd",
        "--model.window",
        "0",
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --model.objective cl_egrsd needs --model.window > 0 (paper: 3 on 4B, 5 on 8B)"
    )


def test_crisp_with_a_frozen_teacher_is_one_clear_line(tmp_path: Path):
    result = run_main(
        "fit",
        "--config",
        "configs/tiny.yaml",
        "--model.objective",
        "crisp",
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --model.objective crisp needs --teacher.schedule hard_copy, not frozen"
    )


def test_missing_model_path_is_one_clear_line(tmp_path: Path):
    missing = tmp_path / "no_such_model"
    result = run_main(
        "fit",
        "--config",
        "configs/tiny.yaml",
        "--model.model_name_or_path",
        str(missing),
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --model.model_name_or_path") and "no such folder" in last
    assert "Traceback" not in result.stderr


def test_dataset_without_needed_columns_is_one_clear_line(tmp_path: Path, tiny_model_dir: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n')
    result = run_main(
        "fit",
        "--config",
        "configs/tiny.yaml",
        "--model.model_name_or_path",
        str(tiny_model_dir),
        "--data.train_source",
        str(bad),
        "--trainer.logger",
        "false",
        "--trainer.max_steps",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert str(bad) in last and "problem" in last
    assert "Traceback" not in result.stderr

"""A run that explains itself, and the clear errors a newcomer meets first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from jsonargparse import Namespace

import egrsd_pl.cli as cli
from egrsd_pl.callbacks.run_summary import first_last_table, resume_command
from egrsd_pl.cli import build_cli, check_accelerator
from egrsd_pl.problem_sources import DatasetError, load_problems

ROOT = Path(__file__).resolve().parents[1]


# --- the pieces of the summary -----------------------------------------------------------------


def test_first_last_table_means_hand_checked() -> None:
    history = [
        (1, {"train/reward_mean": 0.2, "train/accuracy": 0.0, "train/completion_len": 100.0}),
        (2, {"train/reward_mean": 0.4, "train/accuracy": 0.5, "train/completion_len": 90.0}),
        (3, {"train/reward_mean": 0.6, "train/accuracy": 0.5, "train/completion_len": 80.0}),
        (4, {"train/reward_mean": 1.0, "train/accuracy": 1.0, "train/completion_len": 50.0}),
        (5, {"train/reward_mean": 1.2, "train/accuracy": 1.0, "train/completion_len": 40.0}),
    ]
    lines = first_last_table(history, window=10)  # 5 steps: the window shrinks to 5 // 2 = 2
    assert "first: steps 1-2" in lines[0] and "last: steps 4-5" in lines[0]
    rows = {line.split("  ")[1].strip(): line.split()[-2:] for line in lines[1:]}
    assert rows["reward"] == ["0.300", "1.100"]  # (0.2 + 0.4) / 2, (1.0 + 1.2) / 2
    assert rows["accuracy"] == ["0.250", "1.000"]  # (0 + 0.5) / 2, (1 + 1) / 2
    assert rows["completion length (tokens)"] == ["95.0", "45.0"]  # (100 + 90) / 2, (50 + 40) / 2
    assert first_last_table([], window=10) == ["no training step was logged"]


def test_resume_command_replaces_any_ckpt_path() -> None:
    assert resume_command(["main.py", "fit", "--config", "configs/tiny.yaml"]) == (
        "python main.py fit --config configs/tiny.yaml --ckpt_path last"
    )
    assert resume_command(["/x/bin/egrsd", "fit", "--ckpt_path", "a.ckpt", "--model.gamma=0.5"]) == (
        "egrsd fit --model.gamma=0.5 --ckpt_path last"
    )
    assert resume_command(["main.py", "fit", "--ckpt_path=last", "--data.train_source", "my data.jsonl"]) == (
        "python main.py fit --data.train_source 'my data.jsonl' --ckpt_path last"
    )


# --- a short run through the CLI ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
def test_fit_prints_a_start_line_step_progress_and_a_closing_summary(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["main.py", "fit", "--config", "my.yaml"])
    args = [
        "fit",
        "--seed_everything=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_steps=4",
        "--trainer.enable_model_summary=false",
        "--trainer.logger.class_path=lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir=runs",
        "--trainer.logger.init_args.name=demo",
        f"--model.model_name_or_path={tiny_model_dir}",
        "--model.lora_rank=4",
        "--model.lora_alpha=8",
        "--model.log_text_every_n_steps=0",
        "--data.train_source=synthetic:8",
        "--data.batch_size=2",
        "--data.max_new_tokens=24",
        "--checkpoint.every_n_train_steps=2",
        "--evaluation.benchmarks=[{name: synthetic, limit: 2}]",
        "--evaluation.at_end=true",
        "--evaluation.k=1",
        "--evaluation.temperature=0",
        "--evaluation.max_new_tokens=24",
        "--evaluation.progress=false",
        "--summary.window=2",
    ]
    build_cli(args)
    out = capsys.readouterr().out
    run = Path("runs") / "demo" / "version_0"
    assert (
        f"egrsd: training egrsd (gamma 0.3) on {tiny_model_dir}, 4 steps; run folder {run}; "
        f"watch it: tensorboard --logdir {Path('runs') / 'demo'}"
    ) in out
    assert "4/4" in out and "Epoch 0" not in out  # the bar counts steps out of max_steps
    summary = out[out.index("run summary") :]
    assert "4 of 4 steps (4 in this run" in summary
    assert "first: steps 1-2" in summary and "last: steps 3-4" in summary
    for row in ("reward", "accuracy", "completion length (tokens)"):
        assert f"  {row}" in summary
    assert "before training (testbed.json, greedy, 128 problems)" in summary
    assert "step_000004 (step 4): avg" in summary
    assert f"last evaluation ({run / 'eval' / 'step_000004' / 'results.md'})" in summary
    assert "| synthetic | 2 |" in summary  # the table itself
    assert f"checkpoint:   {(run / 'checkpoints' / 'last.ckpt').resolve()}" in summary or (
        f"checkpoint:   {run / 'checkpoints' / 'last.ckpt'}" in summary
    )
    adapter_line = next(line for line in summary.splitlines() if line.startswith("PEFT adapter:"))
    adapter = Path(adapter_line.split()[2])
    assert adapter.name.endswith("step=4_adapter") and (adapter / "adapter_config.json").is_file()
    assert "resume:       python main.py fit --config my.yaml --ckpt_path last" in summary


def test_summary_switch_turns_the_extras_off() -> None:
    class ParseOnly(cli.EGRSDCLI):
        def instantiate_classes(self) -> None:
            pass

    config = build_cli(
        ["--config", str(ROOT / "configs" / "tiny.yaml"), "--summary.enabled=false"],
        run=False,
        cli_class=ParseOnly,
    ).config
    assert config.summary.enabled is False


# --- clear errors ------------------------------------------------------------------------------


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--help"])
    assert stopped.value.code == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert listed == {"fit", "validate", "compare", "diagnose", "serve", "testbed"}


def test_empty_dataset_file_says_it_is_empty(tmp_path: Path) -> None:
    empty = tmp_path / "train.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match=rf"^{empty} is empty: it holds no rows"):
        load_problems(str(empty))
    empty.write_text("\n  \n")  # blank lines only: still no rows
    with pytest.raises(DatasetError, match="is empty"):
        load_problems(str(empty))
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a.jsonl").write_text("")
    with pytest.raises(DatasetError, match=rf"^{folder} is empty"):
        load_problems(str(folder))


def test_gpu_config_without_a_gpu_names_the_flags_to_change(capsys: pytest.CaptureFixture[str]) -> None:
    config = Namespace(
        trainer=Namespace(accelerator="gpu", strategy="ddp", precision="bf16-mixed", devices=-1),
        model=Namespace(dtype="bfloat16", attn_implementation="flash_attention_2"),
    )
    check_accelerator(config, cuda_available=True)  # a GPU is there: nothing to say
    with pytest.raises(ValueError) as raised:
        check_accelerator(config, cuda_available=False)
    message = str(raised.value)
    assert "asks for GPUs" in message and "configs/tiny.yaml" in message
    assert (
        "--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto --trainer.precision 32-true "
        "--model.dtype float32 --model.attn_implementation sdpa"
    ) in message
    cpu = Namespace(trainer=Namespace(accelerator="cpu"), model=Namespace(dtype="float32"))
    check_accelerator(cpu, cuda_available=False)


def test_paper_config_on_a_cpu_machine_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["fit", "--config", str(ROOT / "configs" / "egrsd.yaml")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: this config asks for GPUs (--trainer.accelerator gpu)")


def test_hub_id_while_offline_says_so_and_how_to_use_a_folder(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    code = (
        "from egrsd_pl.module import EGRSDModule\n"
        "EGRSDModule(model_name_or_path='Qwen/Qwen3-4B').configure_model()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert (
        "ModelPathError: --model.model_name_or_path 'Qwen/Qwen3-4B': the Hugging Face hub is unreachable"
        in last
    )
    assert "(offline)" in last and "hf download Qwen/Qwen3-4B --local-dir DIR" in last
    assert "--model.model_name_or_path DIR" in last


def test_torch_threads_knob_is_parsed_and_checked() -> None:
    class ParseOnly(cli.EGRSDCLI):
        def instantiate_classes(self) -> None:
            pass

    tiny = str(ROOT / "configs" / "tiny.yaml")
    assert build_cli(["--config", tiny], run=False, cli_class=ParseOnly).config.torch_threads == 1
    with pytest.raises(ValueError, match="--torch_threads must be >= 1"):
        build_cli(["--config", tiny, "--torch_threads", "0"], run=False)  # stops before the Trainer

"""``bench/gpu_check.sh`` and its Python helper: what can be checked without a GPU, and the run itself on one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from egrsd_pl.cli import EGRSDCLI, build_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():  # type: ignore[no-untyped-def]
    """``bench/gpu_check.py`` imported as ``gpu_check`` (the name its recorder's class path uses)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "bench"))
        sys.modules.pop("gpu_check", None)


class ParseOnly(EGRSDCLI):
    def instantiate_classes(self) -> None:
        pass


def test_the_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)


def test_fit_arguments_parse_with_the_real_cli(gpu_check, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arguments = gpu_check.fit_arguments(
        tmp_path, devices=2, steps=3, model="testbed:qwen3-shape?like=qwen3-4b", attention="sdpa"
    )
    assert arguments[0] == "fit"
    cfg = build_cli(arguments[1:], run=False, cli_class=ParseOnly).config
    assert (str(cfg.trainer.devices), cfg.trainer.max_steps, cfg.trainer.precision) == ("2", 3, "bf16-mixed")
    assert cfg.model.model_name_or_path == "testbed:qwen3-shape?like=qwen3-4b"
    assert (cfg.model.attn_implementation, cfg.model.gradient_checkpointing) == ("sdpa", True)
    assert cfg.data.engine.class_path == "egrsd_pl.rollout.vllm.VLLMEngine"
    assert cfg.data.engine.init_args.sync == "merged" and cfg.data.engine.init_args.enable_sleep_mode
    assert cfg.data.train_source == "synthetic:64" and cfg.evaluation.every_n_steps == 0
    recorder = [c for c in cfg.trainer.callbacks if c.class_path == "gpu_check.GpuRecorder"]
    assert len(recorder) == 1 and recorder[0].init_args.devices == 2


def test_arguments_are_checked(gpu_check) -> None:  # type: ignore[no-untyped-def]
    assert gpu_check.parse_args(["fit", "--out", "x"]).steps == 3
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["fit", "--out", "x", "--devices", "0"])


def test_first_difference(gpu_check) -> None:  # type: ignore[no-untyped-def]
    assert gpu_check.first_difference((1, 2, 3), (1, 2, 3)) is None
    assert gpu_check.first_difference((1, 2, 3), (1, 5, 3)) == 1
    assert gpu_check.first_difference((1, 2), (1, 2, 3)) == 2


def test_table_of_records(gpu_check, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert "(no records)" in gpu_check.table(tmp_path)
    record = {
        "devices_ok": True,
        "rank": 0,
        "attention": "sdpa",
        "steps": [
            {
                "step": 1,
                "time/step_s": 12.5,
                "time/rollout_s": 9.25,
                "peak_allocated_gib": 20.0,
                "device_peak_gib": 70.125,
            }
        ],
        "greedy": {"prompts": 4, "tokens": 64, "equal": 3, "first_difference": [None, None, 17, None]},
    }
    (tmp_path / "fit_1gpu_rank0.json").write_text(json.dumps(record))
    startup = {
        "max_model_len": 33_280,
        "kv_cache_tokens": 349_440,
        "evaluation_sequence_tokens": 33_280,
        "device_in_use_gib": 71.5,
        "startup_s": 64.0,
    }
    (tmp_path / "startup.json").write_text(json.dumps(startup))
    text = gpu_check.table(tmp_path)
    assert "| fit_1gpu | 0 | True | sdpa | 1 | 12.50 | 9.25 | 20.00 | 70.12 |" in text
    assert (
        "vLLM greedy = HF greedy on 3/4 prompts x 64 tokens (first differences: [None, None, 17, None])"
        in text
    )
    assert "max_model_len 33,280, KV cache 349,440 tokens (10.5 evaluation sequences)" in text


@pytest.mark.vllm
@pytest.mark.slow
def test_the_check_runs_on_cpu_with_the_tiny_testbed(tmp_path: Path) -> None:
    """The same fit path and recorder on CPU (configs/tiny_vllm.yaml), under FSDP2 as stage 5 runs it: steps
    recorded under the tag, greedy vLLM = HF on the sharded policy (float32 here, so all equal), no memory
    figures without CUDA."""
    command = [
        sys.executable,
        str(ROOT / "bench" / "gpu_check.py"),
        "fit",
        "--out",
        str(tmp_path),
        "--steps",
        "2",
        "--tag",
        "fsdp2",
    ]
    command += ["--config", "configs/tiny_vllm.yaml", "--model", "testbed:tiny"]
    for override in (
        "--data.batch_size=4",
        "--data.max_new_tokens=16",
        "--data.engine.init_args.enforce_eager=true",
        "--trainer.strategy=fsdp2",
    ):
        command.append(f"--set={override}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "runs/tiny_vllm/version_0/config.yaml").read_text().count("strategy: fsdp2") == 1
    record = json.loads((tmp_path / "fit_fsdp2_1gpu_rank0.json").read_text())
    assert [s["step"] for s in record["steps"]] == [1, 2]
    assert all(s["peak_allocated_gib"] is None and s["time/rollout_s"] > 0 for s in record["steps"])
    assert record["greedy"] == {"prompts": 4, "tokens": 64, "equal": 4, "first_difference": [None] * 4}


@pytest.mark.gpu
@pytest.mark.vllm
@pytest.mark.slow
def test_gpu_check_fit_records_every_step(tmp_path: Path) -> None:
    """The check's fit on the small default qwen3-shape model: records per step, the device is the rank's."""
    command = [
        sys.executable,
        str(ROOT / "bench" / "gpu_check.py"),
        "fit",
        "--out",
        str(tmp_path),
        "--steps",
        "2",
        "--tag",
        "fsdp2",
    ]
    command += ["--model", "testbed:qwen3-shape"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads((tmp_path / "fit_1gpu_rank0.json").read_text())
    assert record["devices_ok"] and [s["step"] for s in record["steps"]] == [1, 2]
    assert record["greedy"]["prompts"] == 4

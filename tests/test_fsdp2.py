"""FSDP2 on CPU (gloo) through the real CLI: ``python main.py fit --trainer.strategy fsdp2 --trainer.devices 2``.

The reference is the same run under DDP: the same 2 processes, problems, seeds and HF ``generate`` rollouts
(sampled, T 1.1), so every rank sees the same batches under both strategies. FSDP2 gathers the same weights
layer by layer and reduce-scatters the same gradients DDP all-reduces: per-rank losses, the logged pre-clip
gradient norm (clipped at 0.01, so clipping acts), the gradients and the final LoRA tensors must agree to
float32 rounding. The FSDP2 checkpoint must hold the LoRA tensors and their optimizer state only (the values
of the DDP checkpoint), and a run resumed from it, here as HSDP (``--fsdp2.replicate_size 2``: two replicas of
one shard, gradients all-reduced across them), must end where the straight run ended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from test_ddp import REPO, max_abs_diff

from egrsd_pl.sharding import full_tensor

pytestmark = [pytest.mark.slow]

STEPS = 4  # the step-2 checkpoint is resumed to step 4
TOLERANCE = 1e-5  # FSDP2 vs DDP: float32 rounding of the gradient reduction
RESUME_TOLERANCE = 1e-6  # resumed vs straight, both FSDP2
CLIP = 0.01  # below every step's gradient norm here: clipping acts on every step


class RecordSteps(L.Callback):
    """Writes, per rank: each step's loss, logged ``grad/norm_preclip`` and full gradients, the final full
    LoRA tensors (student and teacher) and one frozen base tensor.

    Args:
        out_dir: Folder of the ``rank{r}.pt`` files.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, Any] = {"loss": [], "grad_norm": [], "grads": [], "step": []}

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        grads = {  # full_tensor: an all-gather under FSDP2, on every rank in the same order
            name: full_tensor(param.grad).detach().clone()
            for name, param in pl_module.named_parameters()
            if param.grad is not None
        }
        self.record["grads"].append(grads)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["loss"].append(float(outputs["loss"]))
        self.record["grad_norm"].append(float(trainer.callback_metrics["grad/norm_preclip"]))
        self.record["step"].append(trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module: Any = pl_module
        base = module.policy.get_base_model().get_decoder().layers[0].self_attn.q_proj.base_layer.weight
        self.record.update(
            student={
                k: full_tensor(v).detach().clone() for k, v in module.adapter_parameters("default").items()
            },
            teacher={
                k: full_tensor(v).detach().clone() for k, v in module.adapter_parameters("teacher").items()
            },
            base_q_proj=full_tensor(base).detach().clone(),
            strategy=type(trainer.strategy).__name__,
            mesh=tuple(getattr(trainer.strategy, "shard_mesh", torch.empty(0)).shape),
            world_size=trainer.world_size,
            tensor_parallel_size=getattr(trainer.datamodule.engine, "tensor_parallel_size", None),  # type: ignore[attr-defined]
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}.pt")


def command_line(
    workdir: Path, model_dir: Path, *args: str, command: str = "fit"
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of ``python main.py fit`` (or ``command``) on 2 CPU processes in ``workdir``."""
    record = {"class_path": "test_fsdp2.RecordSteps", "init_args": {"out_dir": str(workdir / "record")}}
    argv = [
        sys.executable,
        str(REPO / "main.py"),
        command,
        "--seed_everything=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.precision=32-true",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--model.model_name_or_path={model_dir}",
        "--model.lora_rank=8",
        "--model.lora_alpha=16",
        "--model.learning_rate=1e-3",
        "--model.log_text_every_n_steps=0",
        "--data.train_source=synthetic:8",
        "--data.batch_size=2",
        "--data.max_new_tokens=16",
        "--data.max_length=1024",
        "--teacher.schedule=ema",
        "--teacher.ema_alpha=0.5",
        "--reward_stats.warmup_steps=1",
        "--checkpoint.every_n_train_steps=2",
        f"--trainer.gradient_clip_val={CLIP}",
        "--summary.enabled=false",
        "--torch_threads=1",
        f"--trainer.callbacks+={json.dumps(record)}",
        *args,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "OMP_NUM_THREADS": "1",
    }
    workdir.mkdir(parents=True, exist_ok=True)
    return argv, env


def run(workdir: Path, model_dir: Path, *args: str, command: str = "fit") -> float:
    """``python main.py fit`` (or ``command``) on 2 CPU processes in ``workdir``; returns its wall time in seconds."""
    argv, env = command_line(workdir, model_dir, *args, command=command)
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return time.perf_counter() - start


def records(workdir: Path) -> list[dict[str, Any]]:
    return [torch.load(workdir / "record" / f"rank{r}.pt", weights_only=False) for r in range(2)]


def checkpoint(workdir: Path, step: int) -> dict[str, Any]:
    (path,) = workdir.glob(f"runs/egrsd/version_0/checkpoints/epoch=*-step={step}.ckpt")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """DDP and FSDP2 for 4 steps (checkpoints at 2 and 4), and HSDP resumed from FSDP2's step 2 to step 4."""
    folders = {name: tmp_path_factory.mktemp(name) for name in ("ddp", "fsdp2", "resumed")}
    seconds = {
        "ddp": run(folders["ddp"], tiny_model_dir, "--trainer.strategy=ddp", f"--trainer.max_steps={STEPS}"),
        "fsdp2": run(
            folders["fsdp2"], tiny_model_dir, "--trainer.strategy=fsdp2", f"--trainer.max_steps={STEPS}"
        ),
    }
    (step2,) = folders["fsdp2"].glob("runs/egrsd/version_0/checkpoints/epoch=*-step=2.ckpt")
    seconds["resumed"] = run(
        folders["resumed"],
        tiny_model_dir,
        "--trainer.strategy=fsdp2",
        "--fsdp2.replicate_size=2",  # HSDP: 2 replicas of 1 shard; the checkpoint does not depend on the layout
        f"--trainer.max_steps={STEPS}",
        f"--ckpt_path={step2}",
    )
    print("\nwall time (s): " + ", ".join(f"{name} {value:.1f}" for name, value in seconds.items()))
    return folders


def test_fsdp2_fit_equals_ddp_fit(runs):
    ddp, fsdp2 = records(runs["ddp"]), records(runs["fsdp2"])
    assert [r["strategy"] for r in fsdp2] == ["FSDP2Strategy"] * 2 and ddp[0]["strategy"] == "DDPStrategy"
    for rank in range(2):
        reference, sharded = ddp[rank], fsdp2[rank]
        assert sharded["step"] == reference["step"] == list(range(1, STEPS + 1))
        losses = torch.tensor([reference["loss"], sharded["loss"]])
        norms = torch.tensor([reference["grad_norm"], sharded["grad_norm"]])
        print(
            f"\nrank {rank}: losses {reference['loss']}, max |diff| {float((losses[0] - losses[1]).abs().max()):.3g}; "
            f"grad norms {reference['grad_norm']}, max |diff| {float((norms[0] - norms[1]).abs().max()):.3g}"
        )
        assert torch.allclose(losses[0], losses[1], rtol=0, atol=TOLERANCE)
        assert torch.allclose(norms[0], norms[1], rtol=TOLERANCE, atol=0)
        assert min(reference["grad_norm"]) > CLIP  # clipping acted on every step
        for step in range(STEPS):
            assert max_abs_diff(sharded["grads"][step], reference["grads"][step]) <= TOLERANCE
        assert max_abs_diff(sharded["student"], reference["student"]) <= TOLERANCE
        assert max_abs_diff(sharded["teacher"], reference["teacher"]) <= TOLERANCE
        assert torch.equal(sharded["base_q_proj"], reference["base_q_proj"])  # the frozen base did not move
    assert any(v.abs().max() > 0 for k, v in fsdp2[0]["student"].items() if "lora_B" in k)  # it trained
    assert max_abs_diff(fsdp2[0]["student"], fsdp2[1]["student"]) == 0  # one model, seen whole on both ranks


def test_fsdp2_checkpoint_holds_the_adapters_and_their_optimizer_state_only(runs):
    sharded, reference = checkpoint(runs["fsdp2"], 2), checkpoint(runs["ddp"], 2)
    keys = set(sharded["state_dict"])
    assert keys == set(reference["state_dict"]) and keys
    assert all("lora_" in key for key in keys)  # no base weight
    assert (
        sharded["optimizer_state_keys"] == "module_parameter_position"
        and "optimizer_state_keys" not in reference
    )
    assert {key.split(".")[-2] for key in keys} == {"default", "teacher"}
    assert max_abs_diff(sharded["state_dict"], reference["state_dict"]) <= TOLERANCE
    # The optimizer state: one entry per trainable (student) LoRA tensor, as under DDP. Lightning keys the
    # gathered FSDP2 state by position among all the module's parameters, DDP by position among the optimizer's
    # (the trainable ones): both in parameter order, so the sorted keys pair up.
    (optimizer,), (ddp_optimizer,) = sharded["optimizer_states"], reference["optimizer_states"]
    assert len(optimizer["state"]) == len(ddp_optimizer["state"]) == sum(".default." in key for key in keys)
    for index, ddp_index in zip(sorted(optimizer["state"]), sorted(ddp_optimizer["state"]), strict=True):
        state, ddp_state = optimizer["state"][index], ddp_optimizer["state"][ddp_index]
        assert float(state["step"]) == float(ddp_state["step"]) == 2
        for name in ("exp_avg", "exp_avg_sq"):
            assert state[name].shape == ddp_state[name].shape
            assert float((state[name] - ddp_state[name]).abs().max()) <= TOLERANCE
    # The PEFT folder beside it holds the same full tensors.
    from safetensors.torch import load_file

    (path,) = runs["fsdp2"].glob("runs/egrsd/version_0/checkpoints/epoch=*-step=2.ckpt")
    exported = load_file(path.with_name(path.stem + "_adapter") / "adapter_model.safetensors")
    saved = {
        key.removeprefix("policy.").replace(".default.weight", ".weight"): value
        for key, value in sharded["state_dict"].items()
        if ".default." in key
    }
    assert exported.keys() == saved.keys()
    assert all(torch.equal(exported[key], saved[key]) for key in saved)


def test_fsdp2_checkpoint_resumed_as_hsdp_equals_the_straight_run(runs):
    straight, resumed = records(runs["fsdp2"]), records(runs["resumed"])
    assert straight[0]["mesh"] == (2,) and resumed[0]["mesh"] == (2, 1)  # FSDP over 2; HSDP 2 x 1
    for rank in range(2):
        assert resumed[rank]["step"] == [3, 4]
        assert resumed[rank]["loss"] == pytest.approx(straight[rank]["loss"][2:], abs=RESUME_TOLERANCE)
        assert max_abs_diff(resumed[rank]["student"], straight[rank]["student"]) <= RESUME_TOLERANCE
        assert max_abs_diff(resumed[rank]["teacher"], straight[rank]["teacher"]) <= RESUME_TOLERANCE


def test_sigterm_under_fsdp2_saves_a_checkpoint_that_resumes_to_the_straight_run(
    runs, tiny_model_dir, tmp_path
):
    """SIGTERM to rank 0 of a 2-process FSDP2 run: both ranks finish the step, the collective save writes
    ``last.ckpt`` and the run exits 0; resumed under FSDP2 to step 4 it ends where the straight run ended."""
    argv, env = command_line(
        tmp_path / "stopped",
        tiny_model_dir,
        "--trainer.strategy=fsdp2",
        "--trainer.max_steps=50",
        "--checkpoint.every_n_train_steps=1",
    )
    process = subprocess.Popen(argv, cwd=tmp_path / "stopped", env=env, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "stopped/runs/egrsd/version_0/checkpoints"
    deadline = time.monotonic() + 240
    while not (checkpoints / "epoch=0-step=1.ckpt").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no first checkpoint within 240 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-4000:]  # Lightning's SIGTERMException: a clean exit
    saved = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert 1 <= saved["global_step"] < STEPS
    assert all("lora_" in name for name in saved["state_dict"])  # the FSDP2 checkpoint: adapters only
    run(
        tmp_path / "resumed",
        tiny_model_dir,
        "--trainer.strategy=fsdp2",
        f"--trainer.max_steps={STEPS}",
        f"--ckpt_path={checkpoints / 'last.ckpt'}",
    )
    resumed, straight = records(tmp_path / "resumed"), records(runs["fsdp2"])
    for rank in range(2):
        assert resumed[rank]["step"] == list(range(saved["global_step"] + 1, STEPS + 1))
        assert max_abs_diff(resumed[rank]["student"], straight[rank]["student"]) <= RESUME_TOLERANCE
        assert max_abs_diff(resumed[rank]["teacher"], straight[rank]["teacher"]) <= RESUME_TOLERANCE


VLLM_ENGINE = {
    "class_path": "egrsd_pl.rollout.vllm.VLLMEngine",
    "init_args": {"dtype": "float32", "max_model_len": 1024, "max_lora_rank": 8, "enforce_eager": True},
}


@pytest.mark.vllm
def test_fsdp2_with_colocated_vllm_equals_ddp_with_colocated_vllm(tiny_model_dir: Path, tmp_path: Path):
    """vLLM synced once per step with the merged policy (``sync merged``): under DDP one engine per rank; under
    FSDP2 one engine at tensor parallel 2 over both ranks, each gathering the weights tensor by tensor while its
    half of the engine loads them, and each rank's prompts gathered into the group's calls. Step 2 samples from
    the weights step 1 trained, so equal rollouts (hence equal losses) need the sync to be exact and every rank
    to get its own rollouts back; the avg@K evaluation at the end (5 problems, 2 per call: rank 0 makes 2
    calls, rank 1 one, and under tensor parallel a second, empty one) samples the same completions, and so
    does ``validate`` under FSDP2 on the step-2 checkpoint."""
    evaluation = [
        "--evaluation.at_end=true",
        '--evaluation.benchmarks=[{"name": "synthetic", "limit": 5}]',
        "--evaluation.k=2",
        "--evaluation.max_new_tokens=16",
        "--evaluation.prompts_per_call=2",
        "--evaluation.progress=false",
        "--evaluation.verbose=false",
    ]
    tensor_parallel = {**VLLM_ENGINE, "init_args": {**VLLM_ENGINE["init_args"], "tensor_parallel_size": 2}}
    engines = {
        "ddp": f"--data.engine={json.dumps(VLLM_ENGINE)}",
        "fsdp2": f"--data.engine={json.dumps(tensor_parallel)}",
    }
    seconds = {
        strategy: run(
            tmp_path / strategy,
            tiny_model_dir,
            f"--trainer.strategy={strategy}",
            "--trainer.max_steps=2",
            engine,
            *evaluation,
        )
        for strategy, engine in engines.items()
    }
    print("\nwall time (s): " + ", ".join(f"{name} {value:.1f}" for name, value in seconds.items()))
    ddp, fsdp2 = records(tmp_path / "ddp"), records(tmp_path / "fsdp2")
    for rank in range(2):
        assert fsdp2[rank]["strategy"] == "FSDP2Strategy" and fsdp2[rank]["step"] == [1, 2]
        assert (fsdp2[rank]["tensor_parallel_size"], ddp[rank]["tensor_parallel_size"]) == (2, 1)
        assert fsdp2[rank]["loss"] == pytest.approx(ddp[rank]["loss"], abs=TOLERANCE)
        assert fsdp2[rank]["grad_norm"] == pytest.approx(ddp[rank]["grad_norm"], rel=TOLERANCE)
        assert max_abs_diff(fsdp2[rank]["student"], ddp[rank]["student"]) <= TOLERANCE
    reports = {
        strategy: tmp_path / strategy / "runs/egrsd/version_0/eval/step_000002"
        for strategy in ("ddp", "fsdp2")
    }
    for rank in range(2):
        name = f"completions.rank{rank}.jsonl"
        assert (reports["fsdp2"] / name).read_text() == (reports["ddp"] / name).read_text() != ""
    scores = {
        strategy: json.loads((folder / "results.json").read_text()) for strategy, folder in reports.items()
    }
    assert scores["fsdp2"]["benchmarks"] == scores["ddp"]["benchmarks"]
    # `validate` under FSDP2 on the step-2 checkpoint: the same policy reaches the engines, the same evaluation.
    (checkpoint,) = (tmp_path / "fsdp2").glob("runs/egrsd/version_0/checkpoints/epoch=*-step=2.ckpt")
    validate_seconds = run(
        tmp_path / "validate",
        tiny_model_dir,
        "--trainer.strategy=fsdp2",
        engines["fsdp2"],
        *evaluation,
        f"--ckpt_path={checkpoint}",
        command="validate",
    )
    print(f"validate: {validate_seconds:.1f} s")
    validated = (
        tmp_path / "validate/runs/egrsd/version_0/eval" / checkpoint.stem
    )  # labelled by the checkpoint
    for rank in range(2):
        name = f"completions.rank{rank}.jsonl"
        assert (validated / name).read_text() == (reports["fsdp2"] / name).read_text()


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")  # pytest's own argv
def test_fsdp2_checkpoint_loads_on_one_process(runs, tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    """``main.py validate`` and ``egrsd diagnose``'s loader, without FSDP2 (one process), load the FSDP2
    checkpoint's adapters: the final LoRA."""
    from egrsd_pl.cli import build_cli
    from egrsd_pl.testbed.warmstart import fixed_threads

    (path,) = runs["fsdp2"].glob(f"runs/egrsd/version_0/checkpoints/epoch=*-step={STEPS}.ckpt")
    monkeypatch.chdir(tmp_path)
    with fixed_threads(1):
        cli = build_cli(
            [
                "validate",
                "--trainer.accelerator=cpu",
                "--trainer.devices=1",
                "--trainer.enable_progress_bar=false",
                f"--model.model_name_or_path={tiny_model_dir}",
                "--model.lora_rank=8",
                "--model.lora_alpha=16",
                "--teacher.schedule=ema",
                f"--ckpt_path={path}",
                '--evaluation.benchmarks=[{"name": "synthetic", "limit": 2}]',
                "--evaluation.k=1",
                "--evaluation.max_new_tokens=8",
                "--evaluation.progress=false",
                "--evaluation.verbose=false",
                "--summary.enabled=false",
            ]
        )
    final = records(runs["fsdp2"])[0]
    assert max_abs_diff(cli.model.adapter_parameters("default"), final["student"]) == 0
    assert max_abs_diff(cli.model.adapter_parameters("teacher"), final["teacher"]) == 0
    # `egrsd diagnose` reads the run's module from the .ckpt and from the PEFT folder beside it alike.
    from egrsd_pl.cli import parse_run
    from egrsd_pl.diagnostics.command import load_module

    base = [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        f"--model.model_name_or_path={tiny_model_dir}",
        "--model.lora_rank=8",
        "--model.lora_alpha=16",
    ]
    for source in (path, path.with_name(path.stem + "_adapter")):
        module = load_module([*base, "--ckpt_path", str(source)], parse_run)
        assert max_abs_diff(module.adapter_parameters("default"), final["student"]) == 0, source

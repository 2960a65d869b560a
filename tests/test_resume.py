"""Exact resume and the checkpoint's PEFT adapter, on the tiny Qwen3 through the real CLI (CPU).

A straight run and a stopped-then-resumed run (``--ckpt_path last``) must end with the same LoRA
weights (student and EMA teacher), the same reward statistics and the same data position; the
adapter folder beside a checkpoint must load with plain PEFT and give the module's logits; a
``python main.py fit`` killed with SIGTERM must leave a checkpoint that resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from egrsd_pl.callbacks.checkpoint import adapter_dir
from egrsd_pl.callbacks.reward_statistics import RewardStatistics
from egrsd_pl.callbacks.teacher_update import TeacherUpdate
from egrsd_pl.cli import build_cli
from egrsd_pl.testbed.warmstart import fixed_threads  # one intra-op thread: far faster on 2 shared cores

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning"),  # pytest's own argv
]

REPO = Path(__file__).resolve().parents[1]
# 6 problems in batches of 2: 3 steps per epoch, so the runs below cross two epoch boundaries.
STRAIGHT_STEPS = 6
STOPS = (2, 4, 6)  # the resumed run stops after step 2 and after step 4, and resumes each time


def cli_args(model_dir: str | os.PathLike[str], max_steps: int, *extra: str) -> list[str]:
    """A few-second EGRSD run: 6 problems, batch 2, 24 new tokens, LoRA r 8, EMA teacher (α 0.5)."""
    return [
        "fit",
        "--seed_everything=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",
        f"--trainer.max_steps={max_steps}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--model.model_name_or_path={model_dir}",
        "--model.lora_rank=8",
        "--model.lora_alpha=16",
        "--model.learning_rate=1e-3",
        "--model.logit_chunk_size=256",
        "--model.log_text_every_n_steps=0",
        "--data.train_source=synthetic:6",
        "--data.batch_size=2",
        "--data.max_new_tokens=24",
        "--data.max_length=1024",
        "--teacher.schedule=ema",
        "--teacher.ema_alpha=0.5",
        "--reward_stats.warmup_steps=1",
        "--checkpoint.every_n_train_steps=100",  # only the final step saves: that is what resumes
        *extra,
    ]


@contextmanager
def working_dir(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def lora_weights(cli: Any, adapter: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.adapter_parameters(adapter).items()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def reward_stats(cli: Any) -> dict[str, Any]:
    return next(c for c in cli.trainer.callbacks if isinstance(c, RewardStatistics)).state_dict()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Any]:
    """Six straight steps (checkpoint every 2), and 2 + 2 + 2 steps with ``--ckpt_path last`` twice."""
    straight_dir, resumed_dir = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    with fixed_threads(1), working_dir(straight_dir):
        straight = build_cli(cli_args(tiny_model_dir, STRAIGHT_STEPS, "--checkpoint.every_n_train_steps=2"))
    resumed = []
    with fixed_threads(1), working_dir(resumed_dir):
        for index, stop in enumerate(STOPS):
            resumed.append(
                build_cli(cli_args(tiny_model_dir, stop, *(["--ckpt_path=last"] if index else [])))
            )
    return {
        "straight": straight,
        "resumed": resumed,
        "straight_dir": straight_dir,
        "resumed_dir": resumed_dir,
    }


def checkpoint_at(folder: Path, step: int) -> dict[str, Any]:
    (path,) = folder.glob(f"runs/egrsd/version_*/checkpoints/epoch=*-step={step}.ckpt")
    return torch.load(path, weights_only=True)  # Lightning's own default for loading


def test_stopped_and_resumed_runs_equal_the_straight_run(runs):
    """4 steps straight = 2 + resume + 2; 6 straight = 2 + 2 + 2 (resumed mid-epoch both times)."""
    straight_dir, resumed_dir = runs["straight_dir"], runs["resumed_dir"]
    for step in STOPS[1:]:
        expected, actual = checkpoint_at(straight_dir, step), checkpoint_at(resumed_dir, step)
        diff = max_abs_diff(expected["state_dict"], actual["state_dict"])
        print(
            f"\nstep {step}: straight vs resumed checkpoint, LoRA (student + teacher) max |diff| {diff:.3g}"
        )
        assert diff <= 1e-6
        assert expected["callbacks"]["RewardStatistics"] == actual["callbacks"]["RewardStatistics"]
        assert expected["callbacks"]["TeacherUpdate"] == actual["callbacks"]["TeacherUpdate"]
        assert expected["RolloutDataModule"] == actual["RolloutDataModule"]
    # After step 4 the data stands at batch 1 of epoch 1 (3 batches per epoch).
    assert checkpoint_at(resumed_dir, 4)["RolloutDataModule"] == {"epoch": 1, "batches_in_epoch": 1}
    straight, resumed = runs["straight"], runs["resumed"][-1]
    for adapter in ("default", "teacher"):
        diff = max_abs_diff(lora_weights(straight, adapter), lora_weights(resumed, adapter))
        print(f"final {adapter} adapter, straight vs resumed: max |diff| {diff:.3g}")
        assert diff <= 1e-6
    assert reward_stats(straight) == reward_stats(resumed)
    print(f"reward statistics after {STRAIGHT_STEPS} steps, both runs: {reward_stats(straight)['stats']}")
    assert reward_stats(straight)["stats"]["steps"] == STRAIGHT_STEPS  # one merge per optimizer step
    assert (
        straight.datamodule.state_dict()
        == resumed.datamodule.state_dict()
        == {"epoch": 2, "batches_in_epoch": 0}
    )
    # The teacher adapter was registered once, not again on resume.
    assert list(resumed.model.policy.peft_config) == ["default", "teacher"]
    # Not vacuous: training moved the student (LoRA B starts at 0) and the EMA teacher lags behind it.
    student = lora_weights(straight, "default")
    assert max(float(v.abs().max()) for k, v in student.items() if "lora_B" in k) > 0
    assert max_abs_diff(lora_weights(straight, "teacher"), student) > 0


def test_resumed_runs_write_into_new_version_folders_and_keep_the_old_ones(runs):
    folder = runs["resumed_dir"]
    checkpoints = sorted(p.relative_to(folder).as_posix() for p in folder.glob("runs/*/*/checkpoints/*.ckpt"))
    assert checkpoints == [
        "runs/egrsd/version_0/checkpoints/epoch=0-step=2.ckpt",
        "runs/egrsd/version_0/checkpoints/last.ckpt",
        "runs/egrsd/version_1/checkpoints/epoch=1-step=4.ckpt",
        "runs/egrsd/version_1/checkpoints/last.ckpt",
        "runs/egrsd/version_2/checkpoints/epoch=1-step=6.ckpt",
        "runs/egrsd/version_2/checkpoints/last.ckpt",
    ]


def test_checkpoint_holds_only_adapters_and_the_algorithm_state(runs):
    checkpoint = checkpoint_at(runs["straight_dir"], STRAIGHT_STEPS)
    keys = checkpoint["state_dict"].keys()
    assert all("lora_" in k for k in keys)
    assert any(".default." in k for k in keys) and any(".teacher." in k for k in keys)
    assert checkpoint["callbacks"]["RewardStatistics"]["stats"]["steps"] == STRAIGHT_STEPS
    assert checkpoint["callbacks"]["TeacherUpdate"] == {
        "schedule": "ema",
        "num_updates": 6,
        "last_updated_step": 6,
    }
    assert checkpoint["RolloutDataModule"] == {
        "epoch": 1,
        "batches_in_epoch": 3,
    }  # saved before the epoch closed
    assert len(checkpoint["optimizer_states"]) == 1 and set(checkpoint["rng_states"]) >= {
        "torch",
        "numpy",
        "python",
    }


def test_adapter_beside_the_checkpoint_loads_with_plain_peft_and_gives_the_module_logits(
    runs, tiny_model_dir
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = adapter_dir(runs["straight_dir"] / "runs/egrsd/version_0/checkpoints/last.ckpt")
    assert {p.name for p in folder.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "teacher",
    }
    assert {p.name for p in (folder / "teacher").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    module = runs["straight"].model
    input_ids = torch.tensor(
        [[5, 17, 42, 99, 3, 250, 7, 11]]
    )  # [1, 8] arbitrary ids of the 1,024-token vocabulary
    module.policy.eval()
    with torch.no_grad():
        student_logits = module.policy(input_ids=input_ids).logits  # [1, 8, V]
        with module.teacher.weights():
            teacher_logits = module.policy(input_ids=input_ids).logits  # [1, 8, V]
    for subfolder, expected in (("", student_logits), ("teacher", teacher_logits)):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        plain = PeftModel.from_pretrained(base, str(folder / subfolder)).eval()
        with torch.no_grad():
            logits = plain(input_ids=input_ids).logits  # [1, 8, V]
        diff = float((logits - expected).abs().max())
        print(f"\nplain PEFT vs module logits ({subfolder or 'student'}): max |diff| {diff:.3g}")
        assert diff <= 1e-6
    assert float((student_logits - teacher_logits).abs().max()) > 0  # two different adapters were compared


def test_gradient_accumulation_resume_and_once_per_step_updates(tiny_model_dir, tmp_path):
    """accumulate_grad_batches 2 over 3 micro-batches per epoch: steps of 2, 1, 2, 1 micro-batches.

    The rollouts come from ``test_ddp.FixedEngine`` (half of them correct), so ``σ_r > 0`` and, after
    the 1-step warm-up, the advantages of steps 2-4 use the running statistics: a resume that lost
    or double-counted them would change the weights.
    """
    options = (
        "--trainer.accumulate_grad_batches=2",
        "--data.max_new_tokens=32",
        '--data.engine={"class_path": "test_ddp.FixedEngine", "init_args": {"source": "synthetic:6"}}',
    )
    with fixed_threads(1), working_dir(tmp_path / "straight"):
        straight = build_cli(cli_args(tiny_model_dir, 4, *options))
    with fixed_threads(1), working_dir(tmp_path / "resumed"):
        build_cli(cli_args(tiny_model_dir, 2, *options))
        resumed = build_cli(cli_args(tiny_model_dir, 4, *options, "--ckpt_path=last"))
    for adapter in ("default", "teacher"):
        diff = max_abs_diff(lora_weights(straight, adapter), lora_weights(resumed, adapter))
        print(f"\naccumulation 2, {adapter}: straight vs 2 + resume + 2 max |diff| {diff:.3g}")
        assert diff <= 1e-6
    stats = reward_stats(straight)
    assert stats == reward_stats(resumed)
    print(f"reward statistics after 4 steps, both runs: {stats['stats']}")
    # One merge per optimizer step, of every micro-batch's rewards: 2 epochs x 3 micro-batches x 2 rollouts.
    assert (stats["stats"]["steps"], stats["stats"]["count"]) == (4, 12)
    assert stats["stats"]["mean"] > 0 and stats["stats"]["m2"] > 0  # σ_r > 0: the statistics were used
    teacher = next(c for c in straight.trainer.callbacks if isinstance(c, TeacherUpdate))
    assert teacher.teacher is straight.model.teacher  # the callback drives the module's teacher
    assert straight.model.teacher.num_updates == 4  # once per optimizer step, not per micro-batch


def test_crisp_resume_across_a_teacher_refresh_is_exact(tiny_model_dir, tmp_path):
    """CRISP, hard copy every 3 steps: 4 straight steps = 2 + resume + 2, the refresh after step 3 in between."""
    options = ("--model.objective=crisp", "--teacher.schedule=hard_copy", "--teacher.every_k_steps=3")
    with fixed_threads(1), working_dir(tmp_path / "straight"):
        straight = build_cli(cli_args(tiny_model_dir, 4, *options))
    with fixed_threads(1), working_dir(tmp_path / "resumed"):
        stopped = build_cli(cli_args(tiny_model_dir, 2, *options))
        stopped_teacher = lora_weights(stopped, "teacher")
        resumed = build_cli(cli_args(tiny_model_dir, 4, *options, "--ckpt_path=last"))
    # Before the refresh the teacher is the initial (zero-B, i.e. base) adapter; after it, not.
    assert all(float(v.abs().max()) == 0 for k, v in stopped_teacher.items() if "lora_B" in k)
    assert max(float(v.abs().max()) for k, v in lora_weights(resumed, "teacher").items() if "lora_B" in k) > 0
    for adapter in ("default", "teacher"):
        diff = max_abs_diff(lora_weights(straight, adapter), lora_weights(resumed, adapter))
        print(f"\ncrisp, {adapter}: straight vs 2 + resume + 2 max |diff| {diff:.3g}")
        assert diff == 0
    teachers = [
        next(c for c in cli.trainer.callbacks if isinstance(c, TeacherUpdate)) for cli in (straight, resumed)
    ]
    assert teachers[0].state_dict() == teachers[1].state_dict()
    assert teachers[0].state_dict() == {"schedule": "hard_copy", "num_updates": 1, "last_updated_step": 3}
    # The teacher is the student as it was after step 3: the student has moved on at step 4.
    assert max_abs_diff(lora_weights(resumed, "teacher"), lora_weights(resumed, "default")) > 0


VLLM_PROMPT_LOGPROBS = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
model_dir, adapter, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
llm = LLM(model=model_dir, dtype="float32", enable_lora=True, max_lora_rank=8, max_model_len=256, enforce_eager=True)
params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
out = {}
for name, request in (("base", None), ("adapter", LoRARequest("checkpoint", 1, adapter))):
    (result,) = llm.generate([{"prompt_token_ids": ids}], params, lora_request=request, use_tqdm=False)
    out[name] = [None if entry is None else entry[token].logprob for entry, token in zip(result.prompt_logprobs, ids)]
print("RESULT" + json.dumps(out))
"""


@pytest.mark.vllm
def test_adapter_beside_the_checkpoint_loads_in_vllm(runs, tiny_model_dir):
    """vLLM's ``LoRARequest`` on the folder scores a sequence as HF + PEFT does (prompt log-probs)."""
    pytest.importorskip("vllm")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = adapter_dir(runs["straight_dir"] / "runs/egrsd/version_0/checkpoints/last.ckpt")
    ids = [5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 300, 12]
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-c", VLLM_PROMPT_LOGPROBS, str(tiny_model_dir), str(folder), json.dumps(ids)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    vllm_logprobs = json.loads(result.stdout.split("RESULT")[-1])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        logits = plain(input_ids=torch.tensor([ids])).logits[0, :-1]  # [T-1, V] predicts tokens 1..T-1
    hf_logprobs = (
        torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    )
    ours = torch.tensor(vllm_logprobs["adapter"][1:])  # [T-1]; position 0 has no log-prob
    base_logprobs = torch.tensor(vllm_logprobs["base"][1:])
    diff, effect = float((ours - hf_logprobs).abs().max()), float((ours - base_logprobs).abs().max())
    print(
        f"\nvLLM + adapter vs HF + PEFT prompt log-probs: max |diff| {diff:.3g} (adapter effect {effect:.3g})"
    )
    assert diff <= 1e-4 < effect


def test_sigterm_during_training_leaves_a_checkpoint_that_resumes(tiny_model_dir, tmp_path):
    """``python main.py fit`` gets SIGTERM mid-run: it finishes the step, saves ``last.ckpt`` and exits."""
    args = cli_args(tiny_model_dir, 50, "--checkpoint.every_n_train_steps=1")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "main.py"), *args], cwd=tmp_path, env=env)
    checkpoints = tmp_path / "runs/egrsd/version_0/checkpoints"
    deadline = time.monotonic() + 240
    while not (checkpoints / "epoch=0-step=1.ckpt").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no first checkpoint within 240 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    returncode = process.wait(timeout=240)
    assert returncode == 0  # Lightning's SIGTERMException is a SystemExit without status, not death by signal
    saved = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert 1 <= saved["global_step"] < 50
    assert (adapter_dir(checkpoints / "last.ckpt") / "adapter_model.safetensors").is_file()

    with fixed_threads(1), working_dir(tmp_path):
        resumed = build_cli(
            cli_args(
                tiny_model_dir,
                saved["global_step"] + 1,
                "--checkpoint.every_n_train_steps=1",
                "--ckpt_path=last",
            )
        )
    assert resumed.trainer.global_step == saved["global_step"] + 1
    stats = next(c for c in resumed.trainer.callbacks if isinstance(c, RewardStatistics))
    assert stats.stats.steps == saved["global_step"] + 1  # the restored statistics went on counting

"""DDP on CPU (gloo) through the real CLI: ``python main.py fit --trainer.strategy ddp --trainer.devices 2``.

Equality: one optimizer step on a fixed global batch of 4 problems, as 1 process x 4 problems and as
2 processes x 2 problems, with ``--model.entropy_scope global``. Every rollout has the same number
of completion tokens, so each rank's normaliser ``1/Σm`` is half the global one and DDP's gradient
average equals the 1-process gradient of the global loss (``(1/2)·Σ_r (1/Σm_r)·S_r = (1/Σm)·Σ_r S_r``
when every ``Σm_r = Σm/2``); the global entropy maximum makes every rank's confidence gate the
1-process one. The rollouts come from :class:`FixedEngine` (deterministic completions, half of them
correct), not from sampling, so both runs see the same tokens and rewards.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from egrsd_pl.problem_sources import load_problems
from egrsd_pl.rollout.base import Rollout, RolloutEngine, SamplingConfig

REPO = Path(__file__).resolve().parents[1]
COMPLETION_TOKENS = 16


class FixedEngine(RolloutEngine):
    """Deterministic rollouts of exactly ``length`` tokens: filler, then a boxed answer, then ``<|im_end|>``.

    The problem behind each prompt is found by its text; the boxed answer is the gold one for about
    half of the problems (by a hash of the problem id) and gold + 1 for the others.

    Args:
        source: The ``--data.train_source`` of the run (to look the answers up).
        length: Completion length in tokens (every rollout has this length).
    """

    def __init__(self, source: str = "synthetic:4", length: int = COMPLETION_TOKENS) -> None:
        self.problems = load_problems(source)
        self.length = length
        self.tokenizer: Any = None

    def setup(self, model: Any, tokenizer: Any, *, model_path: str, seed: int) -> None:
        self.tokenizer = tokenizer

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        tokenizer = self.tokenizer
        filler = tokenizer.encode(" so", add_special_tokens=False)
        rollouts = []
        for index, ids in enumerate(prompt_ids):
            prompt = tokenizer.decode(list(ids))
            problem = next(p for p in self.problems if p.problem in prompt)
            correct = int(hashlib.sha1(problem.id.encode()).hexdigest(), 16) % 2 == 0
            answer = problem.answer if correct else str(int(problem.answer) + 1)
            tail = tokenizer.encode(f" \\boxed{{{answer}}}", add_special_tokens=False) + [
                tokenizer.eos_token_id
            ]
            head = (filler * self.length)[: self.length - len(tail)]
            completion = tuple(head + tail)
            assert len(completion) == self.length
            text = tokenizer.decode(list(completion), skip_special_tokens=True)
            rollouts.append(
                Rollout(prompt_index=index, completion_ids=completion, text=text, truncated=False)
            )
        return rollouts


class RecordStep(L.Callback):
    """Writes, per rank, what the equality needs: loss, pre-clip gradients, entropy maxima, final state.

    Args:
        out_dir: Folder of the ``rank{r}.pt`` files.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, Any] = {
            "loss": [],
            "grads": [],
            "entropy_max": [],
            "normaliser": [],
            "local": {},
        }

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        original = pl_module.entropy_max

        def entropy_max(teacher_entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            used = original(teacher_entropy, mask)
            local = torch.where(mask, teacher_entropy, torch.zeros_like(teacher_entropy)).max()
            self.record["entropy_max"].append((float(local), float(used)))
            return used

        pl_module.entropy_max = entropy_max  # type: ignore[method-assign]
        log = pl_module.log

        def log_locally_too(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            self.record["local"][name] = float(value)  # this rank's value, before any reduction
            log(name, value, *args, **kwargs)

        pl_module.log = log_locally_too  # type: ignore[method-assign]

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        self.record["grads"].append(grads)  # after DDP's all-reduce, before clipping

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["loss"].append(float(outputs["loss"]))
        normaliser = outputs["token_quantities"].entropy_max  # what the gate divided by, detached
        self.record["normaliser"].append(None if normaliser is None else float(normaliser))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from egrsd_pl.callbacks.reward_statistics import RewardStatistics

        stats = next(c for c in trainer.callbacks if isinstance(c, RewardStatistics))
        self.record.update(
            metrics={name: float(value) for name, value in trainer.callback_metrics.items()},  # synced
            reward_stats=stats.state_dict(),
            student={k: v.detach().clone() for k, v in pl_module.adapter_parameters("default").items()},
            teacher={k: v.detach().clone() for k, v in pl_module.adapter_parameters("teacher").items()},
            world_size=trainer.world_size,
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}.pt")


def fit_args(workdir: Path, model_dir: str, *args: str) -> list[str]:
    """``fit`` arguments of a tiny run that records into ``workdir/record``."""
    record = {"class_path": "test_ddp.RecordStep", "init_args": {"out_dir": str(workdir / "record")}}
    return [
        "fit",
        "--seed_everything=0",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--model.model_name_or_path={model_dir}",
        "--model.lora_rank=8",
        "--model.lora_alpha=16",
        "--model.learning_rate=1e-3",
        "--model.log_text_every_n_steps=0",
        "--data.max_length=1024",
        f"--trainer.callbacks+={json.dumps(record)}",
        *args,
    ]


def run_main(workdir: Path, model_dir: str, *args: str) -> None:
    """``python main.py fit`` in ``workdir`` (tests/ importable for the engine and the recorder)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "OMP_NUM_THREADS": "1",
    }
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO / "main.py"), *fit_args(workdir, model_dir, *args)]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def run_in_process(workdir: Path, model_dir: str, *args: str) -> None:
    """The same run in this process (one device): no interpreter start-up, one torch thread."""
    from egrsd_pl.cli import build_cli

    workdir.mkdir(parents=True, exist_ok=True)
    previous, threads = Path.cwd(), torch.get_num_threads()
    os.chdir(workdir)
    torch.set_num_threads(1)
    try:
        build_cli(fit_args(workdir, model_dir, *args))
    finally:
        os.chdir(previous)
        torch.set_num_threads(threads)


def load_records(workdir: Path, world_size: int) -> list[dict[str, Any]]:
    return [torch.load(workdir / "record" / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")  # pytest's own argv
def test_two_process_ddp_step_equals_one_process_step_with_global_entropy_max(tiny_model_dir, tmp_path):
    fixed = [
        "--trainer.max_steps=1",
        "--data.train_source=synthetic:4",
        "--data.max_new_tokens=32",
        "--model.entropy_scope=global",
        '--data.engine={"class_path": "test_ddp.FixedEngine", "init_args": {"source": "synthetic:4"}}',
    ]
    run_in_process(
        tmp_path / "one", str(tiny_model_dir), "--trainer.devices=1", "--data.batch_size=4", *fixed
    )
    run_main(
        tmp_path / "two",
        str(tiny_model_dir),
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--data.batch_size=2",
        *fixed,
    )
    (one,) = load_records(tmp_path / "one", 1)
    rank0, rank1 = load_records(tmp_path / "two", 2)
    assert rank0["world_size"] == rank1["world_size"] == 2

    # The global maximum reached both ranks, and it is the 1-process batch maximum.
    (local0, used0), (local1, used1) = rank0["entropy_max"][0], rank1["entropy_max"][0]
    assert local0 != local1  # the scope matters for this batch
    assert used0 == used1 == max(local0, local1) == one["entropy_max"][0][1]

    # Logged extremes reduce with max / min over the ranks (not the mean), and equal the 1-process values.
    (local0, local1), synced = (rank0["local"], rank1["local"]), (rank0["metrics"], rank1["metrics"])
    for name, reduce in (("entropy/max", max), ("gate/omega_min", min)):
        assert local0[name] != local1[name]  # a mean would differ from both
        assert synced[0][name] == synced[1][name] == reduce(local0[name], local1[name])
        assert synced[0][name] == pytest.approx(one["metrics"][name], abs=1e-6)
    # The normaliser the gate used: after the all-reduce, floored at 1 nat; logged and handed to callbacks.
    normaliser = max(used0, 1.0)
    assert rank0["normaliser"] == rank1["normaliser"] == one["normaliser"] == [normaliser]
    assert synced[0]["entropy/normaliser"] == synced[1]["entropy/normaliser"] == pytest.approx(normaliser)

    # DDP minimises the mean of the per-rank losses: equal token counts make it the global loss.
    loss_diff = abs((rank0["loss"][0] + rank1["loss"][0]) / 2 - one["loss"][0])
    grad_diff = max(
        max_abs_diff(rank0["grads"][0], one["grads"][0]), max_abs_diff(rank1["grads"][0], one["grads"][0])
    )
    grad_scale = max(float(g.abs().max()) for g in one["grads"][0].values())
    print(
        f"\n2 vs 1 process: loss |diff| {loss_diff:.3g}, gradient max |diff| {grad_diff:.3g} (max |grad| {grad_scale:.3g})"
    )
    assert loss_diff <= 1e-6 and grad_diff <= 1e-6 and grad_scale > 1e-4
    assert max_abs_diff(rank0["grads"][0], rank1["grads"][0]) == 0  # all-reduced: bit-identical on both ranks

    # Reward statistics: both ranks merged both ranks' rewards, identically, as the single process did.
    assert rank0["reward_stats"] == rank1["reward_stats"]
    single, merged = one["reward_stats"]["stats"], rank0["reward_stats"]["stats"]
    assert merged["count"] == single["count"] == 4 and merged["steps"] == single["steps"] == 1
    assert merged["mean"] == pytest.approx(single["mean"], abs=1e-12) and merged["m2"] == pytest.approx(
        single["m2"], abs=1e-12
    )
    assert single["mean"] > 0  # some rollouts were correct: the rewards were not all zero


@pytest.mark.slow
def test_two_process_ddp_run_with_sampled_rollouts_keeps_ranks_identical(tiny_model_dir, tmp_path):
    run_main(
        tmp_path,
        str(tiny_model_dir),
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=2",
        "--data.train_source=synthetic:8",
        "--data.batch_size=2",
        "--data.max_new_tokens=24",
        "--teacher.schedule=ema",
        "--teacher.ema_alpha=0.5",
        "--checkpoint.every_n_train_steps=1",
    )
    rank0, rank1 = load_records(tmp_path, 2)
    assert rank0["reward_stats"] == rank1["reward_stats"]
    assert rank0["reward_stats"]["stats"]["count"] == 8  # 2 steps x 2 ranks x 2 rollouts
    assert max_abs_diff(rank0["student"], rank1["student"]) == 0
    assert (
        max_abs_diff(rank0["teacher"], rank1["teacher"]) == 0
    )  # each rank moved its own teacher identically
    checkpoints = tmp_path / "runs/egrsd/version_0/checkpoints"
    assert {p.name for p in checkpoints.iterdir()} >= {"epoch=0-step=2.ckpt", "last.ckpt", "last_adapter"}
    saved = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and saved["callbacks"]["RewardStatistics"] == rank0["reward_stats"]

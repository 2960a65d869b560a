"""Benchmark: peak memory and time of one optimizer step of the module, package vs naive (not a test).

    python bench/step_memory.py                          # EGRSD, 4 x 1,024 completion tokens, hidden 1,024
    python bench/step_memory.py --objective opsd --hidden 512

The model is ``testbed:qwen3-shape`` (random weights at Qwen3's vocabulary of 151,936, built and
cached on first use) with ``--hidden``/``--layers``; bfloat16 weights under bf16 autocast, LoRA r 64 on
all projections, gradient checkpointing, AdamW -- the paper's configuration. The batch: ``--rollouts``
random completions of ``--completion-tokens`` tokens behind random student prompts of
``--prompt-tokens`` tokens and teacher prompts ``--teacher-extra-tokens`` longer (the reference
solution), as the DataModule packs them.

- ``package``: ``EGRSDModule.training_step`` (completion positions only, vocabulary math in chunks of
  ``--chunk-size`` positions), backward, clip to 0.1, ``AdamW.step``.
- ``naive``: the same step computed the way the reference OPSD scripts do it: the model's full
  ``[B, L, V]`` logits for the student (with grad) and the teacher (no grad), cut to the completion
  positions, ``log_softmax`` in float32 over ``[B, T, V]``, then gather / entropy / KL, the same
  objective, backward, clip, ``AdamW.step``.

Each method runs once in a fresh subprocess. Peak extra memory is the resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` after the model, optimizer state and batch exist)
minus the resident set at that moment: every page the step touched (activations, logits, autograd
buffers, gradients). The optimizer's moments are created by a warm-up step on another batch before
the measurement, so both methods start from the same state.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from egrsd_pl.datamodule import RolloutBatch  # noqa: E402
from egrsd_pl.losses import ObjectiveInputs, compute_objective  # noqa: E402
from egrsd_pl.module import EGRSDModule  # noqa: E402
from egrsd_pl.prompts import PackedBatch, pack_completions  # noqa: E402
from egrsd_pl.stats import RunningRewardStats  # noqa: E402

METHODS = ("naive", "package")


def make_batch(args: argparse.Namespace, seed: int, vocab: int) -> RolloutBatch:
    """Random prompts and completions (ordinary-token ids), packed behind student and teacher prompts."""
    generator = torch.Generator().manual_seed(seed)

    def ids(length: int) -> list[int]:
        return torch.randint(0, vocab, (length,), generator=generator).tolist()

    completions = [ids(args.completion_tokens) for _ in range(args.rollouts)]
    student = pack_completions([ids(args.prompt_tokens) for _ in completions], completions, pad_id=0)
    teacher_prompts = [ids(args.prompt_tokens + args.teacher_extra_tokens) for _ in completions]
    teacher = pack_completions(teacher_prompts, completions, pad_id=0)
    rewards = torch.tensor([1.25 if i % 2 == 0 else 0.0 for i in range(args.rollouts)])
    return RolloutBatch(
        problems=[],
        rollouts=[],
        rewards=rewards,
        correct=rewards > 0,
        group_ids=torch.zeros(args.rollouts, dtype=torch.long),
        student=student,
        teacher=teacher,
    )


def build_module(args: argparse.Namespace) -> EGRSDModule:
    """The paper's module on ``testbed:qwen3-shape``, outside a Trainer (the step's callbacks stubbed)."""
    module = EGRSDModule(
        f"testbed:qwen3-shape?hidden_size={args.hidden}&num_layers={args.layers}",
        objective=args.objective,
        gamma=0.3,
        window=3 if args.objective == "cl_egrsd" else 0,
        lora_rank=64,
        lora_alpha=128,
        learning_rate=5e-6,
        dtype="bfloat16",
        gradient_checkpointing=True,
        logit_chunk_size=args.chunk_size,
    )
    module.configure_model()
    # Outside a Trainer: the statistics callbacks.RewardStatistics would hand over, and no logging.
    module.reward_statistics = RunningRewardStats()
    module.log_training_step = lambda *_: None  # type: ignore[method-assign]
    return module


def naive_log_probs(module: EGRSDModule, packed: PackedBatch) -> torch.Tensor:
    """``[N, T, V]`` float32 log-probabilities at the completion positions, cut from the full ``[N, L, V]`` logits."""
    logits = module.policy(
        input_ids=packed.input_ids, attention_mask=packed.attention_mask
    ).logits  # [N, L, V]
    index = packed.positions.unsqueeze(-1).expand(-1, -1, logits.size(-1))  # [N, T, V]
    return torch.log_softmax(logits.gather(1, index).float(), dim=-1)  # [N, T, V]


def naive_loss(module: EGRSDModule, batch: RolloutBatch) -> torch.Tensor:
    """The module's objective on full-logit log-probabilities (the reference OPSD scripts' way)."""
    spec, hp = module.objective_spec, module.hparams
    student = batch.student
    mask, targets = student.completion_mask, student.completion_ids.unsqueeze(-1)  # [N, T], [N, T, 1]
    advantages = module.sequence_advantages(batch)  # [N] or None
    student_all = naive_log_probs(module, student)  # [N, T, V]
    student_logp = student_all.gather(-1, targets).squeeze(-1)  # [N, T]
    teacher_logp = teacher_entropy = kl = entropy_max = None
    if spec.token_inputs != "student_logprobs":
        assert batch.teacher is not None
        with torch.no_grad(), module.teacher.weights():
            teacher_all = naive_log_probs(module, batch.teacher)  # [N, T, V]
        if spec.token_inputs == "gated_teacher":
            teacher_logp = teacher_all.gather(-1, targets).squeeze(-1)  # [N, T]
            teacher_entropy = -(teacher_all.exp() * teacher_all).sum(-1)  # [N, T]
            if spec.gated:
                entropy_max = torch.where(mask, teacher_entropy, torch.zeros_like(teacher_entropy)).max()
        elif spec.kl_direction == "reverse":  # crisp: KL(p_θ || p_T)
            kl = (student_all.exp() * (student_all - teacher_all)).sum(-1)  # [N, T]
        else:  # opsd: KL(p_T || p_θ)
            kl = (teacher_all.exp() * (teacher_all - student_all)).sum(-1)  # [N, T]
    loss, _ = compute_objective(
        hp.objective,
        ObjectiveInputs(
            student_logp=student_logp,
            mask=mask,
            advantages=advantages,
            teacher_logp=teacher_logp,
            teacher_entropy=teacher_entropy,
            token_kl=kl,
        ),
        gamma=hp.gamma,
        window=hp.window,
        eps=hp.eps,
        omega_floor=hp.omega_floor,
        entropy_max=entropy_max,
    )
    return loss


def optimizer_step(
    module: EGRSDModule, optimizer: torch.optim.Optimizer, batch: RolloutBatch, method: str
) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step(batch, 0)["loss"] if method == "package" else naive_loss(module, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in module.policy.parameters() if p.requires_grad], 0.1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One step of ``args.method`` after a warm-up step that creates the optimizer state."""
    torch.manual_seed(0)
    module = build_module(args)
    vocab = 1000  # ordinary BPE ids of the testbed; the math does not depend on which ids
    optimizer = module.configure_optimizers()
    warmup_args = argparse.Namespace(**{**vars(args), "completion_tokens": 8, "prompt_tokens": 8})
    optimizer_step(module, optimizer, make_batch(warmup_args, seed=1, vocab=vocab), args.method)
    batch = make_batch(args, seed=0, vocab=vocab)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    baseline = _status_kib("VmRSS") * 1024
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = optimizer_step(module, optimizer, batch, args.method)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _status_kib("VmHWM") * 1024 - baseline
    return {
        "loss": loss,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_extra_bytes": peak,
        "baseline_bytes": baseline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--objective", default="egrsd", choices=["egrsd", "cl_egrsd", "rlsd", "opsd", "grpo"])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the qwen3-shape model")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the qwen3-shape model")
    parser.add_argument("--rollouts", type=int, default=4, help="rollouts in the step (paper: 4 per device)")
    parser.add_argument("--completion-tokens", type=int, default=1024, help="tokens per completion")
    parser.add_argument("--prompt-tokens", type=int, default=500, help="tokens per student prompt")
    parser.add_argument(
        "--teacher-extra-tokens", type=int, default=300, help="reference solution in the teacher prompt"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=1024, help="--model.logit_chunk_size of the package"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # one measurement (subprocess)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method:
        print(json.dumps(measure(args)))
        return

    # Build the model once before timing anything (the subprocesses then load it from the cache).
    from egrsd_pl.testbed.qwen3_shape import ensure_qwen3_shape

    ensure_qwen3_shape(hidden_size=args.hidden, num_layers=args.layers)
    results = {}
    for method in METHODS:
        command = [sys.executable, __file__, *sys.argv[1:], "--method", method]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            sys.exit(f"{method} step failed:\n{done.stderr[-3000:]}")
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
    mib = 2**20
    naive, package = results["naive"], results["package"]
    print(
        f"one {args.objective} optimizer step, testbed:qwen3-shape (V 151,936, hidden {args.hidden}, "
        f"{args.layers} layers), {args.rollouts} x {args.completion_tokens} completion tokens behind "
        f"{args.prompt_tokens}-token prompts (teacher +{args.teacher_extra_tokens}), bf16, LoRA r 64, "
        f"gradient checkpointing; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print()
    print("| method | peak extra memory (MiB) | wall time (s) | CPU time (s) | loss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for method in METHODS:
        result = results[method]
        print(
            f"| {method} | {result['peak_extra_bytes'] / mib:,.0f} | {result['seconds']:.1f} | "
            f"{result['cpu_seconds']:.1f} | {result['loss']:.6f} |"
        )
    share = package["peak_extra_bytes"] / naive["peak_extra_bytes"]
    print()
    print(
        f"package / naive: peak extra memory {share:.1%}, wall time {package['seconds'] / naive['seconds']:.2f}x"
    )


if __name__ == "__main__":
    main()

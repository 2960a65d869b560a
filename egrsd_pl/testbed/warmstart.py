"""Warm start of the tiny model: SFT on a mix of concise, verbose and privileged examples.

The corpus is built with :class:`~egrsd_pl.prompts.PromptBuilder`, so the warm-started model
knows exactly the prompt formats the trainer uses:

- student examples (75 %): student prompt -> chain of thought -> answer. Three in four chains are
  *verbose* (openers, re-checks, corrected false starts, recaps), one in four concise, so the
  warm-started model is wasteful in length; its accuracy is imperfect because the budget is
  short, not because the corpus is wrong.
- teacher examples (25 %): privileged teacher prompt (problem + reference solution) -> the
  concise correct completion, so the adapter-disabled teacher actually reads the reference
  solution when it is shown one (a tiny model trained on student prompts only ignores it).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from egrsd_pl.problem import Problem
from egrsd_pl.prompts import PromptBuilder, pack_completions
from egrsd_pl.rollout.base import SamplingConfig
from egrsd_pl.rollout.hf import HFGenerateEngine
from egrsd_pl.testbed.worlds import WorkedLike, world

WARM_START_THREADS = 1  # fixed: results must not depend on the machine's load (see train_sft)
TEACHER_SHARE = 0.25  # privileged teacher-format examples
VERBOSE_SHARE = 0.75  # verbose chains among the student-format examples
FINGERPRINT_SAMPLES = 8  # entries per tensor in weight_fingerprint


@dataclass(frozen=True)
class SFTConfig:
    """Hyper-parameters of the warm start (defaults: the best accuracy per CPU second in a sweep).

    Attributes:
        batch_size: Examples per optimizer step.
        lr: Peak AdamW learning rate (linear warm-up, then cosine decay to 10 % at the last step).
        warmup_steps: Linear warm-up steps.
        weight_decay: AdamW weight decay.
        pool_size: Distinct training problems; their verbose chains are redrawn every pass.
        teacher_verbose_share: Share of the privileged teacher examples trained towards a verbose chain
            instead of the concise reference. 0 (the shipped testbed): the teacher copies the reference and
            is almost never uncertain. 0.75 (``testbed:tiny?teacher_verbose=0.75``): given the reference, it
            still hesitates where a chain may branch (an opener, a re-check, a recap), as a real teacher
            hesitates where the reference does not fix the wording -- the positions the entropy gate acts on.
        world: The testbed world whose problems and chains are trained (:mod:`egrsd_pl.testbed.worlds`).
    """

    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    pool_size: int = 20_000
    teacher_verbose_share: float = 0.0
    world: str = "tiny"


@dataclass(frozen=True)
class SFTResult:
    """What a warm start did.

    Attributes:
        steps: Optimizer steps taken.
        examples: Training examples seen.
        seconds: Wall-clock seconds.
        final_loss: Exponentially smoothed loss at the end (NaN without steps).
    """

    steps: int
    examples: int
    seconds: float
    final_loss: float


@dataclass(frozen=True)
class GreedyEval:
    """Greedy decoding on held-out problems.

    Attributes:
        accuracy: Share of completions whose last ``\\boxed{}`` after ``</think>`` equals the gold answer.
        mean_length: Mean completion length in tokens (stop token included, as ``Rollout.length``).
        truncated: Share of completions that hit ``max_new_tokens``.
        problems: Number of problems.
    """

    accuracy: float
    mean_length: float
    truncated: float
    problems: int


def example_stream(
    builder: PromptBuilder,
    problems: Sequence[WorkedLike],
    *,
    seed: int,
    teacher_verbose_share: float = 0.0,
) -> Iterator[tuple[list[int], list[int]]]:
    """:func:`labelled_example_stream` without the labels."""
    for prompt, completion, _ in labelled_example_stream(
        builder, problems, seed=seed, teacher_verbose_share=teacher_verbose_share
    ):
        yield prompt, completion


def labelled_example_stream(
    builder: PromptBuilder,
    problems: Sequence[WorkedLike],
    *,
    seed: int,
    teacher_verbose_share: float = 0.0,
) -> Iterator[tuple[list[int], list[int], bool]]:
    """Endless shuffled ``(prompt_ids, completion_ids, is_teacher_example)`` of the warm-start mix over ``problems``.

    A teacher example is the privileged prompt (with ``s*``) and ``completion(rng, verbose=False)``: for
    ``testbed:tiny`` the reference itself, for the mechanism world a concise chain whose free choices are
    drawn afresh, independently of ``s*``.

    ``teacher_verbose_share``: share of the teacher examples whose target is a verbose chain instead of the
    concise reference (see :class:`SFTConfig`).
    """
    rng = random.Random(seed)
    student_prompts: dict[str, list[int]] = {}
    while True:
        for index in rng.sample(range(len(problems)), len(problems)):
            worked = problems[index]
            if rng.random() < TEACHER_SHARE:
                prompt = builder.teacher_prompt_ids(worked.text, worked.solution)
                # Drawn only in the variant, so the default stream (and the shipped build) is unchanged.
                verbose = teacher_verbose_share > 0 and rng.random() < teacher_verbose_share
                yield (
                    prompt,
                    builder.sft_target_ids(worked.completion(rng, verbose=verbose, teacher=True)),
                    True,
                )
                continue
            if worked.id not in student_prompts:
                student_prompts[worked.id] = builder.student_prompt_ids(worked.text)
            target = worked.completion(rng, verbose=rng.random() < VERBOSE_SHARE)
            yield student_prompts[worked.id], builder.sft_target_ids(target), False


def supervised_loss(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    smoothing: Sequence[float] | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the completion tokens; only completion positions reach the LM head.

    ``smoothing``: per example, the label smoothing ``ε`` of its tokens, ``(1 - ε) CE + ε mean_v(-log p_v)``
    (``F.cross_entropy``'s ``label_smoothing``); ``None``: plain cross-entropy.
    """
    device = model.lm_head.weight.device
    packed = [tensor.to(device) for tensor in pack_completions(prompt_ids, completion_ids, pad_id=pad_id)]
    input_ids, attention_mask, positions, targets, mask = packed
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, D]
    index = positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1))  # [B, T, D]
    logits = model.lm_head(hidden.gather(1, index))  # [B, T, V]
    if smoothing is None:
        return F.cross_entropy(logits[mask], targets[mask])  # mask: [B, T]
    epsilon = torch.tensor(smoothing, device=device).unsqueeze(1).expand_as(mask)[mask]  # [N]
    log_probs = F.log_softmax(logits[mask], dim=-1)  # [N, V]
    nll = -log_probs.gather(1, targets[mask].unsqueeze(1)).squeeze(1)  # [N]
    return ((1 - epsilon) * nll - epsilon * log_probs.mean(-1)).mean()


def train_sft(
    model: Any,
    builder: PromptBuilder,
    *,
    steps: int,
    seed: int,
    config: SFTConfig = SFTConfig(),
    stop_after: int | None = None,
    on_step: Callable[[int], None] | None = None,
    progress: bool = False,
) -> SFTResult:
    """``steps`` optimizer steps of SFT on the warm-start mix, on ``WARM_START_THREADS`` CPU threads.

    The learning rate has a linear warm-up and a cosine decay to 10 % over ``steps``. Nothing depends
    on the wall clock, so for a seed the weights after any step are the same on every run on the same
    CPU type and torch build. Leaves the model in eval mode.

    Decision: the thread count is fixed (one thread), because a CPU matrix product sums in an order
    that depends on it; a build that picked the faster setting by measured speed (as this one once
    did) is not reproducible bit for bit, and one thread is also the fastest setting on a shared CPU.

    Args:
        model: The causal LM to train in place.
        builder: Prompt builder of the testbed tokenizer.
        steps: Length of the schedule (the learning rate reaches its floor at ``steps``).
        seed: Seed of the order of the examples and of torch's RNG.
        config: Hyper-parameters.
        stop_after: Stop after this many steps of the same schedule (a reproducible prefix of the run).
        on_step: Called with the number of steps done after every optimizer step.
        progress: Show a tqdm progress bar with the smoothed loss and an ETA.
    """
    if steps <= 0:
        return SFTResult(steps=0, examples=0, seconds=0.0, final_loss=float("nan"))
    last = steps if stop_after is None else min(steps, stop_after)
    torch.manual_seed(seed)
    pool = world(config.world).problems(config.pool_size, seed=seed, split="train")
    batches = _length_sorted_batches(
        labelled_example_stream(builder, pool, seed=seed, teacher_verbose_share=config.teacher_verbose_share),
        config.batch_size,
        seed=seed,
    )
    student_smoothing = world(config.world).student_smoothing
    pad_id = builder.tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )
    model.train()
    start = time.monotonic()
    done = examples = 0
    smoothed = float("nan")
    bar = tqdm(total=last, desc="warm start", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        with fixed_threads(WARM_START_THREADS):
            while done < last:
                batch = next(batches)
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * _lr_factor(done, done / steps, config.warmup_steps)
                smoothing = [0.0 if teacher else student_smoothing for _, _, teacher in batch]
                loss = supervised_loss(
                    model,
                    [p for p, _, _ in batch],
                    [c for _, c, _ in batch],
                    pad_id,
                    smoothing if student_smoothing else None,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                done, examples = done + 1, examples + len(batch)
                smoothed = loss.item() if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * loss.item()
                bar.update(1)
                if done % 25 == 0:
                    bar.set_postfix(loss=f"{smoothed:.3f}", refresh=False)
                if on_step is not None:
                    on_step(done)
    finally:
        bar.close()
        model.eval()
    return SFTResult(done, examples, time.monotonic() - start, smoothed)


def state_digest(model: Any) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``model.state_dict()`` (sorted by name)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weight_fingerprint(model: Any, samples: int = FINGERPRINT_SAMPLES) -> dict[str, dict[str, Any]]:
    """A small, float-tolerant summary of ``model.state_dict()``: per tensor (sorted by name) its L2 norm and
    ``samples`` evenly spaced entries of the flattened tensor (the first and the last included), as floats.

    Unlike :func:`state_digest` it can be compared across CPU types (:func:`fingerprint_drift`): their
    float kernels sum in different orders, so the weights agree closely but not bit for bit.
    """
    fingerprint: dict[str, dict[str, Any]] = {}
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().float().flatten()  # [N]
        index = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel())).round().long()  # [samples]
        fingerprint[name] = {"norm": float(flat.norm()), "sample": [float(v) for v in flat[index]]}
    return fingerprint


def fingerprint_drift(fingerprint: dict[str, Any], reference: dict[str, Any]) -> float:
    """How far two :func:`weight_fingerprint` results are apart: the largest absolute difference of a sampled
    entry or relative difference of a norm; ``inf`` when they do not cover the same tensors and entries."""
    if fingerprint.keys() != reference.keys() or any(
        len(fingerprint[name]["sample"]) != len(reference[name]["sample"]) for name in reference
    ):
        return math.inf
    drift = 0.0
    for name, entry in reference.items():
        other = fingerprint[name]
        drift = max(drift, abs(other["norm"] - entry["norm"]) / max(abs(entry["norm"]), 1e-12))
        drift = max(drift, *(abs(a - b) for a, b in zip(other["sample"], entry["sample"], strict=True)))
    return drift


@contextlib.contextmanager
def fixed_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block, restored after it."""
    original = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(original)


def _lr_factor(step: int, progress: float, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to 0.1 over ``progress`` in [0, 1]."""
    warmup = min(1.0, (step + 1) / warmup_steps)
    return warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _length_sorted_batches(
    stream: Iterator[tuple[list[int], list[int], bool]], batch_size: int, *, seed: int
) -> Iterator[list[tuple[list[int], list[int], bool]]]:
    """Batches cut from groups of 16 batches sorted by length (less padding), in shuffled order."""
    rng = random.Random(seed)
    while True:
        group = sorted((next(stream) for _ in range(16 * batch_size)), key=lambda e: len(e[0]) + len(e[1]))
        batches = [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
        rng.shuffle(batches)
        yield from batches


def boxed_answer(completion: str) -> str | None:
    """The content of the last ``\\boxed{...}`` after the last ``</think>`` (no nested braces)."""
    answer_part = completion.rsplit("</think>", 1)[-1]
    found = re.findall(r"\\boxed\{([^{}]*)\}", answer_part)
    return found[-1].strip() if found else None


@torch.no_grad()
def evaluate_greedy(
    model: Any,
    builder: PromptBuilder,
    problems: Sequence[Problem],
    *,
    privileged: bool = False,
    max_new_tokens: int = 192,
    batch_size: int = 128,
) -> GreedyEval:
    """Greedy accuracy and mean completion length on ``problems`` (student prompts, or teacher prompts)."""
    prompts = [
        builder.teacher_prompt_ids(p.problem, p.solution)
        if privileged
        else builder.student_prompt_ids(p.problem)
        for p in problems
    ]
    engine = HFGenerateEngine(batch_size=batch_size)
    engine.setup(model, builder.tokenizer, model_path="", seed=0)
    rollouts = engine.generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens))
    correct = [boxed_answer(r.text) == p.answer for r, p in zip(rollouts, problems, strict=True)]
    return GreedyEval(
        accuracy=sum(correct) / len(problems),
        mean_length=statistics.fmean(r.length for r in rollouts),
        truncated=sum(r.truncated for r in rollouts) / len(problems),
        problems=len(problems),
    )

"""The on-policy rollout DataModule: problem batches in, fresh scored rollouts packed for both models out.

The DataLoader yields plain problem batches. Right before each training step (Lightning's
``on_after_batch_transfer``) the batch's rollouts are sampled from the *current* policy, scored
(verification + length shaping) and packed into aligned student and teacher inputs from token ids.
By default nothing is ever stale: a rollout is generated in the step that trains on it. With
``--data.async_steps 1`` (a vLLM server engine) the next batch's rollouts are requested at the start of
each step and generated while it trains, one policy update old (docs/algorithm.md#off-policy-rollouts-one-step-async).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from egrsd_pl.losses import ObjectiveSpec
from egrsd_pl.problem import Problem
from egrsd_pl.problem_sources import filter_by_prompt_length, load_problems
from egrsd_pl.prompts import DEFAULT_CONCISE_INSTRUCTION, PackedBatch, PromptBuilder, pack_completions
from egrsd_pl.rewards import AnswerVerifier, length_shaped_reward
from egrsd_pl.rollout.base import (
    Rollout,
    RolloutEngine,
    SamplingConfig,
    check_sequence_fits,
    model_context_length,
)
from egrsd_pl.rollout.hf import HFGenerateEngine
from egrsd_pl.rollout.prefetch import RolloutPrefetcher
from egrsd_pl.sharding import FSDP2Strategy

log = logging.getLogger(__name__)
TeacherPrompt = Literal["reference", "concise"]


@dataclass
class RolloutBatch:
    """Everything one training step needs, for ``N = len(problems) * num_rollouts`` sequences.

    Attributes:
        problems: The ``P`` problems of the batch.
        rollouts: ``N`` rollouts, prompt-major (empty for ``sft``, which trains on the reference).
        rewards: ``[N]`` float32 length-shaped rewards (docs/algorithm.md#step-2-reward).
        correct: ``[N]`` bool verification results.
        group_ids: ``[N]`` long index of each rollout's problem in the batch (GRPO groups).
        student: Student prompt + completion, packed (``sft``: + reference solution).
        teacher: Teacher prompt (privileged, or CRISP's concise one) + the same completion ids
            (``None`` for ``sft``).
        rollout_seconds: Wall time spent generating (one step ahead: waiting for the rollouts).
        sampler_logprobs: ``[N, T]`` float32 log-probs of the completion tokens under the policy that sampled
            them, as the engine reported them (0 at padding), or ``None`` when the engine reports none.
        policy_versions: ``[N]`` long optimizer step whose policy sampled each rollout, or ``None``.
        off_policy: True when the rollouts were requested one step ahead (``--data.async_steps 1``): the
            module then corrects them with truncated importance weights.
    """

    problems: list[Problem]
    rollouts: list[Rollout]
    rewards: Tensor
    correct: Tensor
    group_ids: Tensor
    student: PackedBatch
    teacher: PackedBatch | None
    rollout_seconds: float = 0.0
    sampler_logprobs: Tensor | None = None
    policy_versions: Tensor | None = None
    off_policy: bool = False

    def to(self, device: torch.device) -> RolloutBatch:
        def move(packed: PackedBatch | None) -> PackedBatch | None:
            return None if packed is None else PackedBatch(*(t.to(device) for t in packed))

        self.rewards, self.correct, self.group_ids = (
            self.rewards.to(device),
            self.correct.to(device),
            self.group_ids.to(device),
        )
        self.student = move(self.student)  # type: ignore[assignment]
        self.teacher = move(self.teacher)
        if self.sampler_logprobs is not None:
            self.sampler_logprobs = self.sampler_logprobs.to(device)
        if self.policy_versions is not None:
            self.policy_versions = self.policy_versions.to(device)
        return self


class _ProblemDataset(Dataset[Problem]):
    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> Problem:
        return self.problems[index]


class ResumableShardSampler(Sampler[int]):
    """A seeded per-epoch permutation, sharded by rank, that can resume mid-epoch.

    Rank ``r`` of ``W`` takes items ``r, r + W, ...`` of the epoch's permutation (the tail that does
    not fill every rank is dropped, so every rank runs the same number of steps). ``skip`` drops the
    first items of the first epoch iterated, to continue exactly where a checkpoint stopped.
    """

    def __init__(
        self, num_items: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        if num_items < world_size:
            raise ValueError(f"{num_items} problems cannot be sharded over {world_size} ranks")
        self.num_items, self.seed, self.rank, self.world_size, self.shuffle = (
            num_items,
            seed,
            rank,
            world_size,
            shuffle,
        )
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def __len__(self) -> int:
        # The full epoch, also while skipping: Lightning restores its batch counter on resume and ends the
        # epoch when that counter reaches len(dataloader); a shorter length would end later epochs early.
        return self.num_items // self.world_size

    def shard(self, epoch: int) -> list[int]:
        """This rank's items of ``epoch``, in order (what :meth:`__iter__` yields for it, before any skip)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        per_rank = self.num_items // self.world_size
        return order[self.rank : per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        yield from self.shard(self.epoch)[skip:]


def _collate_problems(problems: list[Problem]) -> list[Problem]:
    return problems


class RolloutDataModule(L.LightningDataModule):
    """Problems in, fresh on-policy rollouts out, every training step.

    Args:
        train_source: Training problems: a local ``.jsonl``/``.json``/``.parquet`` file, a hub
            dataset name (paper: ``siyanzhao/Openthoughts_math_30k_opsd``) or ``synthetic:<n>``
            (the offline testbed's arithmetic problems).
        split: Split of a hub dataset (and of the synthetic generator).
        problem_column: Column holding the problem text.
        solution_column: Column holding the reference solution shown to the teacher.
        answer_column: Column holding the gold answer; when absent the gold is the last
            ``\\boxed{}`` of the solution.
        id_column: Column holding a row id (row numbers are used when absent).
        limit: Keep only the first ``limit`` problems.
        skip_invalid: Count, skip and report malformed rows instead of failing on the first one.
        batch_size: Problems per device per step (paper: 4).
        engine: Rollout engine (default :class:`HFGenerateEngine`; ``egrsd_pl.rollout.VLLMEngine``
            for vLLM).
        num_rollouts: Rollouts per problem (paper: 1).
        temperature: Sampling temperature of training rollouts (paper: 1.1).
        top_p: Nucleus mass (paper: 0.95).
        top_k: Top-k (paper: 20; ``-1`` disables).
        max_new_tokens: Completion cap ``L_max`` (paper: 1,024); also the length-shaping scale.
        length_beta: Length-shaping coefficient ``β_L`` (paper: 0.5).
        max_length: Cap on prompt + completion tokens (paper: 20,000): problems whose teacher
            prompt plus ``max_new_tokens`` exceed it are skipped and counted, never truncated.
        seed: Seed of the problem order and of the rollout samplers (offset per rank and step).
        verify_workers: Processes verifying answers in parallel (math-verify runs out of process so its
            time limits hold in any thread).
        verify_timeout_s: Seconds one answer may take before it is scored wrong (and counted).
        crisp_instruction: The conciseness instruction of CRISP's teacher (``--model.objective crisp``
            only), prepended to the student's prompt as a system turn; the default is our own wording of
            CRISP's intent (see README to paste the authors' text).
        async_steps: 0 (default): every step trains on rollouts of its own policy. 1: the next batch's
            rollouts are generated while this step trains, by the policy one update older, and corrected by
            truncated importance sampling (``--model.is_cap``); needs an engine that generates apart from the
            trainer (:class:`~egrsd_pl.rollout.server.VLLMServerEngine`, ``configs/server.yaml``).
    """

    if TYPE_CHECKING:
        # Lightning types ``hparams`` as a MutableMapping; it is an AttributeDict of the init args.
        hparams: Any

    def __init__(
        self,
        train_source: str = "synthetic:4000",
        split: str = "train",
        problem_column: str = "problem",
        solution_column: str = "solution",
        answer_column: str | None = "answer",
        id_column: str | None = "id",
        limit: int | None = None,
        skip_invalid: bool = False,
        batch_size: int = 4,
        engine: RolloutEngine | None = None,
        num_rollouts: int = 1,
        temperature: float = 1.1,
        top_p: float = 0.95,
        top_k: int = 20,
        max_new_tokens: int = 1024,
        length_beta: float = 0.5,
        max_length: int = 20_000,
        seed: int = 0,
        verify_workers: int = 1,
        verify_timeout_s: float = 5.0,
        crisp_instruction: str = DEFAULT_CONCISE_INSTRUCTION,
        async_steps: int = 0,
    ) -> None:
        super().__init__()
        if not crisp_instruction.strip():
            raise ValueError("--data.crisp_instruction must be a non-empty instruction")
        if batch_size < 1:
            raise ValueError(f"--data.batch_size must be >= 1, got {batch_size}")
        if length_beta < 0:
            raise ValueError(f"--data.length_beta must be >= 0, got {length_beta}")
        if max_length <= max_new_tokens:
            raise ValueError(
                f"--data.max_length ({max_length}) must exceed --data.max_new_tokens ({max_new_tokens})"
            )
        self.sampling = SamplingConfig(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            num_rollouts=num_rollouts,
        )
        self.save_hyperparameters(ignore=["engine"])
        self.engine: RolloutEngine = engine if engine is not None else HFGenerateEngine()
        if async_steps not in (0, 1):
            raise ValueError(
                f"--data.async_steps must be 0 (on-policy) or 1 (one step ahead), got {async_steps}"
            )
        if async_steps and not self.engine.generates_apart:
            raise ValueError(
                f"--data.async_steps 1 needs an engine that generates apart from the trainer, not "
                f"{type(self.engine).__name__} (which samples the training process's own copy of the policy): "
                "use egrsd_pl.rollout.server.VLLMServerEngine (--config configs/server.yaml)"
            )
        self.prefetcher = RolloutPrefetcher()
        self.verifier: AnswerVerifier | None = None
        self.problems: list[Problem] = []
        self.num_skipped_long = 0
        self._sampler: ResumableShardSampler | None = None
        self._batches_in_epoch = 0
        self._epoch_seen = 0
        self._restored: dict[str, int] | None = None
        self._engine_ready = False
        self._kept: list[Problem] = []

    # ----------------------------------------------------------------- data
    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy if self.trainer is not None else None
        if isinstance(strategy, FSDP2Strategy) and not self.engine.supports_sharded_policy:
            raise ValueError(
                f"--data.engine {type(self.engine).__name__} does not work under --trainer.strategy fsdp2 (its "
                "weight sync reads the module's own tensors, which are shards); use egrsd_pl.rollout.vllm.VLLMEngine "
                "with sync merged, egrsd_pl.rollout.hf.HFGenerateEngine, or --trainer.strategy ddp (docs/fsdp.md)"
            )
        if stage == "fit" and not self.problems:
            hp = self.hparams
            self.problems = load_problems(
                hp.train_source,
                split=hp.split,
                problem_column=hp.problem_column,
                solution_column=hp.solution_column,
                answer_column=hp.answer_column,
                id_column=hp.id_column,
                limit=hp.limit,
                skip_invalid=hp.skip_invalid,
            )
        if self.verifier is None:
            self.verifier = self._new_verifier()

    def _new_verifier(self) -> AnswerVerifier:
        return AnswerVerifier(
            num_workers=self.hparams.verify_workers, timeout_s=self.hparams.verify_timeout_s
        )

    def train_dataloader(self) -> DataLoader:
        builder, hp = self._prompt_builder(), self.hparams
        spec: ObjectiveSpec = self._module().objective_spec
        teacher_lengths = [
            len(self.teacher_prompt_ids(builder, spec.teacher_prompt, p)) for p in self.problems
        ]
        budget = hp.max_length - hp.max_new_tokens
        kept, self.num_skipped_long = filter_by_prompt_length(
            self.problems, teacher_lengths, max_prompt_tokens=budget
        )
        if self.num_skipped_long:
            log.warning(
                "skipped %d of %d problems whose teacher prompt + %d new tokens exceed --data.max_length %d",
                self.num_skipped_long,
                len(self.problems),
                self.hparams.max_new_tokens,
                self.hparams.max_length,
            )
        if not kept:
            raise ValueError(f"no training problem fits --data.max_length {self.hparams.max_length}")
        if hp.async_steps and not spec.uses_rollouts:
            raise ValueError(
                f"--data.async_steps 1 has no rollouts to generate ahead for --model.objective "
                f"{self._module().hparams.objective}: set it to 0"
            )
        accumulate = self.trainer.accumulate_grad_batches if self.trainer else 1
        if hp.async_steps and accumulate != 1:
            raise ValueError(
                f"--data.async_steps 1 requests each optimizer step's batch one step ahead: it needs "
                f"--trainer.accumulate_grad_batches 1, got {accumulate}"
            )
        self._kept = kept
        self.check_lengths(builder, kept, longest_teacher=max(n for n in teacher_lengths if n <= budget))
        trainer = self.trainer
        self._sampler = ResumableShardSampler(
            len(kept),
            seed=self.hparams.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )
        if self._restored is not None:
            self._sampler.set_epoch(self._restored["epoch"])
            self._sampler.skip = self._restored["batches_in_epoch"] * self.hparams.batch_size
            self._epoch_seen, self._batches_in_epoch = (
                self._restored["epoch"],
                self._restored["batches_in_epoch"],
            )
            self._restored = None
        return DataLoader(
            _ProblemDataset(kept),
            batch_size=self.hparams.batch_size,
            sampler=self._sampler,
            collate_fn=_collate_problems,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        """One placeholder batch: ``validate`` runs avg@K evaluation in ``callbacks.PeriodicEvaluation``."""
        return DataLoader(cast(Dataset[int], [0]), batch_size=1)

    def check_lengths(
        self, builder: PromptBuilder, problems: Sequence[Problem], *, longest_teacher: int
    ) -> None:
        """Before any rollout, the longest student prompt + ``max_new_tokens`` must fit the engine and the
        model's context (then the engine reserves it), the longest teacher prompt + ``max_new_tokens``
        the model's context; else :class:`~egrsd_pl.rollout.base.SequenceTooLongError` names the flag."""
        context = model_context_length(getattr(self._module(), "policy", None))
        new_tokens, flag = self.hparams.max_new_tokens, "--data.max_new_tokens"
        student = max(len(builder.student_prompt_ids(p.problem)) for p in problems)
        for prompt, name, limit in (
            (longest_teacher, "the longest teacher prompt kept by --data.max_length", None),
            (student, "the longest student prompt", self.engine.max_sequence_length()),
        ):
            check_sequence_fits(
                prompt,
                new_tokens,
                model_context=context,
                engine_limit=limit,
                new_tokens_flag=flag,
                prompt_name=name,
            )
        self.engine.reserve_length(student + new_tokens)

    def teacher_prompt_ids(self, builder: PromptBuilder, kind: TeacherPrompt, problem: Problem) -> list[int]:
        """The teacher prompt of an objective (``ObjectiveSpec.teacher_prompt``): CRISP's concise one, or
        problem + reference solution."""
        if kind == "concise":
            return builder.concise_teacher_prompt_ids(problem.problem, self.hparams.crisp_instruction)
        return builder.teacher_prompt_ids(problem.problem, problem.solution)

    def _module(self) -> Any:
        return self.trainer.lightning_module if self.trainer else None

    def _prompt_builder(self) -> PromptBuilder:
        builder = getattr(self._module(), "prompt_builder", None)
        if builder is None:
            raise RuntimeError("RolloutDataModule needs a module with a `prompt_builder` (EGRSDModule)")
        return builder

    # ------------------------------------------------------------- rollouts
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # problems stay on the host; the packed tensors move in on_after_batch_transfer

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return batch
        if trainer.current_epoch != self._epoch_seen:
            self._epoch_seen, self._batches_in_epoch = trainer.current_epoch, 0
        self._batches_in_epoch += 1
        module = trainer.lightning_module
        step = trainer.global_step
        seed = _rollout_seed(
            self.hparams.seed, trainer.current_epoch, step, trainer.global_rank, self._batches_in_epoch
        )
        if self.hparams.async_steps:
            return self.make_batch_ahead(batch, module, step=step, seed=seed).to(module.device)
        return self.make_batch(batch, module, step=step, seed=seed).to(module.device)

    def make_batch(self, problems: list[Problem], module: Any, *, step: int, seed: int) -> RolloutBatch:
        """Samples, scores and packs one batch (docs/algorithm.md#step-1-rollouts, step 2) for the module's objective."""
        builder: PromptBuilder = module.prompt_builder
        student_prompts = [builder.student_prompt_ids(p.problem) for p in problems]
        pad_id = module.tokenizer.pad_token_id
        if not module.objective_spec.uses_rollouts:  # sft: the reference solution is the completion
            targets = [builder.sft_target_ids(p.solution) for p in problems]
            return RolloutBatch(
                problems=list(problems),
                rollouts=[],
                rewards=torch.zeros(0),
                correct=torch.zeros(0, dtype=torch.bool),
                group_ids=torch.zeros(0, dtype=torch.long),
                student=pack_completions(student_prompts, targets, pad_id=pad_id),
                teacher=None,
            )
        self.ensure_engine(module)
        self.engine.sync_policy(module.policy, step)
        start = time.perf_counter()
        sampling = self._sampling(seed)
        rollouts = self.engine.generate(student_prompts, sampling)
        rollout_seconds = time.perf_counter() - start
        rewards, correct = self.score(problems, rollouts)
        batch = self.pack_rollouts(problems, rollouts, module, rewards=rewards, correct=correct)
        batch.rollout_seconds = rollout_seconds
        return batch

    def make_batch_ahead(self, problems: list[Problem], module: Any, *, step: int, seed: int) -> RolloutBatch:
        """One-step-async step 1: this batch's rollouts were requested one step ago (the run's first step
        samples them now); after syncing this step's policy, the next batch's are requested in the background.

        The order keeps the policy versions consistent: the request in flight finishes before the servers
        switch to this step's policy, and the next request samples that policy while the step trains on it.
        """
        trainer = self.trainer
        assert trainer is not None
        self.ensure_engine(module)
        builder: PromptBuilder = module.prompt_builder
        epoch, index = trainer.current_epoch, self._batches_in_epoch
        start = time.perf_counter()
        rollouts = self.prefetcher.take(
            epoch=epoch, batch_in_epoch=index, problem_ids=[p.id for p in problems], seed=seed
        )
        self.engine.sync_policy(module.policy, step)
        if rollouts is None:  # nothing was requested ahead: the run's first step samples its policy now
            rollouts = self.engine.generate(
                [builder.student_prompt_ids(p.problem) for p in problems], self._sampling(seed)
            )
        rollout_seconds = time.perf_counter() - start
        next_epoch, next_index, upcoming = self.next_problems(epoch, index)
        next_seed = _rollout_seed(self.hparams.seed, next_epoch, step + 1, trainer.global_rank, next_index)
        prompts, sampling = (
            [builder.student_prompt_ids(p.problem) for p in upcoming],
            self._sampling(next_seed),
        )
        self.prefetcher.submit(
            lambda: self.engine.generate(prompts, sampling),
            epoch=next_epoch,
            batch_in_epoch=next_index,
            problem_ids=[p.id for p in upcoming],
            seed=next_seed,
        )
        rewards, correct = self.score(problems, rollouts)
        batch = self.pack_rollouts(problems, rollouts, module, rewards=rewards, correct=correct)
        batch.rollout_seconds, batch.off_policy = rollout_seconds, True
        return batch

    def next_problems(self, epoch: int, batch_in_epoch: int) -> tuple[int, int, list[Problem]]:
        """``(epoch, 1-based batch of the epoch, problems)`` of the batch after ``batch_in_epoch`` of ``epoch``,
        as the DataLoader will yield it (the sampler's order, ``drop_last``)."""
        assert self._sampler is not None
        size = self.hparams.batch_size
        if batch_in_epoch >= len(self._sampler) // size:  # the last full batch: the next epoch's first
            epoch, batch_in_epoch = epoch + 1, 0
        items = self._sampler.shard(epoch)[batch_in_epoch * size : (batch_in_epoch + 1) * size]
        return epoch, batch_in_epoch + 1, [self._kept[i] for i in items]

    def _sampling(self, seed: int) -> SamplingConfig:
        return SamplingConfig(**{**self.sampling.__dict__, "seed": seed})

    def pack_rollouts(
        self,
        problems: Sequence[Problem],
        rollouts: Sequence[Rollout],
        module: Any,
        *,
        rewards: Tensor,
        correct: Tensor,
        teacher_prompt: TeacherPrompt | None = None,
    ) -> RolloutBatch:
        """Packs scored rollouts behind the student prompt and behind the teacher prompt (step 2's end).

        ``egrsd diagnose`` packs its completions with it too, so both models see what a training step
        feeds them.

        Args:
            problems: The ``P`` problems; ``rollouts[i].prompt_index`` indexes them.
            rollouts: ``N`` rollouts.
            module: The module (``prompt_builder``, ``tokenizer``, ``objective_spec``).
            rewards: ``[N]`` rewards.
            correct: ``[N]`` verification results.
            teacher_prompt: ``reference`` or ``concise``; ``None``: the objective's.
        """
        builder: PromptBuilder = module.prompt_builder
        pad_id = module.tokenizer.pad_token_id
        kind = teacher_prompt or module.objective_spec.teacher_prompt
        student_prompts = [builder.student_prompt_ids(p.problem) for p in problems]
        completions = [list(r.completion_ids) for r in rollouts]
        owners = [problems[r.prompt_index] for r in rollouts]
        sampler_logprobs = None
        if rollouts and all(r.logprobs is not None for r in rollouts):
            sampler_logprobs = torch.zeros(len(rollouts), max(r.length for r in rollouts))  # [N, T]
            for row, rollout in enumerate(rollouts):
                sampler_logprobs[row, : rollout.length] = torch.tensor(rollout.logprobs, dtype=torch.float32)
        policy_versions = None
        if rollouts and all(r.policy_version is not None for r in rollouts):
            policy_versions = torch.tensor([r.policy_version for r in rollouts], dtype=torch.long)  # [N]
        return RolloutBatch(
            problems=list(problems),
            rollouts=list(rollouts),
            rewards=rewards,
            correct=correct,
            group_ids=torch.tensor([r.prompt_index for r in rollouts], dtype=torch.long),
            student=pack_completions(
                [student_prompts[r.prompt_index] for r in rollouts], completions, pad_id=pad_id
            ),
            teacher=pack_completions(
                [self.teacher_prompt_ids(builder, kind, p) for p in owners], completions, pad_id=pad_id
            ),
            sampler_logprobs=sampler_logprobs,
            policy_versions=policy_versions,
        )

    def score(self, problems: Sequence[Problem], rollouts: Sequence[Rollout]) -> tuple[Tensor, Tensor]:
        """Verifies each rollout and applies length shaping: ``([N] rewards, [N] correct)``.

        Decision (docs/algorithm.md#step-2-reward, truncated rollouts): a completion cut at ``L_max`` is verified like
        any other. The verifier reads the last ``\\boxed{}`` after the last ``</think>``, so a truncated
        completion still inside its thinking, or without a closed box, has no answer and gets
        ``r = 0`` ("truncated-without-answer"); one cut after its final boxed answer was already
        written is scored on that answer (``r = 1 + β_L · (1 − L_max / L_max) = 1`` when correct).
        The avg@K evaluation applies the same rule (:func:`egrsd_pl.evaluation.evaluate`).
        """
        if self.verifier is None:
            self.verifier = self._new_verifier()
        golds = [problems[r.prompt_index].answer for r in rollouts]
        correct = [bool(ok) for ok in self.verifier.verify_batch([r.text for r in rollouts], golds)]
        rewards = [
            length_shaped_reward(ok, r.length, self.sampling.max_new_tokens, self.hparams.length_beta)
            for ok, r in zip(correct, rollouts, strict=True)
        ]
        return torch.tensor(rewards, dtype=torch.float32), torch.tensor(correct, dtype=torch.bool)

    def ensure_engine(self, module: Any) -> None:
        if not self._engine_ready:
            rank = self.trainer.global_rank if self.trainer else 0
            self.engine.setup(
                module.policy,
                module.tokenizer,
                model_path=module.model_path,
                seed=self.hparams.seed + 7919 * rank,
            )
            self._engine_ready = True

    def teardown(self, stage: str) -> None:
        self.prefetcher.close()
        if self._engine_ready:
            self.engine.close()
            self._engine_ready = False
        if self.verifier is not None:
            self.verifier.close()
            self.verifier = None

    # --------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Where the problem order stands and, one step ahead, the rollouts in flight (waited for: they come
        from a policy the checkpoint does not hold, see :mod:`egrsd_pl.rollout.prefetch`)."""
        epoch = self.trainer.current_epoch if self.trainer else 0
        state: dict[str, Any] = {"epoch": epoch, "batches_in_epoch": self._batches_in_epoch}
        if (
            epoch != self._epoch_seen
        ):  # Lightning closed the epoch of the counted batches: the next one starts
            state["batches_in_epoch"] = 0
        if self.hparams.async_steps:
            state["rollouts_ahead"] = self.prefetcher.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = {
            "epoch": int(state_dict["epoch"]),
            "batches_in_epoch": int(state_dict["batches_in_epoch"]),
        }
        if self.hparams.async_steps:
            self.prefetcher.load_state_dict(state_dict.get("rollouts_ahead"))


def _rollout_seed(seed: int, epoch: int, step: int, rank: int, batch_in_epoch: int) -> int:
    """A distinct, reproducible sampler seed per (run seed, epoch, optimizer step, rank, micro-batch)."""
    return (seed * 1_000_003 + epoch * 7_919 + step * 10_007 + rank * 101 + batch_in_epoch) % (2**31 - 1)

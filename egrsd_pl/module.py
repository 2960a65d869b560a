"""The LightningModule: a LoRA student, the same backbone as the teacher, one objective.

``training_step`` follows Algorithm 1 of the paper. Rollouts, rewards and packing (steps 1–2) were
done by :class:`egrsd_pl.datamodule.RolloutDataModule` right before the step; the tensor math of steps
4–11 lives in :mod:`egrsd_pl.losses`; the running reward statistics (steps 3 and 13) are one
:class:`egrsd_pl.stats.RunningRewardStats`, the teacher one :class:`egrsd_pl.teacher.Teacher` (both
driven after each optimizer step by their callbacks); the backbone is loaded by :mod:`egrsd_pl.backbone`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, cast

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor

from egrsd_pl.backbone import ModelPathError, load_backbone, resolve_model_path
from egrsd_pl.datamodule import RolloutBatch
from egrsd_pl.losses import (
    DEFAULT_GATE,
    DEFAULT_IMPORTANCE_CAP,
    OBJECTIVES,
    GateConfig,
    LossStats,
    ObjectiveInputs,
    ObjectiveName,
    ObjectiveSpec,
    TokenInputs,
    TokenQuantities,
    check_objective_window,
    compute_objective,
    confidence_gate,
    group_relative_advantages,
    logprob_gap,
    masked_max,
    masked_mean,
    student_token_logprobs,
    teacher_token_stats,
    token_kl,
    token_quantities,
    truncated_importance_weights,
)
from egrsd_pl.prompts import PackedBatch, PromptBuilder
from egrsd_pl.sharding import FSDP2Strategy, shard_backbone
from egrsd_pl.stats import RunningRewardStats
from egrsd_pl.teacher import Teacher, TeacherSchedule, lora_parameters

__all__ = ["EGRSDModule", "ModelPathError", "TokenQuantities", "resolve_model_path", "token_quantities"]

EntropyScope = Literal["device", "global"]
InputBuilder = Callable[[RolloutBatch, Tensor | None], ObjectiveInputs]  # (batch, advantages) -> inputs
EXTREMES = {"entropy/max": "max", "gate/omega_min": "min"}  # logged metrics reduced by max / min over ranks
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class EGRSDModule(L.LightningModule):
    """Student, teacher and objective of on-policy self-distillation.

    Args:
        model_name_or_path: Base model: a local HF folder, a hub id (``Qwen/Qwen3-4B``) or
            ``testbed:tiny`` (the offline tiny Qwen3, built and cached on first use).
        objective: ``sft``, ``grpo``, ``opsd``, ``rlsd``, ``egrsd``, ``cl_egrsd`` or ``crisp`` (docs/algorithm.md#objectives).
        gamma: Confidence-gate strength ``γ`` (paper: 0.3; 1.0 for CL-EGRSD on 8B). Ignored by
            ``rlsd``, which is ``egrsd`` at ``γ = 0``.
        window: Causal look-ahead ``W`` of ``cl_egrsd`` (paper: 3 on 4B, 5 on 8B); must be 0 for
            every other objective.
        eps: Magnitude clip ``ε`` of ``w = clip(exp(D·δ), 1-ε, 1+ε)`` (paper: 0.2).
        omega_floor: Lower bound of the gate ``ω``, in ``[0, 1]`` (paper: 0.1).
        entropy_scope: Scope of the batch maximum that normalises the teacher entropy:
            ``device`` (the paper's per-device minibatch) or ``global`` (all-reduce MAX over ranks).
        teacher: Teacher schedule: ``frozen`` (adapter disabled, the paper's default), ``ema`` or
            ``hard_copy`` (a second adapter driven by ``callbacks.TeacherUpdate``; linked from
            ``--teacher.schedule`` by the CLI).
        lora_rank: LoRA rank ``r`` (paper: 64).
        lora_alpha: LoRA ``α`` (paper: 128).
        lora_dropout: LoRA dropout (paper: 0).
        lora_target_modules: Projections that get an adapter (paper: q/k/v/o/gate/up/down).
        learning_rate: AdamW learning rate (paper: 5e-6).
        adam_betas: AdamW betas (paper: 0.9, 0.999).
        weight_decay: AdamW weight decay.
        dtype: Dtype the base weights are loaded in (``bfloat16`` on GPUs, ``float32`` on CPU).
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (needs ``flash-attn``).
        gradient_checkpointing: Recompute the backbone's activations in backward.
        trust_remote_code: Allow custom model code from the hub (off by default).
        student_thinking: Chat template ``enable_thinking`` of the student prompt.
        teacher_thinking: Chat template ``enable_thinking`` of the privileged teacher prompt.
        logit_chunk_size: Completion positions projected to the vocabulary at a time.
        log_text_every_n_steps: Write one rollout (prompt, completion, reward) to TensorBoard every
            N optimizer steps (0 disables).
        is_cap: Cap ``C`` of the truncated importance weight ``ρ = min(p_θ(y_t) / q(y_t), C)`` that corrects
            rollouts generated one step ahead (``--data.async_steps 1``; Yao et al. 2025, TIS). Unused on-policy.
    """

    if TYPE_CHECKING:
        # Lightning types ``hparams`` as a MutableMapping; it is an AttributeDict of the init args.
        hparams: Any

    def __init__(
        self,
        model_name_or_path: str = "testbed:tiny",
        objective: ObjectiveName = "egrsd",
        gamma: float = DEFAULT_GATE.gamma,
        window: int = DEFAULT_GATE.window,
        eps: float = 0.2,
        omega_floor: float = DEFAULT_GATE.omega_floor,
        entropy_scope: EntropyScope = "device",
        teacher: TeacherSchedule = "frozen",
        lora_rank: int = 64,
        lora_alpha: int = 128,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        learning_rate: float = 5e-6,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        student_thinking: bool = True,
        teacher_thinking: bool = True,
        logit_chunk_size: int = 1024,
        log_text_every_n_steps: int = 10,
        is_cap: float = DEFAULT_IMPORTANCE_CAP,
    ) -> None:
        super().__init__()
        _validate(objective, teacher, eps=eps)
        self.gate = GateConfig(gamma, window, omega_floor)  # checks --model.gamma / window / omega_floor
        check_objective_window(objective, window)
        if lora_rank < 1:
            raise ValueError(f"--model.lora_rank must be >= 1, got {lora_rank}")
        if learning_rate <= 0:
            raise ValueError(f"--model.learning_rate must be > 0, got {learning_rate}")
        if logit_chunk_size < 1:
            raise ValueError(f"--model.logit_chunk_size must be >= 1, got {logit_chunk_size}")
        if not is_cap > 0:
            raise ValueError(f"--model.is_cap must be > 0, got {is_cap}")
        self.save_hyperparameters()
        self.lora_target_modules = list(lora_target_modules or DEFAULT_LORA_TARGETS)
        self.policy: Any = None
        self.tokenizer: Any = None
        self.prompt_builder: PromptBuilder | None = None
        self.model_path: str = model_name_or_path
        self.strict_loading = False  # checkpoints hold the adapters, not the frozen base weights
        self.teacher = Teacher(teacher)  # moved by callbacks.TeacherUpdate
        self.reward_statistics: RunningRewardStats | None = None  # handed over by callbacks.RewardStatistics
        self._last_batch_end: float | None = None

    # ---------------------------------------------------------------- model
    @property
    def objective_spec(self) -> ObjectiveSpec:
        return OBJECTIVES[self.hparams.objective]

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.require_algorithm_state()

    def require_algorithm_state(self) -> None:
        """Fails before the model loads when a part of the algorithm has no driver (callbacks set up first)."""
        if self.objective_spec.uses_rollouts and self.reward_statistics is None:
            raise RuntimeError(
                "the running reward statistics are part of the algorithm: add callbacks.RewardStatistics to "
                "the Trainer (main.py / egrsd_pl.cli adds it automatically)"
            )
        if self.teacher.has_adapter and self.teacher.driver is None:
            raise RuntimeError(
                f"--model.teacher {self.teacher.schedule!r} needs callbacks.TeacherUpdate to move the teacher "
                "adapter (main.py / egrsd_pl.cli adds it automatically, from --teacher.*)"
            )

    def configure_model(self) -> None:
        """Loads tokenizer and base model, wraps the base with the LoRA student adapter and, under
        ``--trainer.strategy fsdp2``, shards it (:func:`egrsd_pl.sharding.shard_backbone`)."""
        if self.policy is not None:
            return
        from peft import LoraConfig, get_peft_model

        hp = self.hparams
        self.model_path = resolve_model_path(hp.model_name_or_path)
        strategy = self._trainer.strategy if self._trainer is not None else None
        self.tokenizer, base = load_backbone(
            hp.model_name_or_path,
            self.model_path,
            dtype=hp.dtype if hp.dtype == "auto" else getattr(torch, hp.dtype),
            attn_implementation=hp.attn_implementation,
            trust_remote_code=hp.trust_remote_code,
            empty=isinstance(strategy, FSDP2Strategy) and strategy.receives_the_base,
        )
        if hp.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
        lora = LoraConfig(
            r=hp.lora_rank,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=self.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        self.policy = get_peft_model(base, lora)
        self.teacher.attach(self.policy, lora)
        self.policy.train()
        self.shard_policy()
        self.prompt_builder = PromptBuilder(
            self.tokenizer, student_thinking=hp.student_thinking, teacher_thinking=hp.teacher_thinking
        )

    def shard_policy(self) -> None:
        """Applies FSDP2 under :class:`~egrsd_pl.sharding.FSDP2Strategy`; nothing under any other strategy."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP2Strategy):
            shard_backbone(
                self.policy,
                strategy.shard_mesh,
                mp_policy=strategy.mixed_precision_policy(),
                reshard_after_forward=strategy.reshard_after_forward,
                from_rank0=strategy.load_from_rank0 and strategy.world_size > 1,
            )
        elif isinstance(strategy, ModelParallelStrategy):
            raise ValueError(
                f"--trainer.strategy {type(strategy).__name__} is not supported: use --trainer.strategy fsdp2"
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        hp = self.hparams
        return torch.optim.AdamW(
            params, lr=hp.learning_rate, betas=tuple(hp.adam_betas), weight_decay=hp.weight_decay
        )

    def adapter_parameters(self, adapter: str = "default") -> dict[str, Tensor]:
        """The LoRA tensors of one adapter (``default``: the student; ``teacher``), without the adapter name."""
        return lora_parameters(self.policy, adapter)

    @staticmethod
    def saved_state(key: str) -> bool:
        """Whether the state-dict entry ``key`` goes into checkpoints: the adapters (student and, if any,
        teacher) change; the frozen base is reloaded from its path (and never gathered under FSDP2)."""
        return "lora_" in key

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.saved_state(k)}
        # The folder the base was read from (a hub id's snapshot folder names the exact revision).
        checkpoint["base_model_path"] = self.model_path

    # ------------------------------------------------------------ algorithm
    def training_step(self, batch: RolloutBatch, batch_idx: int) -> dict[str, Any]:
        """Algorithm 1 on one micro-batch whose rollouts and rewards (steps 1–2) the DataModule made.

        Returns:
            ``{"loss": loss, "token_quantities": TokenQuantities}`` (detached, for callbacks).
        """
        spec, hp = self.objective_spec, self.hparams
        # Step 3: sequence advantages from earlier steps' rewards (Welford) or the GRPO group; None if unused.
        advantages = self.sequence_advantages(batch)  # [N]
        # Steps 4–5: the per-token quantities this objective reads (student and teacher passes).
        inputs = self.token_input_builders()[spec.token_inputs](batch, advantages)
        # Rollouts generated one step ahead: truncated importance weights ρ (docs/algorithm.md#off-policy-rollouts-one-step-async).
        inputs, rollout_metrics = self.correct_off_policy(batch, inputs)
        # Steps 6–8 per token: H, δ, step 7's denominator in the configured scope and the gate ω (only
        # where a confidence gate reads the entropy); `egrsd diagnose` computes them with the same method.
        quantities = self.gate_quantities(inputs, self.gate if spec.gated else None)
        # Steps 6–11: window minimum, normalisation, gate, magnitude, token advantage, masked mean.
        loss, stats = compute_objective(
            hp.objective,
            inputs,
            gamma=self.gate.gamma,
            window=self.gate.window,
            eps=hp.eps,
            omega_floor=self.gate.omega_floor,
            entropy_max=quantities.entropy_max,  # max(H_max, 1): the gate floors it again, to the same value
        )
        # Step 13: queue the rewards; callbacks.RewardStatistics merges them after the optimizer step.
        if spec.uses_rollouts:
            self.running_reward_statistics().record(batch.rewards)
        self.log_training_step(batch, loss, stats, advantages, quantities, rollout_metrics)
        return {"loss": loss, "token_quantities": quantities}

    def correct_off_policy(
        self, batch: RolloutBatch, inputs: ObjectiveInputs
    ) -> tuple[ObjectiveInputs, dict[str, Tensor]]:
        """Compares the sampler's log-probs with the student's and, for rollouts generated one step ahead,
        sets the truncated importance weights ``ρ`` of the objectives that read them.

        Logs ``async/staleness`` (mean ``step − policy version`` of the rollouts, where the engine reports
        versions), ``async/logprob_gap`` (mean ``|log p_θ(y_t) − log q(y_t)|``, where the engine reports
        log-probs and the objective computes ``log p_θ`` of the sampled tokens) and, when ``ρ`` is applied,
        ``async/is_weight_mean``.

        Decision (docs/algorithm.md#off-policy-rollouts-one-step-async): ``ρ`` multiplies the token advantage
        of ``grpo``, ``rlsd``, ``egrsd`` and ``cl_egrsd``; the KL objectives (``opsd``, ``crisp``) sum a
        full-vocabulary divergence at each visited prefix, with no sampled-token term to reweight, and train
        on the one-step-old prefixes uncorrected.
        """
        metrics: dict[str, Tensor] = {}
        if batch.policy_versions is not None:
            metrics["async/staleness"] = (self.global_step - batch.policy_versions).float().mean()
        sampler, student = batch.sampler_logprobs, inputs.student_logp
        if sampler is None or student is None or not batch.rollouts:
            if batch.off_policy and self.objective_spec.importance_weighted:
                raise RuntimeError(
                    "rollouts generated one step ahead carry no sampler log-probs to correct them"
                )
            return inputs, metrics
        metrics["async/logprob_gap"] = logprob_gap(student, sampler, inputs.mask)
        if not (batch.off_policy and self.objective_spec.importance_weighted):
            return inputs, metrics
        weights = truncated_importance_weights(
            student, sampler, inputs.mask, cap=self.hparams.is_cap
        )  # [N, T]
        metrics["async/is_weight_mean"] = masked_mean(weights, inputs.mask)
        return inputs._replace(importance_weights=weights), metrics

    def gate_quantities(self, inputs: ObjectiveInputs, gate: GateConfig | None) -> TokenQuantities:
        """Steps 6–8 per token, detached: ``H``, ``δ = log p_T − log p_S``, the normaliser and the gate ``ω``.

        ``training_step`` calls it with the run's gate on gated objectives (``None`` otherwise: no
        normaliser, no ``ω``); ``egrsd diagnose`` with its own on the batches it packs, so what it
        reports is what a training step computes.

        Args:
            inputs: Objective inputs with ``teacher_entropy`` wherever ``gate`` is given.
            gate: ``γ``, ``W`` and the floor of ``ω``, or ``None``.

        Returns:
            :class:`TokenQuantities`; ``entropy_max`` is ``max(H_max, 1 nat)`` with ``H_max`` reduced over
            this device or, with ``--model.entropy_scope global``, all ranks; ``omega`` is ``[N, T]``.
        """
        if gate is None:
            return token_quantities(inputs, None)
        entropy_max = self.entropy_max(inputs.teacher_entropy, inputs.mask)  # []
        omega = confidence_gate(
            cast(Tensor, inputs.teacher_entropy).detach(),
            inputs.mask,
            gamma=gate.gamma,
            window=gate.window,
            omega_floor=gate.omega_floor,
            entropy_max=entropy_max,
        )  # [N, T]
        return token_quantities(inputs, entropy_max, omega)

    def token_input_builders(self) -> dict[TokenInputs, InputBuilder]:
        """One small method per kind of objective input (:attr:`ObjectiveSpec.token_inputs`)."""
        return {
            "student_logprobs": self.student_logprob_inputs,
            "gated_teacher": self.gated_teacher_inputs,
            "token_kl": self.token_kl_inputs,
        }

    def student_logprob_inputs(self, batch: RolloutBatch, advantages: Tensor | None) -> ObjectiveInputs:
        """``sft``, ``grpo``: the student's ``log p_θ(y_t)`` with grad (step 4), nothing from the teacher."""
        return ObjectiveInputs(
            self.student_logprobs(batch.student), batch.student.completion_mask, advantages
        )

    def gated_teacher_inputs(self, batch: RolloutBatch, advantages: Tensor | None) -> ObjectiveInputs:
        """``rlsd``, ``egrsd``, ``cl_egrsd``: student log-probs (step 4), teacher log-probs and entropies (step 5)."""
        student = batch.student
        teacher_logp, teacher_entropy = teacher_token_stats(
            self.teacher_hidden(batch),
            self.head_weight(),
            student.completion_ids,
            chunk_size=self.hparams.logit_chunk_size,
            mask=student.completion_mask,
        )  # [N, T], [N, T] float32, no grad
        return ObjectiveInputs(
            self.student_logprobs(student),
            student.completion_mask,
            advantages,
            teacher_logp=teacher_logp,
            teacher_entropy=teacher_entropy,
        )

    def token_kl_inputs(self, batch: RolloutBatch, advantages: Tensor | None) -> ObjectiveInputs:
        """``opsd``: per-token ``KL(p_T ‖ p_θ)``; ``crisp``: ``KL(p_θ ‖ p_T)`` (steps 4–5 in one projection)."""
        student = batch.student
        kl = token_kl(
            self.completion_hidden(student),
            self.teacher_hidden(batch),
            self.head_weight(),
            direction=self.objective_spec.kl_direction,
            chunk_size=self.hparams.logit_chunk_size,
            mask=student.completion_mask,
        )  # [N, T] with grad
        return ObjectiveInputs(None, student.completion_mask, advantages, token_kl=kl)

    def student_logprobs(self, student: PackedBatch) -> Tensor:
        """``[N, T]`` ``log p_θ(y_t)`` of the completion tokens, with grad, projected in chunks."""
        return student_token_logprobs(
            self.completion_hidden(student),
            self.head_weight(),
            student.completion_ids,
            chunk_size=self.hparams.logit_chunk_size,
            mask=student.completion_mask,
        )

    def teacher_hidden(self, batch: RolloutBatch) -> Tensor:
        """``[N, T, D]`` teacher hidden states (privileged prompt, teacher weights, no grad)."""
        if batch.teacher is None:
            raise ValueError(
                f"--model.objective {self.hparams.objective!r} needs teacher sequences in the batch"
            )
        with torch.no_grad(), self.teacher.weights():
            return self.completion_hidden(batch.teacher)

    def head_weight(self) -> Tensor:
        """``[V, D]`` output projection; :func:`egrsd_pl.backbone.check_plain_head` checked it is all the head does.

        Read outside ``forward``: under FSDP2 it is the full weight on every rank because
        :func:`egrsd_pl.sharding.shard_backbone` leaves the head replicated.
        """
        return self.policy.get_output_embeddings().weight

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing per batch: ``main.py validate`` is avg@K evaluation, run by ``callbacks.PeriodicEvaluation``."""

    def completion_hidden(self, packed: PackedBatch) -> Tensor:
        """Final hidden states at the positions that predict each completion token: ``[N, T, D]``."""
        base = self.policy.get_base_model()
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
        hidden = decoder(
            input_ids=packed.input_ids, attention_mask=packed.attention_mask
        ).last_hidden_state  # [N, L, D]
        index = packed.positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1))  # [N, T, D]
        return hidden.gather(1, index)

    def sequence_advantages(self, batch: RolloutBatch) -> Tensor | None:
        """``[N]`` sequence advantages: Welford-baseline ``A_i``, GRPO's group-relative one, or ``None``."""
        advantage = self.objective_spec.advantage
        if advantage == "group":
            num_rollouts = len(batch.rollouts) // max(len(batch.problems), 1)
            groups = batch.group_ids if num_rollouts > 1 else torch.zeros_like(batch.group_ids)
            return group_relative_advantages(batch.rewards, groups)
        if advantage == "running":
            return self.running_reward_statistics().advantages(batch.rewards).to(batch.rewards.device)
        return None

    def entropy_max(self, teacher_entropy: Tensor | None, mask: Tensor) -> Tensor:
        """Raw masked entropy maximum over this device's batch or, with ``global`` scope, all ranks.

        Decision (docs/algorithm.md#step-7-normalisation, scope of "batch"): ``--model.entropy_scope device`` (default) reproduces
        the paper: each device normalises by the maximum of its own minibatch (per-device batch 4), so
        the gate depends on the per-device batch size, not on the number of devices. ``global``
        all-reduces the maximum (MAX) over the ranks: a multi-device step then computes the gate of one
        process on the whole global batch (``tests/test_ddp.py``).
        """
        if teacher_entropy is None:
            raise ValueError(f"--model.objective {self.hparams.objective!r} gates by entropy but has none")
        local = masked_max(teacher_entropy, mask)  # []
        if (
            self.hparams.entropy_scope == "global"
            and self._trainer is not None
            and self.trainer.world_size > 1
        ):
            return self.trainer.strategy.reduce(local, reduce_op="max")  # all-reduce MAX
        return local

    def running_reward_statistics(self) -> RunningRewardStats:
        """``r̄, σ_r`` of steps 3 and 13, handed over by ``callbacks.RewardStatistics`` in its ``setup``."""
        if self.reward_statistics is None:
            raise RuntimeError(
                "the running reward statistics are part of the algorithm: add callbacks.RewardStatistics to "
                "the Trainer (main.py / egrsd_pl.cli adds it automatically)"
            )
        return self.reward_statistics

    # -------------------------------------------------------------- logging
    def log_training_step(
        self,
        batch: RolloutBatch,
        loss: Tensor,
        stats: LossStats,
        advantages: Tensor | None,
        quantities: TokenQuantities,
        rollout_metrics: dict[str, Tensor] | None = None,
    ) -> None:
        """Logs the step's scalars; metrics are averaged over ranks, maxima and minima reduced with max / min."""
        n = batch.student.completion_mask.size(0)
        metrics: dict[str, Any] = {"train/loss": loss.detach(), **(rollout_metrics or {})}
        if batch.rollouts:
            lengths = batch.student.completion_mask.sum(-1).float()  # [N]
            truncated = torch.tensor([r.truncated for r in batch.rollouts], dtype=torch.float32)
            metrics.update(
                {
                    "train/reward_mean": batch.rewards.mean(),
                    "train/accuracy": batch.correct.float().mean(),
                    "train/completion_len": lengths.mean(),
                    "train/truncated_frac": truncated.mean(),
                    "time/rollout_s": batch.rollout_seconds,
                }
            )
        if advantages is not None:
            metrics["adv/mean"] = advantages.mean()
        if quantities.entropy_max is not None:
            metrics["entropy/normaliser"] = quantities.entropy_max  # equal on every rank with global scope
        names = {
            "omega_mean": "gate/omega_mean",
            "omega_min": "gate/omega_min",
            "clip_frac_high": "magnitude/clip_frac_high",
            "clip_frac_low": "magnitude/clip_frac_low",
            "entropy_mean": "entropy/mean",
            "entropy_max": "entropy/max",
            "kl_mean": "kl/mean",
        }
        metrics.update({names[field]: value for field, value in stats.to_dict().items()})
        metrics = {k: torch.as_tensor(v, dtype=torch.float32, device=self.device) for k, v in metrics.items()}
        for name, value in metrics.items():  # a maximum (minimum) over ranks is their max (min), not the mean
            self.log(name, value, batch_size=n, sync_dist=True, reduce_fx=EXTREMES.get(name, "mean"))
        self.log("loss", metrics["train/loss"], prog_bar=True, logger=False, batch_size=n)
        if "train/reward_mean" in metrics:
            self.log("reward", metrics["train/reward_mean"], prog_bar=True, logger=False, batch_size=n)
            self.log("acc", metrics["train/accuracy"], prog_bar=True, logger=False, batch_size=n)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            step_s = now - self._last_batch_end
            tokens = float(batch.student.completion_mask.sum()) if isinstance(batch, RolloutBatch) else 0.0
            self.log("time/step_s", step_s, batch_size=1)
            self.log(
                "throughput/tokens_per_s", tokens * self.trainer.world_size / max(step_s, 1e-9), batch_size=1
            )
        self._last_batch_end = now
        every = self.hparams.log_text_every_n_steps
        if (
            every
            and isinstance(batch, RolloutBatch)
            and batch.rollouts
            and (self.global_step - 1) % every == 0
        ):
            self.log_rollout_text(batch)

    def log_rollout_text(self, batch: RolloutBatch) -> None:
        experiment: Any = getattr(self.logger, "experiment", None)
        if self.global_rank != 0 or not hasattr(experiment, "add_text"):
            return
        rollout = batch.rollouts[0]
        problem = batch.problems[rollout.prompt_index]
        text = (
            f"**problem** ({problem.id}, gold `{problem.answer}`)\n\n{problem.problem}\n\n"
            f"**completion** ({rollout.length} tokens, reward {float(batch.rewards[0]):.3f}, "
            f"truncated {rollout.truncated})\n\n```\n{rollout.text}\n```"
        )
        experiment.add_text("rollout/sample", text, self.global_step)


def _validate(objective: str, teacher: str, *, eps: float) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"--model.objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    if OBJECTIVES[objective].moving_teacher and teacher == "frozen":
        raise ValueError(f"--model.objective {objective} needs --teacher.schedule hard_copy, not frozen")
    if not 0 < eps < 1:
        raise ValueError(f"--model.eps must be in (0, 1), got {eps}")

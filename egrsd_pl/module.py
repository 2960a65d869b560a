"""The LightningModule: a LoRA student, the same backbone with its adapter disabled as the teacher, one objective.

``training_step`` follows Algorithm 1 of the paper. Rollouts, rewards and packing (steps 1–2) were
done by :class:`egrsd_pl.datamodule.RolloutDataModule` right before the step; the tensor math of steps
5–11 lives in :mod:`egrsd_pl.losses`; the running reward statistics (steps 3 and 13) are owned by
the forced :class:`callbacks.RewardStatistics` callback.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from torch import Tensor

from egrsd_pl.datamodule import RolloutBatch
from egrsd_pl.losses import (
    OBJECTIVES,
    LossStats,
    ObjectiveInputs,
    ObjectiveName,
    ObjectiveSpec,
    compute_objective,
    group_relative_advantages,
    student_token_logprobs,
    teacher_token_stats,
    token_kl,
)
from egrsd_pl.prompts import PackedBatch, PromptBuilder

log = logging.getLogger(__name__)

TeacherSchedule = Literal["frozen", "ema", "hard_copy"]
EntropyScope = Literal["device", "global"]
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEACHER_ADAPTER = "teacher"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelPathError(ValueError):
    """``--model.model_name_or_path`` is neither a local folder, a testbed name nor a hub id."""


class EGRSDModule(L.LightningModule):
    """Student, teacher and objective of on-policy self-distillation.

    Args:
        model_name_or_path: Base model: a local HF folder, a hub id (``Qwen/Qwen3-4B``) or
            ``testbed:tiny`` (the offline tiny Qwen3, built and cached on first use).
        objective: ``sft``, ``grpo``, ``opsd``, ``rlsd``, ``egrsd``, ``cl_egrsd`` or ``crisp`` (SPEC.md).
        gamma: Confidence-gate strength ``γ`` (paper: 0.3; 1.0 for CL-EGRSD on 8B). Ignored by
            ``rlsd``, which is ``egrsd`` at ``γ = 0``.
        window: Causal look-ahead ``W`` of ``cl_egrsd`` (paper: 3 on 4B, 5 on 8B); must be 0 for
            every other objective.
        eps: Magnitude clip ``ε`` of ``w = clip(exp(D·δ), 1-ε, 1+ε)`` (paper: 0.2).
        omega_floor: Lower bound of the gate ``ω`` (paper: 0.1).
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
    """

    if TYPE_CHECKING:
        # Lightning types ``hparams`` as a MutableMapping; it is an AttributeDict of the init args.
        hparams: Any

    def __init__(
        self,
        model_name_or_path: str = "testbed:tiny",
        objective: ObjectiveName = "egrsd",
        gamma: float = 0.3,
        window: int = 0,
        eps: float = 0.2,
        omega_floor: float = 0.1,
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
    ) -> None:
        super().__init__()
        _validate(objective, teacher, gamma=gamma, window=window, eps=eps, omega_floor=omega_floor)
        if lora_rank < 1:
            raise ValueError(f"--model.lora_rank must be >= 1, got {lora_rank}")
        if learning_rate <= 0:
            raise ValueError(f"--model.learning_rate must be > 0, got {learning_rate}")
        if logit_chunk_size < 1:
            raise ValueError(f"--model.logit_chunk_size must be >= 1, got {logit_chunk_size}")
        self.save_hyperparameters()
        self.lora_target_modules = list(lora_target_modules or DEFAULT_LORA_TARGETS)
        self.policy: Any = None
        self.tokenizer: Any = None
        self.prompt_builder: PromptBuilder | None = None
        self.model_path: str = model_name_or_path
        self.strict_loading = False  # checkpoints hold the adapters, not the frozen base weights
        self._last_batch_end: float | None = None

    # ---------------------------------------------------------------- model
    @property
    def objective_spec(self) -> ObjectiveSpec:
        return OBJECTIVES[self.hparams.objective]

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.require_algorithm_callbacks()

    def require_algorithm_callbacks(self) -> None:
        """Fails before the model loads when a callback that is part of the algorithm is missing."""
        if self.objective_spec.uses_rollouts:
            self.reward_statistics()
        if self.hparams.teacher != "frozen":
            from callbacks.teacher_update import TeacherUpdate

            if not any(isinstance(callback, TeacherUpdate) for callback in self.trainer.callbacks):  # type: ignore[attr-defined]
                raise RuntimeError(
                    f"--model.teacher {self.hparams.teacher!r} needs callbacks.TeacherUpdate to move the teacher "
                    "adapter (main.py / egrsd_pl.cli adds it automatically, from --teacher.*)"
                )

    def configure_model(self) -> None:
        """Loads tokenizer and base model, and wraps the base with the LoRA student adapter."""
        if self.policy is not None:
            return
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hp = self.hparams
        self.model_path = resolve_model_path(hp.model_name_or_path)
        dtype = hp.dtype if hp.dtype == "auto" else getattr(torch, hp.dtype)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                self.model_path, trust_remote_code=hp.trust_remote_code
            )
            base = AutoModelForCausalLM.from_pretrained(
                self.model_path,
                dtype=dtype,
                attn_implementation=hp.attn_implementation,
                trust_remote_code=hp.trust_remote_code,
            )
        except OSError as error:  # hub unreachable, unknown repo, missing files
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelPathError(
                f"--model.model_name_or_path {hp.model_name_or_path!r}: {first_line}"
            ) from error
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
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
        if hp.teacher != "frozen":
            self.policy.add_adapter(TEACHER_ADAPTER, lora)
            self.update_teacher(alpha=0.0)  # the teacher starts as a copy of the student (= the base)
            self.policy.set_adapter("default")
        self.policy.train()
        self.prompt_builder = PromptBuilder(
            self.tokenizer, student_thinking=hp.student_thinking, teacher_thinking=hp.teacher_thinking
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        hp = self.hparams
        return torch.optim.AdamW(
            params, lr=hp.learning_rate, betas=tuple(hp.adam_betas), weight_decay=hp.weight_decay
        )

    def adapter_parameters(self, adapter: str = "default") -> dict[str, Tensor]:
        """The LoRA tensors of one adapter, keyed by their name with the adapter name removed."""
        suffix = f".{adapter}.weight"
        return {
            name[: -len(suffix)]: param
            for name, param in self.policy.named_parameters()
            if "lora_" in name and name.endswith(suffix)
        }

    @torch.no_grad()
    def update_teacher(self, alpha: float) -> None:
        """``teacher ← α·teacher + (1-α)·student`` on the adapter tensors (``α = 0``: hard copy)."""
        teacher = self.adapter_parameters(TEACHER_ADAPTER)
        if not teacher:
            raise RuntimeError("update_teacher needs --model.teacher ema or hard_copy (no teacher adapter)")
        for key, student_param in self.adapter_parameters("default").items():
            teacher[key].mul_(alpha).add_(student_param.detach(), alpha=1.0 - alpha)

    @contextlib.contextmanager
    def teacher_weights(self) -> Iterator[None]:
        """Runs the backbone as the teacher: adapter disabled (``frozen``) or the teacher adapter."""
        if self.hparams.teacher == "frozen":
            with self.policy.disable_adapter():
                yield
            return
        self.policy.set_adapter(TEACHER_ADAPTER)
        try:
            yield
        finally:
            self.policy.set_adapter("default")  # also makes the student adapter trainable again

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only the adapters (student and, if any, teacher) change; the base is reloaded from its path.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}

    # ------------------------------------------------------------ algorithm
    def training_step(self, batch: RolloutBatch, batch_idx: int) -> Tensor:
        spec, hp = self.objective_spec, self.hparams
        student, mask = batch.student, batch.student.completion_mask  # mask [N, T]
        weight = self.policy.get_output_embeddings().weight  # [V, D]
        # Step 3: sequence-level advantage (running statistics or GRPO group baseline).
        advantages = self.advantages(batch) if spec.advantage != "none" else None  # [N]
        # Step 4: student forward with grad, projected at completion positions only.
        student_hidden = self.completion_hidden(student)  # [N, T, D]
        chunks: dict[str, Any] = {"chunk_size": hp.logit_chunk_size, "mask": mask}  # [N, T] outputs
        student_logp = student_token_logprobs(student_hidden, weight, student.completion_ids, **chunks)
        teacher_logp = teacher_entropy = kl = entropy_max = None
        if spec.teacher != "none":
            assert batch.teacher is not None
            with torch.no_grad(), self.teacher_weights():
                teacher_hidden = self.completion_hidden(batch.teacher)  # [N, T, D]
            if spec.teacher == "token_stats":
                # Step 5: teacher entropy and sampled-token log-prob, float32, chunked.
                teacher_logp, teacher_entropy = teacher_token_stats(
                    teacher_hidden, weight, student.completion_ids, **chunks
                )  # [N, T], [N, T]
                # Step 7 (scope): the batch maximum of the raw entropies, per device or all ranks.
                entropy_max = self.entropy_max(teacher_entropy, mask)
            else:  # opsd: forward KL(p_T || p_θ); crisp: reverse KL(p_θ || p_T)
                kl = token_kl(student_hidden, teacher_hidden, weight, direction=spec.kl_direction, **chunks)
        # Steps 6–11: window minimum, normalisation, gate, magnitude, token advantage, masked mean.
        loss, stats = compute_objective(
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
            floor=hp.omega_floor,
            entropy_max=entropy_max,
        )
        # Step 13 happens after the optimizer step: hand this step's rewards to the statistics owner.
        if spec.uses_rollouts:
            self.reward_statistics().record(batch.rewards)
        self.log_training_step(batch, loss, stats, advantages)
        return loss

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

    def advantages(self, batch: RolloutBatch) -> Tensor:
        """``[N]`` sequence advantages: Welford-baseline ``A_i`` or GRPO's group-relative one."""
        if self.objective_spec.advantage == "group":
            num_rollouts = len(batch.rollouts) // max(len(batch.problems), 1)
            groups = batch.group_ids if num_rollouts > 1 else torch.zeros_like(batch.group_ids)
            return group_relative_advantages(batch.rewards, groups)
        return self.reward_statistics().stats.advantages(batch.rewards).to(batch.rewards.device)

    def entropy_max(self, teacher_entropy: Tensor, mask: Tensor) -> Tensor:
        """Raw masked entropy maximum over this device's batch or, with ``global`` scope, all ranks.

        Decision (SPEC step 7, scope of "batch"): ``--model.entropy_scope device`` (default) reproduces
        the paper: each device normalises by the maximum of its own minibatch (per-device batch 4), so
        the gate depends on the per-device batch size, not on the number of devices. ``global``
        all-reduces the maximum (MAX) over the ranks: a multi-device step then computes the gate of one
        process on the whole global batch (``tests/test_ddp.py``).
        """
        local = torch.where(mask, teacher_entropy, torch.zeros_like(teacher_entropy)).max()  # []
        if self.hparams.entropy_scope == "global" and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(local, reduce_op="max")  # all-reduce MAX
        return local

    def reward_statistics(self) -> Any:
        """The forced :class:`callbacks.RewardStatistics` callback that owns ``r̄, σ_r``."""
        from callbacks.reward_statistics import RewardStatistics

        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, RewardStatistics):
                return callback
        raise RuntimeError(
            "the running reward statistics are part of the algorithm: add callbacks.RewardStatistics to "
            "the Trainer (main.py / egrsd_pl.cli adds it automatically)"
        )

    # -------------------------------------------------------------- logging
    def log_training_step(
        self, batch: RolloutBatch, loss: Tensor, stats: LossStats, advantages: Tensor | None
    ) -> None:
        n = batch.student.completion_mask.size(0)
        metrics: dict[str, Any] = {"train/loss": loss.detach()}
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
        names = {
            "omega_mean": "gate/omega_mean",
            "omega_min": "gate/omega_min",
            "clip_frac_high": "magnitude/clip_frac_high",
            "clip_frac_low": "magnitude/clip_frac_low",
            "entropy_mean": "entropy/mean",
            "entropy_max": "entropy/max",
            "kl_mean": "kl/mean",
        }
        for field, name in names.items():
            value = getattr(stats, field, None)
            if value is not None:
                metrics[name] = value
        metrics = {k: torch.as_tensor(v, dtype=torch.float32, device=self.device) for k, v in metrics.items()}
        self.log_dict(metrics, batch_size=n, sync_dist=True)
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


def _validate(
    objective: str, teacher: str, *, gamma: float, window: int, eps: float, omega_floor: float
) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"--model.objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    if OBJECTIVES[objective].moving_teacher and teacher == "frozen":
        raise ValueError(f"--model.objective {objective} needs --teacher.schedule hard_copy, not frozen")
    if gamma < 0:
        raise ValueError(f"--model.gamma must be >= 0, got {gamma}")
    if window < 0:
        raise ValueError(f"--model.window must be >= 0, got {window}")
    if objective == "cl_egrsd" and window == 0:
        raise ValueError("--model.objective cl_egrsd needs --model.window > 0 (paper: 3 on 4B, 5 on 8B)")
    if objective != "cl_egrsd" and window != 0:
        raise ValueError(f"--model.window is the look-ahead of cl_egrsd; it must be 0 for {objective!r}")
    if not 0 < eps < 1:
        raise ValueError(f"--model.eps must be in (0, 1), got {eps}")
    if not 0 < omega_floor <= 1:
        raise ValueError(f"--model.omega_floor must be in (0, 1], got {omega_floor}")


def resolve_model_path(name: str) -> str:
    """A local folder, ``testbed:...`` (built on first use) or a hub id; anything else is an error."""
    if name.startswith("testbed:"):
        from egrsd_pl.testbed import resolve_model_path as resolve_testbed

        return resolve_testbed(name)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelPathError(f"--model.model_name_or_path {name!r}: folder has no config.json")
        return str(path)
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return name
    raise ModelPathError(
        f"--model.model_name_or_path {name!r}: no such folder, and not a hub id like 'Qwen/Qwen3-4B' "
        "or 'testbed:tiny'"
    )

"""Periodic avg@K evaluation on the paper's benchmarks during training, at its end and under ``validate``."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn

from egrsd_pl.evaluation import (
    PAPER_BENCHMARKS,
    Benchmark,
    EvalResult,
    FrontierPoint,
    PromptSource,
    benchmark_repeats,
    evaluate,
    figure_to_rgb,
    format_table,
    frontier_figure,
    load_benchmarks,
    load_history,
    longest_prompt_tokens,
    write_report,
)
from egrsd_pl.problem import Problem
from egrsd_pl.rollout.base import RolloutEngine, SamplingConfig, check_sequence_fits, model_context_length
from egrsd_pl.sharding import FSDP2Strategy


class PeriodicEvaluation(pl.Callback):
    """Scores the policy with avg@K every ``every_n_steps`` optimizer steps, at the end of training, and
    once under ``main.py validate`` (base model or ``--ckpt_path``).

    Each evaluation logs ``eval/<bench>/avg@K``, ``eval/<bench>/pass@K``, ``eval/<bench>/len``,
    ``eval/avg``, ``eval/avg_len`` and ``eval/eff`` (already reduced over ranks, logged by rank 0 at
    the evaluated step), writes the report of :func:`~egrsd_pl.evaluation.write_report` to
    ``<report_dir>/step_XXXXXX/`` (``validate``: ``<report_dir>/<checkpoint stem or "base">/``) and
    adds the accuracy–length plane to TensorBoard as ``eval/frontier``. The history of
    (step, Avg., AvgLen) is kept in the checkpoint, so the plane spans every evaluated checkpoint
    across resumes; reports already in ``report_dir`` are added to it.

    Lengths: before anything is generated (``on_fit_start`` when it evaluates during ``fit``,
    ``on_validation_start`` under ``validate``) the benchmarks are loaded and the longest evaluation
    prompt plus ``max_new_tokens`` is checked against the model's context and the engine's cap, then
    reserved on the engine (a vLLM engine with ``max_model_len: null`` is sized to hold it), so the
    32,768-token protocol is never cut at the training engine's length. A request that cannot fit
    stops the run with one line naming ``--evaluation.max_new_tokens``.

    What it takes from the run (duck-typed, nothing else):
        - ``pl_module.policy``: the model to evaluate (PEFT student, adapter active);
        - ``pl_module.prompt_builder``: ``student_prompt_ids(problem) -> list[int]`` (thinking on);
        - ``pl_module.engine`` or else ``trainer.datamodule.engine``: a
          :class:`~egrsd_pl.rollout.base.RolloutEngine`, set up (the DataModule's
          ``ensure_engine(pl_module)`` is called first when it has one); ``engine.sync_policy(policy,
          step)`` is called before generating (idempotent per step);
        - ``trainer.datamodule.verifier`` if present (``verify_batch``), else a fresh
          ``AnswerVerifier`` per evaluation.

    Args:
        benchmarks: Benchmarks by short name or as :class:`~egrsd_pl.evaluation.Benchmark` (with
            ``limit`` for quick checks, ``repeats`` for independent runs reported as mean ± std);
            ``None``: the paper's six.
        bench_dir: Folder of ``<name>.jsonl`` for short names (e.g. ``data/bench``);
            ``None``: hub datasets.
        every_n_steps: Evaluate after every ``every_n_steps``-th optimizer step; 0 disables it.
        k: Samples per problem (paper: 4).
        temperature: Sampling temperature (paper: 1.0; 0 is greedy).
        top_p: Nucleus mass (paper: 0.95).
        top_k: Top-k cut-off; ``-1`` disables it (paper: none).
        max_new_tokens: Completion cap (paper: 32,768).
        seed: Base sampling seed (``None``: the engine's generator as it is).
        at_end: Also evaluate when training ends (unless that step was just evaluated).
        prompts_per_call: Problems per engine call.
        report_dir: Folder of the reports; ``None``: ``<trainer.log_dir>/eval``.
        progress: Show a progress bar on rank 0.
        verbose: Print the table on rank 0 after each evaluation.
    """

    def __init__(
        self,
        benchmarks: list[Benchmark | str] | None = None,
        bench_dir: str | None = None,
        every_n_steps: int = 25,
        k: int = 4,
        temperature: float = 1.0,
        top_p: float = 0.95,
        top_k: int = -1,
        max_new_tokens: int = 32768,
        seed: int | None = 0,
        at_end: bool = True,
        prompts_per_call: int = 64,
        report_dir: str | None = None,
        progress: bool = True,
        verbose: bool = True,
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0 disables), got {every_n_steps}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if prompts_per_call < 1:
            raise ValueError(f"prompts_per_call must be >= 1, got {prompts_per_call}")
        self.benchmarks: list[Benchmark | str] = (
            list(benchmarks) if benchmarks is not None else list(PAPER_BENCHMARKS)
        )
        self.bench_dir = bench_dir
        self.every_n_steps = every_n_steps
        self.sampling = SamplingConfig(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            num_rollouts=k,
            seed=seed,
        )
        self.at_end = at_end
        self.prompts_per_call = prompts_per_call
        self.report_dir = report_dir
        self.progress = progress
        self.verbose = verbose
        self.history: list[FrontierPoint] = []
        self.last_evaluated_step = -1
        self._problems: dict[str, list[Problem]] | None = None
        self._longest_prompt: int | None = None
        self._checkpoint_step: int | None = None

    def should_evaluate(self, step: int) -> bool:
        """True after the ``every_n_steps``-th optimizer step, once per step (gradient accumulation
        calls the batch hook several times with the same ``step``)."""
        periodic = self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0
        return periodic and step != self.last_evaluated_step

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before the model loads: refuses an evaluation that cannot run under ``--trainer.strategy fsdp2``.

        Ranks evaluate different numbers of problems, so an engine that generates with the sharded module (HF
        ``generate``: every forward is a collective) would hang; an engine with its own weights (vLLM) syncs the
        policy on every rank at once and then generates alone.
        """
        runs = stage == "validate" or (stage == "fit" and (self.every_n_steps > 0 or self.at_end))
        if not runs or not isinstance(trainer.strategy, FSDP2Strategy):
            return
        engine = getattr(pl_module, "engine", None) or getattr(trainer.datamodule, "engine", None)  # type: ignore[attr-defined]
        if engine is not None and engine.generates_with_the_module:
            raise ValueError(
                f"avg@K evaluation with --data.engine {type(engine).__name__} does not run under --trainer.strategy "
                "fsdp2 (ranks hold different numbers of problems, and every sharded forward needs every rank): use "
                "egrsd_pl.rollout.vllm.VLLMEngine, or turn the evaluation off (fit: --evaluation.every_n_steps 0 "
                "--evaluation.at_end false) and evaluate the checkpoint with --trainer.strategy ddp (docs/fsdp.md)"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps > 0 or self.at_end:
            self.prepare(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self.prepare(trainer, pl_module)

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Loads the benchmarks, checks that the longest prompt plus ``max_new_tokens`` fits the model and
        the engine, and reserves that length on the engine (before it starts, if it has not yet)."""
        if self._problems is None:
            self._problems = load_benchmarks(self.benchmarks, self.bench_dir)
        if self._longest_prompt is None:
            builder = cast(PromptSource, pl_module.prompt_builder)
            self._longest_prompt = longest_prompt_tokens(builder, self._problems)
        engine = _module_engine(trainer, pl_module, start=False)
        new_tokens = self.sampling.max_new_tokens
        check_sequence_fits(
            self._longest_prompt,
            new_tokens,
            model_context=model_context_length(pl_module.policy),
            engine_limit=engine.max_sequence_length(),
            new_tokens_flag="--evaluation.max_new_tokens",
            prompt_name="the longest evaluation prompt",
        )
        engine.reserve_length(self._longest_prompt + new_tokens)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.should_evaluate(trainer.global_step):
            self.run(trainer, pl_module, step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end and trainer.global_step != self.last_evaluated_step:
            self.run(trainer, pl_module, step=trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.VALIDATING or trainer.sanity_checking:
            return
        ckpt_path = trainer.ckpt_path
        label = Path(ckpt_path).stem if ckpt_path else "base"
        step = self._checkpoint_step if ckpt_path and self._checkpoint_step is not None else 0
        if ckpt_path and self._checkpoint_step is None:
            match = re.search(r"step=(\d+)", Path(ckpt_path).name)
            step = int(match.group(1)) if match else 0
        self.run(trainer, pl_module, step=step, label=label)

    def run(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, step: int, label: str | None = None
    ) -> EvalResult:
        """Evaluates the current policy on every rank, logs and writes the report; returns the result."""
        self.prepare(trainer, pl_module)
        assert self._problems is not None
        engine = _module_engine(trainer, pl_module, start=True)
        engine.sync_policy(pl_module.policy, step)
        with torch.no_grad():
            result = evaluate(
                engine,
                cast(PromptSource, pl_module.prompt_builder),
                self._problems,
                sampling=self.sampling,
                verifier=getattr(trainer.datamodule, "verifier", None),  # type: ignore[attr-defined]
                repeats=benchmark_repeats(self.benchmarks),
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                prompts_per_call=self.prompts_per_call,
                device=pl_module.device,
                progress=self.progress,
            )
        label = label if label is not None else f"step_{step:06d}"
        report_dir = (
            Path(self.report_dir) if self.report_dir is not None else Path(trainer.log_dir or ".") / "eval"
        )
        known = {p.label: p for p in [*load_history(report_dir), *self.history] if p.label != label}
        history = sorted(known.values(), key=lambda p: (p.step, p.label))
        write_report(result, report_dir / label, step=step, history=history, label=label)
        point = FrontierPoint(label, step, result.avg, result.avg_len)
        self.history = [p for p in self.history if p.label != label] + [point]
        self.last_evaluated_step = step
        if trainer.is_global_zero:
            self._log(trainer, result, step, [*history, point])
        return result

    def _log(self, trainer: pl.Trainer, result: EvalResult, step: int, points: list[FrontierPoint]) -> None:
        scalars = result.scalars()
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if isinstance(logger, TensorBoardLogger):
                image = figure_to_rgb(frontier_figure(points))  # [H, W, 3]
                logger.experiment.add_image("eval/frontier", image, global_step=step, dataformats="HWC")
        if self.verbose:
            print(format_table(result, title=f"evaluation at step {step}"), flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dataclasses.asdict(p) for p in self.history],
            "last_evaluated_step": self.last_evaluated_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [FrontierPoint(**p) for p in state_dict.get("history", [])]
        self.last_evaluated_step = int(state_dict.get("last_evaluated_step", -1))

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._checkpoint_step = checkpoint.get("global_step")


def _module_engine(trainer: pl.Trainer, pl_module: pl.LightningModule, *, start: bool) -> RolloutEngine:
    """The run's rollout engine: ``pl_module.engine``, else ``trainer.datamodule.engine`` (with ``start``,
    after ``trainer.datamodule.ensure_engine(pl_module)`` when the DataModule sets it up lazily)."""
    for name in ("policy", "prompt_builder"):
        if getattr(pl_module, name, None) is None:
            raise RuntimeError(f"PeriodicEvaluation needs `pl_module.{name}` (see the callback's docstring)")
    engine = getattr(pl_module, "engine", None)
    if engine is not None:
        return engine
    datamodule = trainer.datamodule  # type: ignore[attr-defined]
    if getattr(datamodule, "engine", None) is None:
        raise RuntimeError(
            "PeriodicEvaluation needs a rollout engine: `pl_module.engine` or `datamodule.engine`"
        )
    if start and hasattr(datamodule, "ensure_engine"):
        datamodule.ensure_engine(pl_module)
    return datamodule.engine

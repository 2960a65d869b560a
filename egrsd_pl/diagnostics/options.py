"""``egrsd diagnose``'s options: its own (:func:`add_arguments`) and what it reads from the run's config.

:func:`resolve_settings` turns the parsed config and its instantiated classes (the module, the DataModule, the
avg@K evaluation and live-diagnostics callbacks, each of which validated its own arguments) into one
:class:`Settings`; nothing here loads a model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from egrsd_pl.diagnostics import mechanism
from egrsd_pl.evaluation import Benchmark
from egrsd_pl.losses import GateConfig
from egrsd_pl.rollout.base import SamplingConfig


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one diagnose run uses, every field resolved from the config and diagnose's own options."""

    output: Path
    ckpt_path: Path | None
    benchmarks: list[Benchmark | str]
    bench_dir: str | None
    problems: int | None
    sampling: SamplingConfig
    prompts_per_call: int
    batch_size: int
    gate: GateConfig
    tau_low: float
    tau_high: float
    device: torch.device
    traces: int
    trace_tokens: int
    html_completions: int

    def to_json(self) -> dict[str, Any]:
        return {
            "ckpt_path": str(self.ckpt_path) if self.ckpt_path else None,
            "benchmarks": [b if isinstance(b, str) else dataclasses.asdict(b) for b in self.benchmarks],
            "bench_dir": self.bench_dir,
            "problems": self.problems,
            "sampling": dataclasses.asdict(self.sampling),
            "prompts_per_call": self.prompts_per_call,
            "batch_size": self.batch_size,
            "gamma": self.gate.gamma,
            "window": self.gate.window,
            "omega_floor": self.gate.omega_floor,
            "tau_low": self.tau_low,
            "tau_high": self.tau_high,
            "device": str(self.device),
            "traces": self.traces,
            "trace_tokens": self.trace_tokens,
            "html_completions": self.html_completions,
        }


def add_arguments(parser: Any) -> None:
    """diagnose's own options, on top of ``fit``'s (a jsonargparse parser)."""
    parser.prog = "egrsd diagnose"
    parser.description = (
        "Mechanism diagnostics (paper §5.5): entropy deciles (Fig. 4a), lock/fork/pivot regimes and CL-EGRSD's "
        "pivot restore (Fig. 4b), per-token traces (Fig. A4) and a token page (Fig. 3), read from the run's "
        "config (--config, --model.*, --evaluation.*, --diagnostics.*)."
    )
    add = parser.add_argument
    add("--output", type=str, required=True, help="folder for the reports (created)")
    add(
        "--ckpt_path",
        type=str | None,
        default=None,
        help="a Lightning .ckpt or its PEFT adapter folder; null: the base model",
    )
    add(
        "--problems",
        type=int | None,
        default=None,
        help="first N problems of each benchmark; null: each benchmark's limit",
    )
    add("--samples", type=int | None, default=None, help="completions per problem; null: --evaluation.k")
    add(
        "--batch_size",
        type=int | None,
        default=None,
        help="completions per forward pass and per entropy normaliser; null: --data.batch_size x --data.num_rollouts",
    )
    add("--traces", type=int, default=4, help="trace plots: the completions with the most pivots")
    add("--trace_tokens", type=int, default=300, help="tokens per trace (the window with the most pivots)")
    add("--html_completions", type=int, default=8, help="completions on tokens.html (most pivots first)")


def resolve_settings(config: Any, init: Any) -> Settings:
    """Settings from the parsed config (``config``) and its instantiated classes (``init``: the module, the
    DataModule and the callbacks, which validated their own arguments); one error line per bad option."""
    for flag in ("samples", "batch_size", "problems"):
        if config[flag] is not None and config[flag] < 1:
            raise ValueError(f"--{flag} must be >= 1 or null, got {config[flag]}")
    if config.trace_tokens < 1:
        raise ValueError(f"--trace_tokens must be >= 1, got {config.trace_tokens}")
    for flag in ("traces", "html_completions"):
        if config[flag] < 0:
            raise ValueError(f"--{flag} must be >= 0, got {config[flag]}")
    ckpt_path = Path(config.ckpt_path) if config.ckpt_path else None
    if ckpt_path is not None and not ckpt_path.exists():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file or folder")
    evaluation, diagnostics, data = init.evaluation, init.diagnostics, init.data
    samples = config.samples if config.samples is not None else evaluation.sampling.num_rollouts
    return Settings(
        output=Path(config.output),
        ckpt_path=ckpt_path,
        benchmarks=list(evaluation.benchmarks),
        bench_dir=evaluation.bench_dir,
        problems=config.problems,
        sampling=dataclasses.replace(evaluation.sampling, num_rollouts=samples),
        prompts_per_call=evaluation.prompts_per_call,
        batch_size=config.batch_size or data.hparams.batch_size * data.hparams.num_rollouts,
        gate=mechanism.diagnostic_gate(init.model.gate, gamma=diagnostics.gamma, window=diagnostics.window),
        tau_low=diagnostics.tau_low,
        tau_high=diagnostics.tau_high,
        device=torch_device(str(config.trainer.accelerator)),
        traces=config.traces,
        trace_tokens=config.trace_tokens,
        html_completions=config.html_completions,
    )


def torch_device(accelerator: str) -> torch.device:
    """The device of ``--trainer.accelerator`` (``auto``: CUDA when there is one); the CLI already stopped a
    GPU config on a machine without one."""
    if accelerator in {"gpu", "cuda"} or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if accelerator in {"cpu", "auto"}:
        return torch.device("cpu")
    raise ValueError(f"egrsd diagnose runs on cpu or cuda; --trainer.accelerator {accelerator} is neither")

"""``egrsd diagnose``: the paper's §5.5 mechanism diagnostics on the base model or any checkpoint.

Samples completions from the checkpoint's student on held-out benchmark problems, scores them with the
student and with the adapter-disabled teacher behind the privileged prompt (the module's own model
loading, packing and chunked vocabulary reductions), computes per token ``H``, ``Ĥ``, ``Ĥ^CL``,
``δ = log p_T − log p_S``, ``ω`` and ``ω^CL`` with the training code's functions, and writes
``diagnostics.json``, ``tokens.jsonl``, ``deciles.md``/``.png`` (Fig. 4a), ``regimes.md``/``.png``
(Fig. 4b), ``traces/*.png`` (Fig. A4) and ``tokens.html`` (Fig. 3) into ``--output``.

Decision (proxy reference solution; the paper conditions its diagnostic teacher on one without defining
it): the benchmark's own ``solution`` column where the file has one (MATH-500, GSM8K, the synthetic
testbed), else ``The final answer is \\boxed{<gold>}.``.

Decision (normaliser): ``Ĥ`` divides by the raw-entropy maximum of each group of ``--batch_size``
completions (floored at 1 nat), as a training step does on a per-device batch (paper: 4).

Decision (teacher): the adapter-disabled base (the paper's frozen teacher), whatever the run's schedule.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from tqdm.auto import tqdm

from egrsd_pl.checkpoint_io import refuse_damaged_checkpoint
from egrsd_pl.diagnostics import mechanism, report
from egrsd_pl.evaluation import PAPER_BENCHMARKS, Benchmark, resolve_benchmark
from egrsd_pl.losses import student_token_logprobs, teacher_token_stats
from egrsd_pl.problem import Problem
from egrsd_pl.problem_sources import DatasetError, load_problems
from egrsd_pl.prompts import pack_completions
from egrsd_pl.rollout.base import Rollout, SamplingConfig

PAPER_DIAGNOSTIC_BENCHMARKS = "aime24,aime25,hmmt25,minerva"


class Completion(NamedTuple):
    """One sampled completion: its benchmark, its problem's index there, its sample index, the rollout."""

    benchmark: str
    problem_index: int
    sample_index: int
    rollout: Rollout


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egrsd diagnose",
        description="Mechanism diagnostics (paper §5.5): entropy deciles (Fig. 4a), lock/fork/pivot regimes "
        "and CL-EGRSD's pivot restore (Fig. 4b), per-token traces (Fig. A4) and a token page (Fig. 3).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--config", type=Path, help="the run's YAML (its model: section builds the module)")
    add(
        "--ckpt_path", type=Path, help="a Lightning .ckpt or its PEFT adapter folder; omitted: the base model"
    )
    add("--model", help="override model.model_name_or_path (e.g. testbed:tiny)")
    add("--output", type=Path, required=True, help="folder for the reports (created)")
    add("--gamma", type=float, default=0.3, help="gate strength γ of ω and ω^CL")
    add("--window", type=int, default=5, help="look-ahead W of Ĥ^CL")
    add("--omega_floor", type=float, default=0.1, help="lower clip of both gates")
    add("--tau_low", type=float, default=mechanism.DEFAULT_TAU_LOW, help="lock / resolved threshold on Ĥ")
    add("--tau_high", type=float, default=mechanism.DEFAULT_TAU_HIGH, help="uncertain threshold on Ĥ")
    add("--benchmarks", default=PAPER_DIAGNOSTIC_BENCHMARKS, help="comma-separated: names or name=file")
    add("--bench_dir", type=Path, help="folder of <name>.jsonl benchmark copies; omitted: the hub")
    add("--problems", type=int, default=None, help="first N problems of each benchmark; all when omitted")
    add("--samples", type=int, default=4, help="completions per problem")
    add("--temperature", type=float, default=1.0, help="sampling temperature (paper evaluation: 1.0)")
    add("--top_p", type=float, default=0.95, help="nucleus mass")
    add("--top_k", type=int, default=-1, help="-1 disables")
    add("--max_new_tokens", type=int, default=4096, help="completion cap in tokens")
    add("--seed", type=int, default=0, help="sampling seed (offset per generate call)")
    add("--engine", choices=["hf", "vllm"], default="hf", help="rollout engine for the sampling")
    add("--prompts_per_call", type=int, default=16, help="problems per generate call (progress granularity)")
    add("--batch_size", type=int, default=4, help="completions per forward pass and per entropy normaliser")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device of the model")
    add("--traces", type=int, default=4, help="trace plots: the completions with the most pivots")
    add("--trace_tokens", type=int, default=300, help="tokens per trace (the window with the most pivots)")
    add("--html_completions", type=int, default=8, help="completions on tokens.html (most pivots first)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the diagnostics; flags and data are checked before the model loads. Returns the exit code."""
    args = build_parser().parse_args(argv)
    validate(args)
    problems = load_diagnostic_problems(args.benchmarks, args.bench_dir, args.problems)
    module = load_module(args.config, args.ckpt_path, args.model)
    module.to(args.device)
    rollouts = sample(module, problems, args)
    views, totals = score(module, problems, rollouts, args)
    write_outputs(args, module, problems, rollouts, views, totals)
    print(f"diagnostics written to {args.output}")
    print((args.output / "regimes.md").read_text())
    return 0


def validate(args: argparse.Namespace) -> None:
    """One error line per bad flag, before any model is loaded."""
    mechanism.check_regime_thresholds(args.tau_low, args.tau_high)
    if args.gamma < 0:
        raise ValueError(f"--gamma must be >= 0, got {args.gamma}")
    if args.window < 1:
        raise ValueError(f"--window must be >= 1 (Ĥ^CL needs a look-ahead), got {args.window}")
    for flag in ("samples", "batch_size", "prompts_per_call", "max_new_tokens", "trace_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("traces", "html_completions"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.problems is not None and args.problems < 1:
        raise ValueError(f"--problems must be >= 1, got {args.problems}")
    if args.config is not None and not args.config.is_file():
        raise FileNotFoundError(f"--config {args.config}: no such file")
    if args.ckpt_path is not None and not args.ckpt_path.exists():
        raise FileNotFoundError(f"--ckpt_path {args.ckpt_path}: no such file or folder")
    if args.ckpt_path is not None:
        refuse_damaged_checkpoint(args.ckpt_path)  # a truncated .ckpt: one line, not torch's traceback
    SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)


# ------------------------------------------------------------------------------------------- the model
def model_arguments(config: Path | None, ckpt_path: Path | None) -> dict[str, Any]:
    """``EGRSDModule`` arguments: the YAML's ``model:`` section, else the .ckpt's hyper-parameters."""
    if config is not None:
        section = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
        if not isinstance(section, dict):
            raise ValueError(f"--config {config}: 'model' must be a mapping")
        return dict(section.get("init_args", section))
    if ckpt_path is not None and ckpt_path.is_file():
        return dict(_read_checkpoint(ckpt_path).get("hyper_parameters", {}))
    return {}


def load_module(config: Path | None, ckpt_path: Path | None, model: str | None) -> Any:
    """The run's module with its student adapter loaded (``ckpt_path``) and a frozen teacher, in eval mode."""
    from egrsd_pl.module import EGRSDModule

    arguments = model_arguments(config, ckpt_path)
    if model is not None:
        arguments["model_name_or_path"] = model
    arguments["teacher"] = "frozen"  # Decision (module docstring): the adapter-disabled teacher
    try:
        module = EGRSDModule(**arguments)
    except TypeError as error:  # an unknown key in the model section
        raise ValueError(f"--config {config}: model section: {error}") from None
    module.configure_model()
    if ckpt_path is not None:
        load_adapter(module, ckpt_path)
    module.policy.eval()
    return module


def _read_checkpoint(path: Path) -> dict[str, Any]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # our own Lightning checkpoint
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"--ckpt_path {path}: not a Lightning checkpoint (no state_dict)")
    return checkpoint


def load_adapter(module: Any, ckpt_path: Path) -> None:
    """Loads the student adapter from a ``.ckpt``'s state_dict or from a PEFT adapter folder."""
    if ckpt_path.is_dir():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = ckpt_path / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: folder has no adapter_model.safetensors")
        rank = json.loads((ckpt_path / "adapter_config.json").read_text()).get("r")
        if rank != module.hparams.lora_rank:
            raise ValueError(
                f"--ckpt_path {ckpt_path}: adapter rank {rank} != model.lora_rank {module.hparams.lora_rank}"
            )
        result: Any = set_peft_model_state_dict(module.policy, load_file(str(weights)))
        if result.unexpected_keys:
            raise ValueError(
                f"--ckpt_path {ckpt_path}: {len(result.unexpected_keys)} adapter tensors do not fit the model"
            )
        return
    state = {
        k: v
        for k, v in _read_checkpoint(ckpt_path)["state_dict"].items()
        if "lora_" in k and ".default." in k
    }
    expected = {k for k in module.state_dict() if "lora_" in k and ".default." in k}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"--ckpt_path {ckpt_path}: the student adapter does not match --config (lora rank / targets): "
            f"{len(missing)} missing, {len(extra)} unexpected, e.g. {(missing or extra)[:1]}"
        )
    try:
        module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatch: another rank
        raise ValueError(f"--ckpt_path {ckpt_path}: {str(error).splitlines()[-1].strip()}") from None


# ------------------------------------------------------------------------------------------ the problems
def proxy_reference(problem: Problem) -> str:
    """The teacher's reference solution (Decision in the module docstring)."""
    return (
        problem.solution if problem.solution.strip() else f"The final answer is \\boxed{{{problem.answer}}}."
    )


def load_diagnostic_problems(
    names: str, bench_dir: Path | None, limit: int | None
) -> dict[str, list[Problem]]:
    """``{benchmark: problems}`` with their solution column when the source has one."""
    loaded: dict[str, list[Problem]] = {}
    for item in filter(None, (part.strip() for part in names.split(","))):
        name, _, source = item.partition("=")
        benchmark = resolve_benchmark(Benchmark(name=name, source=source or None, limit=limit), bench_dir)
        assert benchmark.source is not None
        common = dict(
            split=benchmark.split,
            problem_column=benchmark.problem_column,
            answer_column=benchmark.answer_column,
            id_column=benchmark.id_column,
            limit=benchmark.limit,
        )
        try:
            problems = load_problems(benchmark.source, solution_column="solution", **common)  # type: ignore[arg-type]
        except DatasetError as error:
            if "'solution'" not in str(error):
                raise
            problems = load_problems(benchmark.source, solution_column=None, **common)  # type: ignore[arg-type]
        if benchmark.source == PAPER_BENCHMARKS["gsm8k"].hub_id:
            problems = [dataclasses.replace(p, answer=p.answer.split("####")[-1].strip()) for p in problems]
        loaded[name] = problems
    if not loaded:
        raise ValueError("--benchmarks names no benchmark")
    return loaded


# ------------------------------------------------------------------------------------ sample and score
def sample(module: Any, problems: dict[str, list[Problem]], args: argparse.Namespace) -> list[Completion]:
    """A :class:`Completion` for ``--samples`` completions of every problem."""
    if args.engine == "vllm":
        from egrsd_pl.rollout.vllm import VLLMEngine

        engine: Any = VLLMEngine()
    else:
        from egrsd_pl.rollout.hf import HFGenerateEngine

        engine = HFGenerateEngine(batch_size=args.prompts_per_call)
    engine.setup(module.policy, module.tokenizer, model_path=module.model_path, seed=args.seed)
    engine.sync_policy(module.policy, 0)
    builder = module.prompt_builder
    chunks = [
        (name, start, items[start : start + args.prompts_per_call])
        for name, items in problems.items()
        for start in range(0, len(items), args.prompts_per_call)
    ]
    rollouts: list[Completion] = []
    bar = tqdm(total=sum(len(items) for items in problems.values()), desc="sample", unit="problem")
    try:
        for call, (name, start, chunk) in enumerate(chunks):
            sampling = SamplingConfig(
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                max_new_tokens=args.max_new_tokens,
                num_rollouts=args.samples,
                seed=args.seed * 1_000_003 + call,
            )
            generated = engine.generate([builder.student_prompt_ids(p.problem) for p in chunk], sampling)
            k = args.samples
            rollouts += [Completion(name, start + r.prompt_index, j % k, r) for j, r in enumerate(generated)]
            bar.update(len(chunk))
    finally:
        bar.close()
        engine.close()
    return rollouts


@torch.no_grad()
def score(
    module: Any, problems: dict[str, list[Problem]], rollouts: list[Completion], args: argparse.Namespace
) -> tuple[list[report.CompletionView], dict[str, torch.Tensor]]:
    """Student and teacher over every completion, ``--batch_size`` at a time: per-completion views and flat tensors."""
    builder, tokenizer = module.prompt_builder, module.tokenizer
    pad_id, chunk = tokenizer.pad_token_id, module.hparams.logit_chunk_size
    weight = module.policy.get_output_embeddings().weight  # [V, D]
    views: list[report.CompletionView] = []
    columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("entropy", "gap", "omega", "regime", "restore")}
    for start in tqdm(range(0, len(rollouts), args.batch_size), desc="score", unit="batch"):
        batch = rollouts[start : start + args.batch_size]
        owners = [problems[c.benchmark][c.problem_index] for c in batch]
        completions = [list(c.rollout.completion_ids) for c in batch]
        student = pack_completions(
            [builder.student_prompt_ids(p.problem) for p in owners], completions, pad_id=pad_id
        )
        teacher = pack_completions(
            [builder.teacher_prompt_ids(p.problem, proxy_reference(p)) for p in owners],
            completions,
            pad_id=pad_id,
        )
        student, teacher = (
            type(student)(*(t.to(module.device) for t in packed)) for packed in (student, teacher)
        )
        mask = student.completion_mask  # [B, T]
        student_logp = student_token_logprobs(
            module.completion_hidden(student), weight, student.completion_ids, chunk_size=chunk, mask=mask
        )  # [B, T]
        with module.teacher.weights():
            teacher_hidden = module.completion_hidden(teacher)  # [B, T, D]
        teacher_logp, entropy = teacher_token_stats(
            teacher_hidden, weight, student.completion_ids, chunk_size=chunk, mask=mask
        )  # [B, T], [B, T]
        gap = teacher_logp - student_logp  # [B, T] δ
        gates = mechanism.token_gates(
            entropy, mask, gamma=args.gamma, window=args.window, omega_floor=args.omega_floor
        )
        regime = mechanism.classify_regimes(
            gates.entropy_hat, gates.entropy_cl_hat, mask, tau_low=args.tau_low, tau_high=args.tau_high
        )  # [B, T]
        values = {
            "entropy": entropy,
            "gap": gap,
            "omega": gates.omega,
            "regime": regime,
            "restore": gates.restore,
        }
        for key, tensor in values.items():
            columns[key].append(tensor[mask].cpu())
        for row, completion in enumerate(batch):
            keep = mask[row]
            per_token = [t[row][keep].tolist() for t in (entropy, *gates[:4], gap, regime)]
            pivots = sum(code == mechanism.PIVOT for code in per_token[-1])
            title = (
                f"{completion.benchmark} / {owners[row].id} / sample {completion.sample_index}: "
                f"{completion.rollout.length} tokens, {pivots} pivots"
            )
            tokens = [tokenizer.decode([token]) for token in completion.rollout.completion_ids]
            views.append(report.CompletionView(title, tokens, *per_token))
    flat = {key: torch.cat(parts) for key, parts in columns.items()}
    return views, flat


# ------------------------------------------------------------------------------------------- the outputs
def write_outputs(
    args: argparse.Namespace,
    module: Any,
    problems: dict[str, list[Problem]],
    rollouts: list[Completion],
    views: list[report.CompletionView],
    flat: dict[str, torch.Tensor],
) -> None:
    out: Path = args.output
    (out / "traces").mkdir(parents=True, exist_ok=True)
    row = torch.ones(1, flat["entropy"].numel(), dtype=torch.bool)  # [1, M] every token is a completion token
    deciles = mechanism.entropy_deciles(flat["entropy"][None], flat["gap"][None], flat["omega"][None], row)
    regimes = mechanism.regime_stats(flat["regime"][None], flat["restore"][None])
    (out / "deciles.md").write_text(report.decile_table(deciles) + "\n")
    report.decile_figure(deciles, gamma=args.gamma).savefig(out / "deciles.png")
    table = report.regime_table(
        regimes, tau_low=args.tau_low, tau_high=args.tau_high, gamma=args.gamma, window=args.window
    )
    (out / "regimes.md").write_text(table + "\n")
    report.regime_figure(regimes).savefig(out / "regimes.png")
    ranked = sorted(range(len(views)), key=lambda i: -sum(c == mechanism.PIVOT for c in views[i].regime))
    traces = []
    for rank, index in enumerate(ranked[: args.traces]):
        view = views[index]
        flags = torch.tensor([c == mechanism.PIVOT for c in view.regime], dtype=torch.bool)
        begin = mechanism.densest_window(flags, args.trace_tokens)
        path = out / "traces" / f"trace_{rank + 1:02d}.png"
        report.trace_figure(view, start=begin, length=args.trace_tokens, window=args.window).savefig(path)
        traces.append({"file": str(path.relative_to(out)), "completion": index, "start": begin})
    shown = ranked[: args.html_completions]
    header = f"γ {args.gamma}, W {args.window}, τ_low {args.tau_low}, τ_high {args.tau_high}; checkpoint {args.ckpt_path or 'base model'}"
    (out / "tokens.html").write_text(
        report.tokens_html([views[i] for i in shown], header=header), encoding="utf-8"
    )
    with (out / "tokens.jsonl").open("w", encoding="utf-8") as handle:
        for view in views:
            handle.write(json.dumps(view._asdict(), ensure_ascii=False) + "\n")
    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": module.model_path,
        "completions": len(views),
        "tokens": int(flat["entropy"].numel()),
        "benchmarks": {name: len(items) for name, items in problems.items()},
        "deciles": {k: v.tolist() for k, v in deciles._asdict().items()},
        "regimes": {
            "names": list(mechanism.REGIMES),
            **{k: v.tolist() for k, v in regimes._asdict().items()},
        },
        "per_completion": [
            {
                "title": v.title,
                "length": len(v.tokens),
                "pivots": sum(c == mechanism.PIVOT for c in v.regime),
                "forks": sum(c == mechanism.FORK for c in v.regime),
                "truncated": c.rollout.truncated,
            }
            for v, c in zip(views, rollouts, strict=True)
        ],
        "traces": traces,
        "html_completions": shown,
    }
    (out / "diagnostics.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")

"""``egrsd diagnose``: the paper's §5.5 mechanism diagnostics on the base model or any checkpoint.

``egrsd diagnose --config configs/tiny.yaml --output d`` reads the run's config with ``fit``'s own parser
(stacked ``--config`` files, every ``--model.*`` / ``--data.*`` / ``--evaluation.*`` / ``--diagnostics.*``
/ ``--trainer.*`` override), plus its own options (:func:`add_arguments`). It samples completions from the
checkpoint's student on the held-out benchmarks of ``--evaluation.*`` with the run's rollout engine, packs
them behind the student and the teacher prompt with :meth:`RolloutDataModule.pack_rollouts` and computes
``H``, ``δ = log p_T − log p_S``, the normaliser and ``ω`` with the training step's own methods
(:meth:`EGRSDModule.gated_teacher_inputs`, :meth:`EGRSDModule.gate_quantities`), then ``Ĥ``, ``Ĥ^CL`` and
``ω^CL`` with :func:`~egrsd_pl.diagnostics.mechanism.token_gates`. It writes ``diagnostics.json``,
``tokens.jsonl``, ``deciles.md``/``.png`` (Fig. 4a), ``regimes.md``/``.png`` (Fig. 4b), ``traces/*.png``
(Fig. A4) and ``tokens.html`` (Fig. 3) into ``--output``.

Every default comes from the config: the benchmarks (``--evaluation.benchmarks``, ``bench_dir``), K
(``--evaluation.k``, or ``--samples``), temperature, top-p/k, the completion cap and the seed
(``--evaluation.*``), ``γ`` and the ``ω`` floor (``--model.*``, or ``--diagnostics.gamma``), ``W``
(``--model.window``, 5 when it is 0, or ``--diagnostics.window``), ``τ_low`` / ``τ_high``
(``--diagnostics.*``), the completions per normaliser (``--data.batch_size`` × ``--data.num_rollouts``, a
training step's batch) and the device (``--trainer.accelerator``). The paper's diagnostic set is
``--evaluation.benchmarks '[aime24, aime25, hmmt25, minerva]'``.

Decision (proxy reference solution; the paper conditions its diagnostic teacher on one without defining
it): the benchmark's own ``solution`` column where the file has one (MATH-500, GSM8K, the synthetic
testbed), else ``The final answer is \\boxed{<gold>}.``.

Decision (normaliser): ``Ĥ`` divides by the raw-entropy maximum of each group of ``--batch_size``
completions (floored at 1 nat), as a training step does on its per-device batch (paper: 4).

Decision (teacher): the adapter-disabled base (the paper's frozen teacher) behind the privileged
reference prompt, whatever the run's teacher schedule and objective.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from egrsd_pl.diagnostics import mechanism, report
from egrsd_pl.diagnostics.options import Settings, add_arguments, resolve_settings
from egrsd_pl.evaluation import PAPER_BENCHMARKS, Benchmark, longest_prompt_tokens, resolve_benchmark
from egrsd_pl.json_files import dumps, write_json
from egrsd_pl.losses import GateConfig
from egrsd_pl.problem import Problem
from egrsd_pl.problem_sources import DatasetError, load_problems
from egrsd_pl.rollout.base import Rollout, check_sequence_fits, model_context_length
from egrsd_pl.teacher import Teacher

ParseRun = Callable[[list[str], Callable[[Any], None]], tuple[Any, Any]]
"""``(argv, add_arguments) -> (config, instantiated)``: ``fit``'s parser with a tool's options, handed in by
the composition root (:func:`egrsd_pl.cli.parse_run`; the package never imports the CLI)."""


class Completion(NamedTuple):
    """One sampled completion: its benchmark, its problem's index there, its sample index, the rollout."""

    benchmark: str
    problem_index: int
    sample_index: int
    rollout: Rollout


def main(argv: list[str] | None = None, *, parse_run: ParseRun | None = None) -> int:
    """Runs the diagnostics; flags and data are checked before the model loads. Returns the exit code."""
    if parse_run is None:
        raise ValueError(
            "egrsd diagnose reads fit's config: run it as `egrsd diagnose` (or `python main.py diagnose`)"
        )
    config, init = parse_run(list(argv or []), add_arguments)
    settings = resolve_settings(config, init)
    problems = load_diagnostic_problems(settings.benchmarks, settings.bench_dir, settings.problems)
    module, datamodule = prepare_module(init, settings)
    rollouts = sample(module, datamodule, problems, settings)
    views, totals = score(module, datamodule, problems, rollouts, settings)
    write_outputs(settings, module, problems, rollouts, views, totals)
    print(f"diagnostics written to {settings.output}")
    print((settings.output / "regimes.md").read_text())
    return 0


# ------------------------------------------------------------------------------------------- the model
def prepare_module(init: Any, settings: Settings) -> tuple[Any, Any]:
    """The config's module with its student adapter loaded (``--ckpt_path``) and the adapter-disabled teacher
    (Decision in the module docstring), in eval mode on the device; and the config's DataModule."""
    module = init.model
    module.teacher = Teacher("frozen")
    module.configure_model()
    if settings.ckpt_path is not None:
        load_adapter(module, settings.ckpt_path)
    module.policy.eval()
    module.to(settings.device)
    return module, init.data


def load_module(args: list[str], parse_run: ParseRun) -> Any:
    """The module ``egrsd diagnose <args>`` diagnoses (``--ckpt_path`` loaded), without sampling anything."""
    config, init = parse_run([*args, "--output", "unused"], add_arguments)
    return prepare_module(init, resolve_settings(config, init))[0]


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
    benchmarks: list[Benchmark | str], bench_dir: str | None, limit: int | None
) -> dict[str, list[Problem]]:
    """``{benchmark: problems}`` with their solution column when the source has one; ``limit`` (``--problems``)
    replaces each benchmark's own."""
    loaded: dict[str, list[Problem]] = {}
    for item in benchmarks:
        benchmark = resolve_benchmark(item, bench_dir)
        if limit is not None:
            benchmark = dataclasses.replace(benchmark, limit=limit)
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
        loaded[benchmark.name] = [dataclasses.replace(p, solution=proxy_reference(p)) for p in problems]
    if not loaded:
        raise ValueError("--evaluation.benchmarks names no benchmark")
    return loaded


# ------------------------------------------------------------------------------------ sample and score
def sample(
    module: Any, datamodule: Any, problems: dict[str, list[Problem]], settings: Settings
) -> list[Completion]:
    """K completions of every problem from the run's rollout engine, after the same length check as the
    avg@K evaluation (the longest prompt plus ``--evaluation.max_new_tokens`` must fit)."""
    builder, sampling = module.prompt_builder, settings.sampling
    engine = datamodule.engine
    longest = longest_prompt_tokens(builder, problems)
    check_sequence_fits(
        longest,
        sampling.max_new_tokens,
        model_context=model_context_length(module.policy),
        engine_limit=engine.max_sequence_length(),
        new_tokens_flag="--evaluation.max_new_tokens",
        prompt_name="the longest diagnosed prompt",
    )
    engine.reserve_length(longest + sampling.max_new_tokens)
    datamodule.ensure_engine(module)
    engine.sync_policy(module.policy, 0)
    per_call = settings.prompts_per_call
    chunks = [
        (name, start, items[start : start + per_call])
        for name, items in problems.items()
        for start in range(0, len(items), per_call)
    ]
    rollouts: list[Completion] = []
    bar = tqdm(total=sum(len(items) for items in problems.values()), desc="sample", unit="problem")
    try:
        for call, (name, start, chunk) in enumerate(chunks):
            seed = None if sampling.seed is None else sampling.seed * 1_000_003 + call
            generated = engine.generate(
                [builder.student_prompt_ids(p.problem) for p in chunk],
                dataclasses.replace(sampling, seed=seed),
            )
            k = sampling.num_rollouts
            rollouts += [Completion(name, start + r.prompt_index, j % k, r) for j, r in enumerate(generated)]
            bar.update(len(chunk))
    finally:
        bar.close()
        datamodule.teardown("fit")
    return rollouts


@torch.no_grad()
def score_batch(
    module: Any, datamodule: Any, owners: list[Problem], rollouts: list[Rollout], gate: GateConfig
) -> Any:
    """Per-token ``(mask, H, δ, normaliser, ω)`` of one batch, the training step's way.

    Packs the completions behind both prompts (:meth:`RolloutDataModule.pack_rollouts`, the privileged
    reference prompt) and runs :meth:`EGRSDModule.gated_teacher_inputs` and
    :meth:`EGRSDModule.gate_quantities` with the EGRSD gate (``W = 0``) of ``gate``.

    Returns:
        The :class:`~egrsd_pl.losses.TokenQuantities` of the batch.
    """
    rows = [dataclasses.replace(r, prompt_index=i) for i, r in enumerate(rollouts)]  # owners[i] is row i's
    zeros = torch.zeros(len(rows))
    batch = datamodule.pack_rollouts(
        owners, rows, module, rewards=zeros, correct=zeros.bool(), teacher_prompt="reference"
    ).to(module.device)
    inputs = module.gated_teacher_inputs(batch, None)
    return module.gate_quantities(inputs, dataclasses.replace(gate, window=0))


@torch.no_grad()
def score(
    module: Any,
    datamodule: Any,
    problems: dict[str, list[Problem]],
    rollouts: list[Completion],
    settings: Settings,
) -> tuple[list[report.CompletionView], dict[str, torch.Tensor]]:
    """Every completion, ``--batch_size`` at a time: per-completion views and flat per-token tensors."""
    tokenizer, gate = module.tokenizer, settings.gate
    views: list[report.CompletionView] = []
    columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("entropy", "gap", "omega", "regime", "restore")}
    for start in tqdm(range(0, len(rollouts), settings.batch_size), desc="score", unit="batch"):
        batch = rollouts[start : start + settings.batch_size]
        owners = [problems[c.benchmark][c.problem_index] for c in batch]
        quantities = score_batch(module, datamodule, owners, [c.rollout for c in batch], gate)
        mask, entropy, gap = quantities.mask, quantities.teacher_entropy, quantities.delta  # [B, T] each
        gates = mechanism.token_gates(
            entropy,
            mask,
            gamma=gate.gamma,
            window=gate.window,
            omega_floor=gate.omega_floor,
            entropy_max=quantities.entropy_max,
        )  # Ĥ, Ĥ^CL, ω^CL; ω as the module computed it
        gates = gates._replace(omega=quantities.omega, restore=gates.omega_cl - quantities.omega)
        regime = mechanism.classify_regimes(
            gates.entropy_hat,
            gates.entropy_cl_hat,
            mask,
            tau_low=settings.tau_low,
            tau_high=settings.tau_high,
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
    settings: Settings,
    module: Any,
    problems: dict[str, list[Problem]],
    rollouts: list[Completion],
    views: list[report.CompletionView],
    flat: dict[str, torch.Tensor],
) -> None:
    out, gate = settings.output, settings.gate
    (out / "traces").mkdir(parents=True, exist_ok=True)
    row = torch.ones(1, flat["entropy"].numel(), dtype=torch.bool)  # [1, M] every token is a completion token
    deciles = mechanism.entropy_deciles(flat["entropy"][None], flat["gap"][None], flat["omega"][None], row)
    regimes = mechanism.regime_stats(flat["regime"][None], flat["restore"][None])
    (out / "deciles.md").write_text(report.decile_table(deciles) + "\n")
    report.decile_figure(deciles, gamma=gate.gamma).savefig(out / "deciles.png")
    table = report.regime_table(
        regimes, tau_low=settings.tau_low, tau_high=settings.tau_high, gamma=gate.gamma, window=gate.window
    )
    (out / "regimes.md").write_text(table + "\n")
    report.regime_figure(regimes).savefig(out / "regimes.png")
    ranked = sorted(range(len(views)), key=lambda i: -sum(c == mechanism.PIVOT for c in views[i].regime))
    traces = []
    for rank, index in enumerate(ranked[: settings.traces]):
        view = views[index]
        flags = torch.tensor([c == mechanism.PIVOT for c in view.regime], dtype=torch.bool)
        begin = mechanism.densest_window(flags, settings.trace_tokens)
        path = out / "traces" / f"trace_{rank + 1:02d}.png"
        report.trace_figure(view, start=begin, length=settings.trace_tokens, window=gate.window).savefig(path)
        traces.append({"file": str(path.relative_to(out)), "completion": index, "start": begin})
    shown = ranked[: settings.html_completions]
    header = (
        f"γ {gate.gamma}, W {gate.window}, τ_low {settings.tau_low}, τ_high {settings.tau_high}; "
        f"checkpoint {settings.ckpt_path or 'base model'}"
    )
    (out / "tokens.html").write_text(
        report.tokens_html([views[i] for i in shown], header=header), encoding="utf-8"
    )
    with (out / "tokens.jsonl").open("w", encoding="utf-8") as handle:
        for view in views:
            handle.write(dumps(view._asdict(), ensure_ascii=False) + "\n")
    summary = {
        "settings": settings.to_json(),
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
    write_json(out / "diagnostics.json", summary)  # undefined ratios (no fork tokens) are null

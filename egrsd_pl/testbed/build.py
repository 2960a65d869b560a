"""Building, caching and resolving the offline testbed (tokenizer + warm-started tiny Qwen3).

``build_testbed`` writes an ordinary Hugging Face folder; ``ensure_testbed`` caches one per
``(version, budget, seed)`` and builds it atomically; ``resolve_model_path`` turns the config
value ``testbed:tiny`` into that folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qsl

import torch
import transformers

from egrsd_pl.prompts import (
    DEFAULT_INSTRUCTION,
    DEFAULT_TRANSITION,
    REFERENCE_BEGIN,
    REFERENCE_END,
    REFERENCE_HEADER,
    PromptBuilder,
)
from egrsd_pl.testbed.model import build_model, tiny_qwen3_config
from egrsd_pl.testbed.synthetic import synthetic_problems, worked_problems
from egrsd_pl.testbed.tokenizer import train_tokenizer
from egrsd_pl.testbed.warmstart import evaluate_greedy, train_sft

TESTBED_VERSION = 3  # bump when the corpus, tokenizer, model or recipe changes: it keys the cache
DEFAULT_BUDGET_S = 210.0
# Seconds per warm-start step (batch 16, length-sorted batches) on a 2-core x86 CPU with little
# else running: 1,500 steps took 138 s. The budget is converted to steps with it, so a build does
# not depend on how busy the machine is; the wall time on slow or shared machines is bounded by
# WALL_LIMIT_FACTOR * budget + WALL_LIMIT_EXTRA_S.
REFERENCE_STEP_S = 0.09
WALL_LIMIT_FACTOR = 5.0
WALL_LIMIT_EXTRA_S = 60.0
TESTBED_SCHEME = "testbed:"
_TOKENIZER_CORPUS_SEED = 12345  # the tokenizer does not depend on the build seed
_MARKER = "testbed.json"


def tokenizer_corpus(num_problems: int = 3000) -> list[str]:
    """Plain training text of the tokenizer: problems, solutions, verbose chains and prompt wording."""
    rng = random.Random(_TOKENIZER_CORPUS_SEED)
    fixed = [DEFAULT_INSTRUCTION, DEFAULT_TRANSITION, REFERENCE_HEADER, REFERENCE_BEGIN, REFERENCE_END]
    texts = ["system\n", "user\n", "assistant\n"]
    for worked in worked_problems(num_problems, seed=_TOKENIZER_CORPUS_SEED, split="train"):
        texts += [worked.text, worked.solution, worked.verbose_chain(rng), *fixed]
    return texts


def build_testbed(
    output_dir: str | os.PathLike[str],
    *,
    budget_s: float = DEFAULT_BUDGET_S,
    seed: int = 0,
    progress: bool = True,
    eval_problems: int = 128,
) -> Path:
    """Builds the tokenizer and the tiny Qwen3, warm-starts it (nominal ``budget_s`` seconds) and saves both.

    Args:
        output_dir: Folder to write (created; existing files are overwritten).
        budget_s: Seconds of warm start on a dedicated 2-core CPU. The run makes
            ``round(budget_s / REFERENCE_STEP_S)`` optimizer steps (2,333 for the default 210 s),
            so its result is the same on a busy machine, which only takes longer; it stops early
            (recorded in ``testbed.json``) after ``5 * budget_s + 60`` seconds of wall time.
            0 saves the untrained random model and skips the evaluation (fast tests).
        seed: Seed of the model initialisation, the warm-start corpus and its order.
        progress: Print progress lines and the final figures.
        eval_problems: Held-out test-split problems for the greedy evaluation (0 skips it).

    Returns:
        ``output_dir``: ``config.json``, ``model.safetensors``, ``generation_config.json`` (stop ids
        ``<|im_end|>``, ``<|endoftext|>``), the tokenizer files, and ``testbed.json`` with the
        measured greedy accuracy and mean completion length.
    """
    if budget_s < 0:
        raise ValueError(f"budget_s must be >= 0, got {budget_s}")
    log = _printer(progress)
    started = time.monotonic()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(tokenizer_corpus())
    config = tiny_qwen3_config(tokenizer)
    model = build_model(config, seed=seed)
    parameters = sum(p.numel() for p in model.parameters())
    log(f"testbed: vocabulary {len(tokenizer)}, tiny Qwen3 with {parameters / 1e6:.2f} M parameters")
    builder = PromptBuilder(tokenizer)
    steps = sft_steps(budget_s)
    log(f"testbed: warm start of {steps} steps (nominal {budget_s:g} s on 2 dedicated cores)")
    sft = train_sft(
        model,
        builder,
        steps=steps,
        seed=seed,
        max_wall_s=WALL_LIMIT_FACTOR * budget_s + WALL_LIMIT_EXTRA_S,
        log=log,
    )
    report: dict[str, object] = {
        "version": TESTBED_VERSION,
        "seed": seed,
        "budget_s": budget_s,
        "parameters": parameters,
        "vocab_size": len(tokenizer),
        "sft_steps_planned": steps,
        "sft_steps": sft.steps,
        "sft_stopped_early": sft.stopped_early,
        "sft_examples": sft.examples,
        "sft_seconds": round(sft.seconds, 1),
        "sft_final_loss": None if sft.steps == 0 else round(sft.final_loss, 4),
    }
    if sft.steps > 0 and eval_problems > 0:
        held_out = synthetic_problems(eval_problems, seed=seed, split="test")
        student = evaluate_greedy(model, builder, held_out)
        teacher = evaluate_greedy(model, builder, held_out, privileged=True)
        concise = [len(builder.sft_target_ids(p.solution)) for p in held_out]
        report.update(
            eval_problems=eval_problems,
            greedy_accuracy=round(student.accuracy, 4),
            mean_completion_length=round(student.mean_length, 1),
            truncated_share=round(student.truncated, 4),
            teacher_greedy_accuracy=round(teacher.accuracy, 4),
            teacher_mean_completion_length=round(teacher.mean_length, 1),
            concise_reference_length=round(sum(concise) / len(concise), 1),
        )
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    report.update(
        build_seconds=round(time.monotonic() - started, 1),
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
    )
    (output / _MARKER).write_text(json.dumps(report, indent=2) + "\n")
    if "greedy_accuracy" in report:
        log(
            f"testbed: greedy accuracy {report['greedy_accuracy']:.1%}, mean completion length "
            f"{report['mean_completion_length']} tokens (concise reference {report['concise_reference_length']}); "
            f"privileged teacher {report['teacher_greedy_accuracy']:.1%}, "
            f"{report['teacher_mean_completion_length']} tokens"
        )
    if sft.stopped_early:
        log(
            f"testbed: the machine was too busy: {sft.steps} of {steps} steps in {sft.seconds:.0f} s; "
            "rebuild on an idle machine (python -m egrsd_pl.testbed build --force) for the full warm start"
        )
    log(f"testbed: built in {report['build_seconds']} s -> {output}")
    return output


def sft_steps(budget_s: float) -> int:
    """Optimizer steps of a warm start with a nominal budget of ``budget_s`` seconds."""
    return round(budget_s / REFERENCE_STEP_S)


def default_cache_dir() -> Path:
    """``$EGRSD_PL_CACHE`` if set, else ``~/.cache/egrsd_pl``."""
    return Path(os.environ.get("EGRSD_PL_CACHE") or Path.home() / ".cache" / "egrsd_pl")


def cached_testbed_dir(
    cache_dir: str | os.PathLike[str] | None = None, *, budget_s: float = DEFAULT_BUDGET_S, seed: int = 0
) -> Path:
    """The cache folder of one testbed: ``{cache}/testbed-v{version}-budget{budget}-seed{seed}``."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"testbed-v{TESTBED_VERSION}-budget{budget_s:g}-seed{seed}"


def ensure_testbed(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    budget_s: float = DEFAULT_BUDGET_S,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """The cached testbed folder, built on first use.

    The build writes into a temporary sibling folder and renames it into place, under an
    exclusive file lock, so an interrupted build never leaves a broken cache and concurrent
    callers (e.g. DDP ranks) build once.
    """
    target = cached_testbed_dir(cache_dir, budget_s=budget_s, seed=seed)
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if (target / _MARKER).is_file():
            return target
        if target.exists():  # left by something other than this function: not a complete testbed
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build_testbed(staging, budget_s=budget_s, seed=seed, progress=progress)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """``testbed:tiny`` (optionally ``testbed:tiny?budget_s=30&seed=1``) or ``testbed:qwen3-shape`` -> its cached folder.

    Any other name (a hub id or a local folder) is returned unchanged.
    """
    if not name.startswith(TESTBED_SCHEME):
        return name
    model, _, query = name[len(TESTBED_SCHEME) :].partition("?")
    if model == "qwen3-shape":  # random weights at Qwen3's shapes (egrsd_pl/testbed/qwen3_shape.py)
        from egrsd_pl.testbed.qwen3_shape import resolve_qwen3_shape

        return str(resolve_qwen3_shape(query))
    if model != "tiny":
        raise ValueError(f"unknown testbed model {name!r}; use 'testbed:tiny' or 'testbed:qwen3-shape'")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    unknown = set(options) - {"budget_s", "seed"}
    if unknown:
        raise ValueError(f"unknown testbed option(s) {sorted(unknown)} in {name!r}; use budget_s and seed")
    try:
        budget_s = float(options.get("budget_s", DEFAULT_BUDGET_S))
        seed = int(options.get("seed", 0))
    except ValueError as error:
        raise ValueError(f"bad testbed option in {name!r}: {error}") from error
    return str(ensure_testbed(budget_s=budget_s, seed=seed))


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): the atomic rename still protects the cache
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _printer(enabled: bool) -> Callable[[str], None]:
    def log(line: str) -> None:
        if enabled:
            print(line, file=sys.stderr, flush=True)

    return log

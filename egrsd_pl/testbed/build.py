"""Building, caching and resolving the offline testbed (tokenizer + warm-started tiny Qwen3).

``build_testbed`` writes an ordinary Hugging Face folder; ``ensure_testbed`` caches one per
``(version, budget, seed)`` and builds it atomically; ``resolve_model_path`` turns the config
value ``testbed:tiny`` into that folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch
import transformers

from egrsd_pl.json_files import write_json
from egrsd_pl.prompts import (
    DEFAULT_INSTRUCTION,
    DEFAULT_TRANSITION,
    REFERENCE_BEGIN,
    REFERENCE_END,
    REFERENCE_HEADER,
    PromptBuilder,
)
from egrsd_pl.testbed.model import build_model, tiny_qwen3_config
from egrsd_pl.testbed.tokenizer import train_tokenizer
from egrsd_pl.testbed.warmstart import (
    WARM_START_THREADS,
    SFTConfig,
    evaluate_greedy,
    fingerprint_drift,
    fixed_threads,
    state_digest,
    train_sft,
    weight_fingerprint,
)
from egrsd_pl.testbed.worlds import WORLD_NAMES, World, world

TESTBED_VERSION = world("tiny").version  # testbed:tiny's (egrsd_pl/testbed/worlds.py): it keys the cache
DEFAULT_BUDGET_S = 210.0
# Seconds per warm-start step (batch 16, length-sorted batches) on a 2-core x86 CPU with little
# else running: 1,500 steps took 138 s. It converts a nominal budget into a fixed number of steps,
# so a build is the same whatever the machine's load; a busy machine only takes longer.
REFERENCE_STEP_S = 0.09
# The weights after this many steps of a build are summarised in testbed.json (``prefix_fingerprint``,
# ``weight_fingerprint``): the test suite and ``python -m egrsd_pl.testbed verify --prefix-only`` replay this
# prefix and compare (``verify`` without the flag replays the whole build).
PREFIX_STEPS = 40
# Largest ``fingerprint_drift`` of a replayed prefix that still counts as the same build. Measured: the
# 40-step prefix with torch's vectorised kernels (AVX2, AMD EPYC) and with them switched off
# (ATEN_CPU_CAPABILITY=default) differ by at most 8.5e-7 in any of the 470,912 weights (1.2e-7 in the
# sampled entries, 1.0e-7 relative in a norm); one step fewer (39) differs by 1.2e-3 and 1.8e-2.
PREFIX_TOLERANCE = 1e-5
# How far a full rebuild's behaviour may be from the shipped build's on another CPU type, where the final
# weights are not comparable (float sums in another order, amplified over 2,293 more steps). Measured: a
# rebuild on AVX2 (AMD EPYC) differs from the shipped build by up to 0.24 in a weight, yet greedy accuracy
# 84.4 vs 81.3 % (one sd on 128 problems: 3.4 points), mean length 99.9 vs 99.6 tokens, teacher 100 % and 51.3
# tokens on both.
ACCURACY_TOLERANCE = 0.10  # absolute, on greedy accuracies and the truncated share
LENGTH_TOLERANCE = 0.10  # relative, on mean completion lengths
# testbed.json fields that any rebuild of the same recipe reproduces exactly (counts, not float results).
EXACT_FIELDS = (
    "world",
    "version",
    "seed",
    "budget_s",
    "teacher_verbose_share",
    "parameters",
    "vocab_size",
    "sft_steps",
    "sft_examples",
    "prefix_steps",
    "eval_problems",
    "concise_reference_length",
)
# The files a fresh build writes byte for byte on any machine (text: no float arithmetic behind them).
EXACT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
)
TESTBED_SCHEME = "testbed:"
# The default build (seed 0, default budget) ships inside the package: ``testbed:tiny`` needs no build.
PACKAGED_DIR = Path(__file__).with_name("tiny")
_TOKENIZER_CORPUS_SEED = 12345  # the tokenizer does not depend on the build seed
_MARKER = "testbed.json"


def tokenizer_corpus(num_problems: int = 3000, *, world_name: str = "tiny") -> list[str]:
    """Plain training text of a world's tokenizer: problems, solutions, verbose chains and prompt wording."""
    rng = random.Random(_TOKENIZER_CORPUS_SEED)
    fixed = [DEFAULT_INSTRUCTION, DEFAULT_TRANSITION, REFERENCE_HEADER, REFERENCE_BEGIN, REFERENCE_END]
    texts = ["system\n", "user\n", "assistant\n"]
    for worked in world(world_name).problems(num_problems, seed=_TOKENIZER_CORPUS_SEED, split="train"):
        texts += [*worked.tokenizer_texts(rng), *fixed]
    return texts


def build_testbed(
    output_dir: str | os.PathLike[str],
    *,
    budget_s: float | None = None,
    seed: int = 0,
    progress: bool = True,
    eval_problems: int = 128,
    teacher_verbose_share: float = 0.0,
    world_name: str = "tiny",
) -> Path:
    """Builds the tokenizer and the tiny Qwen3, warm-starts it (nominal ``budget_s`` seconds) and saves both.

    Args:
        output_dir: Folder to write (created; existing files are overwritten).
        budget_s: Nominal seconds of warm start (``None``: the world's default, 210). The run makes ``round(budget_s / REFERENCE_STEP_S)``
            optimizer steps (2,333 for the default 210 s) on one CPU thread, whatever the wall
            clock says, so the folder is the same, bit for bit, on every run with the same torch
            build and CPU type; a busy machine only takes longer. 0 saves the untrained random
            model and skips the evaluation (fast tests).
        seed: Seed of the model initialisation, the warm-start corpus and its order.
        progress: Print what is built, a progress bar with an ETA, and the final figures.
        eval_problems: Held-out test-split problems for the greedy evaluation (0 skips it).
        teacher_verbose_share: Recipe variant: share of the teacher examples trained towards a verbose
            chain (:class:`~egrsd_pl.testbed.warmstart.SFTConfig`); 0 is the shipped testbed.
        world_name: The world (:mod:`egrsd_pl.testbed.worlds`): ``tiny`` (shipped) or ``mechanism``.

    Returns:
        ``output_dir``: ``config.json``, ``model.safetensors``, ``generation_config.json`` (stop ids
        ``<|im_end|>``, ``<|endoftext|>``), the tokenizer files, and ``testbed.json`` with the
        measured greedy accuracy and mean completion length.
    """
    spec = world(world_name)
    budget_s = spec.default_budget_s if budget_s is None else budget_s
    if budget_s < 0:
        raise ValueError(f"budget_s must be >= 0, got {budget_s}")
    if not 0.0 <= teacher_verbose_share <= 1.0:
        raise ValueError(f"teacher_verbose_share must be in [0, 1], got {teacher_verbose_share}")
    teacher_verbose_share = teacher_verbose_share or spec.teacher_verbose_share
    log = _printer(progress)
    started = time.monotonic()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer, model = _fresh_testbed(seed, spec)
    parameters = sum(p.numel() for p in model.parameters())
    log(
        f"testbed:{spec.name}: vocabulary {len(tokenizer)}, tiny Qwen3 with {parameters / 1e6:.2f} M parameters"
    )
    builder = PromptBuilder(tokenizer)
    steps = sft_steps(budget_s)
    log(f"testbed: warm start of {steps} steps on one CPU thread (about {budget_s:g} s on an idle core)")
    prefix: dict[str, dict[str, Any]] = {}

    def record_prefix(done: int) -> None:
        if done == PREFIX_STEPS:
            prefix["fingerprint"] = weight_fingerprint(model)

    config = SFTConfig(teacher_verbose_share=teacher_verbose_share, world=spec.name)
    sft = train_sft(
        model, builder, steps=steps, seed=seed, config=config, on_step=record_prefix, progress=progress
    )
    report: dict[str, object] = {
        **({"world": spec.name} if spec.name != "tiny" else {}),
        "version": spec.version,
        "seed": seed,
        "budget_s": budget_s,
        **({"teacher_verbose_share": teacher_verbose_share} if teacher_verbose_share else {}),
        "parameters": parameters,
        "vocab_size": len(tokenizer),
        "sft_steps": sft.steps,
        "sft_examples": sft.examples,
        "sft_final_loss": None if sft.steps == 0 else round(sft.final_loss, 4),
        "prefix_steps": PREFIX_STEPS if prefix else None,
        "weights_sha256": state_digest(model),
    }
    if sft.steps > 0 and eval_problems > 0:
        log(
            f"testbed: greedy evaluation on {eval_problems} held-out problems (student, then teacher prompts)"
        )
        held_out = spec.held_out(eval_problems, seed=seed, split="test")
        with fixed_threads(WARM_START_THREADS):
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
    # Wall-clock figures are logged, never saved: the folder a build writes is the same on every run.
    report.update(torch=torch.__version__, transformers=transformers.__version__)
    if prefix:
        report["prefix_fingerprint"] = prefix["fingerprint"]
    write_json(output / _MARKER, report)
    if "greedy_accuracy" in report:
        log(
            f"testbed: greedy accuracy {report['greedy_accuracy']:.1%}, mean completion length "
            f"{report['mean_completion_length']} tokens (concise reference {report['concise_reference_length']}); "
            f"privileged teacher {report['teacher_greedy_accuracy']:.1%}, "
            f"{report['teacher_mean_completion_length']} tokens"
        )
    log(f"testbed: built in {time.monotonic() - started:.0f} s -> {output}")
    return output


def warm_start_prefix_fingerprint(
    *,
    seed: int = 0,
    budget_s: float = DEFAULT_BUDGET_S,
    steps: int = PREFIX_STEPS,
    teacher_verbose_share: float = 0.0,
    world_name: str = "tiny",
) -> dict[str, dict[str, Any]]:
    """``weight_fingerprint`` of the model after the first ``steps`` warm-start steps of a build (its schedule)."""
    spec = world(world_name)
    tokenizer, model = _fresh_testbed(seed, spec)
    share = teacher_verbose_share or spec.teacher_verbose_share
    config = SFTConfig(teacher_verbose_share=share, world=world_name)
    builder = PromptBuilder(tokenizer)
    train_sft(model, builder, steps=sft_steps(budget_s), seed=seed, config=config, stop_after=steps)
    return weight_fingerprint(model)


def prefix_drift(report: dict[str, Any]) -> float:
    """Replays the warm-start prefix of the build that wrote ``report`` (its ``testbed.json``) on this machine
    and returns the ``fingerprint_drift`` from the ``prefix_fingerprint`` it recorded (compare with
    ``PREFIX_TOLERANCE``)."""
    if report.get("prefix_steps") is None or "prefix_fingerprint" not in report:
        raise ValueError("this testbed.json records no warm-start prefix (a build shorter than PREFIX_STEPS)")
    replayed = warm_start_prefix_fingerprint(
        seed=report["seed"],
        budget_s=report["budget_s"],
        steps=report["prefix_steps"],
        teacher_verbose_share=report.get("teacher_verbose_share", 0.0),
        world_name=report.get("world", "tiny"),
    )
    return fingerprint_drift(replayed, report["prefix_fingerprint"])


def _fresh_testbed(seed: int, spec: World | None = None) -> tuple[Any, Any]:
    """The trained tokenizer and the randomly initialised tiny Qwen3 of a build of world ``spec`` (tiny)."""
    spec = spec or world("tiny")
    tokenizer = train_tokenizer(tokenizer_corpus(world_name=spec.name))
    config = tiny_qwen3_config(tokenizer, hidden_size=spec.hidden_size, num_layers=spec.num_layers)
    return tokenizer, build_model(config, seed=seed)


def default_budget_s(world_name: str) -> float:
    """Nominal warm-start seconds of ``testbed:<world_name>`` without ``?budget_s=``."""
    return world(world_name).default_budget_s


def sft_steps(budget_s: float) -> int:
    """Optimizer steps of a warm start with a nominal budget of ``budget_s`` seconds."""
    return round(budget_s / REFERENCE_STEP_S)


def default_cache_dir() -> Path:
    """``$EGRSD_PL_CACHE`` if set, else ``~/.cache/egrsd_pl``."""
    return Path(os.environ.get("EGRSD_PL_CACHE") or Path.home() / ".cache" / "egrsd_pl")


def cached_testbed_dir(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    budget_s: float = DEFAULT_BUDGET_S,
    seed: int = 0,
    teacher_verbose_share: float = 0.0,
    world_name: str = "tiny",
) -> Path:
    """The cache folder of one testbed: ``{cache}/testbed-v{version}-budget{budget}-seed{seed}``, with
    ``-teacherverbose{share}`` for the recipe variant; ``testbed-{world}-v{version}-...`` for another world."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    spec = world(world_name)
    variant = f"-teacherverbose{teacher_verbose_share:g}" if teacher_verbose_share else ""
    prefix = "testbed" if spec.name == "tiny" else f"testbed-{spec.name}"
    return root / f"{prefix}-v{spec.version}-budget{budget_s:g}-seed{seed}{variant}"


def ensure_testbed(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    budget_s: float = DEFAULT_BUDGET_S,
    seed: int = 0,
    progress: bool = True,
    teacher_verbose_share: float = 0.0,
    world_name: str = "tiny",
) -> Path:
    """The cached testbed folder, built on first use.

    The build writes into a temporary sibling folder and renames it into place, under an
    exclusive file lock, so an interrupted build never leaves a broken cache and concurrent
    callers (e.g. DDP ranks) build once.
    """
    target = cached_testbed_dir(
        cache_dir,
        budget_s=budget_s,
        seed=seed,
        teacher_verbose_share=teacher_verbose_share,
        world_name=world_name,
    )
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.with_name(target.name + ".lock")):
        if (target / _MARKER).is_file():
            return target
        if target.exists():  # left by something other than this function: not a complete testbed
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build_testbed(
                staging,
                budget_s=budget_s,
                seed=seed,
                progress=progress,
                teacher_verbose_share=teacher_verbose_share,
                world_name=world_name,
            )
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def packaged_testbed_dir(*, budget_s: float = DEFAULT_BUDGET_S, seed: int = 0) -> Path | None:
    """The testbed folder shipped in the package if it is this version's build of ``(budget_s, seed)``."""
    marker = PACKAGED_DIR / _MARKER
    if not marker.is_file():
        return None
    report = json.loads(marker.read_text())
    if (report.get("version"), report.get("budget_s"), report.get("seed")) != (
        TESTBED_VERSION,
        budget_s,
        seed,
    ):
        return None
    return PACKAGED_DIR


def exact_file_differences(reference: Path, *, seed: int = 0) -> list[str]:
    """Names of the ``EXACT_FILES`` (tokenizer and configs) that a fresh build would not write byte for byte
    as ``reference`` holds them; trains the tokenizer (about 1 s), no warm start."""
    tokenizer, model = _fresh_testbed(seed, world("tiny"))
    with tempfile.TemporaryDirectory(prefix="egrsd-testbed-files-") as scratch:
        tokenizer.save_pretrained(scratch)
        model.save_pretrained(scratch)  # config.json and generation_config.json as a build writes them
        return [
            name
            for name in EXACT_FILES
            if not (reference / name).is_file()
            or (Path(scratch) / name).read_bytes() != (reference / name).read_bytes()
        ]


def report_differences(built: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """What makes the build that wrote ``built`` (a ``testbed.json``) not the build of ``reference``, one
    phrase each; empty when they agree as far as builds on different CPU types can: ``EXACT_FIELDS`` equal,
    prefix fingerprints within ``PREFIX_TOLERANCE``, greedy accuracies within ``ACCURACY_TOLERANCE`` and mean
    completion lengths within ``LENGTH_TOLERANCE`` (relative). Bit-for-bit equality is ``weights_sha256``'s.
    """
    problems = [
        f"{key} {built.get(key)!r} != {reference.get(key)!r}"
        for key in EXACT_FIELDS
        if built.get(key) != reference.get(key)
    ]
    if "prefix_fingerprint" in reference or "prefix_fingerprint" in built:
        drift = fingerprint_drift(
            built.get("prefix_fingerprint", {}), reference.get("prefix_fingerprint", {})
        )
        if not drift <= PREFIX_TOLERANCE:
            problems.append(f"prefix weights {drift:.2g} apart (tolerance {PREFIX_TOLERANCE:g})")
    for key in ("greedy_accuracy", "teacher_greedy_accuracy", "truncated_share"):
        if key in reference and not abs(built.get(key, math.inf) - reference[key]) <= ACCURACY_TOLERANCE:
            problems.append(f"{key} {built.get(key)} vs {reference[key]} (tolerance {ACCURACY_TOLERANCE:g})")
    for key in ("mean_completion_length", "teacher_mean_completion_length"):
        if (
            key in reference
            and not abs(built.get(key, math.inf) - reference[key]) <= LENGTH_TOLERANCE * reference[key]
        ):
            problems.append(f"{key} {built.get(key)} vs {reference[key]} (tolerance {LENGTH_TOLERANCE:.0%})")
    return problems


def differing_files(built: Path, reference: Path) -> list[str]:
    """Names of the files that are not byte-for-byte the same in the two folders (or in only one)."""
    names = sorted({p.name for p in built.iterdir()} | {p.name for p in reference.iterdir()})
    return [
        name
        for name in names
        if not ((built / name).is_file() and (reference / name).is_file())
        or (built / name).read_bytes() != (reference / name).read_bytes()
    ]


def resolve_model_path(name: str) -> str:
    """``testbed:tiny`` (optionally ``testbed:tiny?budget_s=30&seed=1&teacher_verbose=0.75``),
    ``testbed:mechanism`` (optionally ``?budget_s=..&seed=..``) or ``testbed:qwen3-shape`` -> a folder.

    The default (``testbed:tiny``) is the folder shipped in the package; other budgets, seeds and the
    uncertain-teacher recipe (``teacher_verbose``, :class:`~egrsd_pl.testbed.warmstart.SFTConfig`), and
    ``qwen3-shape`` and the mechanism world (:mod:`egrsd_pl.testbed.mechanism`), are built on first use and
    cached. Any other name (a hub id or a local folder) is
    returned unchanged.
    """
    if not name.startswith(TESTBED_SCHEME):
        return name
    model, _, query = name[len(TESTBED_SCHEME) :].partition("?")
    if model == "qwen3-shape":  # random weights at Qwen3's shapes (egrsd_pl/testbed/qwen3_shape.py)
        from egrsd_pl.testbed.qwen3_shape import resolve_qwen3_shape

        return str(resolve_qwen3_shape(query))
    if model == "mechanism":
        spec = world("mechanism")
        options = testbed_options(model, query, {"budget_s": spec.default_budget_s, "seed": 0})
        return str(ensure_testbed(budget_s=options["budget_s"], seed=options["seed"], world_name=model))
    if model != "tiny":
        known = ", ".join(f"'testbed:{name}'" for name in (*WORLD_NAMES, "qwen3-shape"))
        raise ValueError(f"unknown testbed model {name!r}; use {known}")
    options = testbed_options(
        "tiny", query, {"budget_s": DEFAULT_BUDGET_S, "seed": 0, "teacher_verbose": 0.0}
    )
    budget_s, seed, share = options["budget_s"], options["seed"], options["teacher_verbose"]
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"bad testbed:tiny option in {query!r}: teacher_verbose must be in [0, 1]")
    packaged = None if share else packaged_testbed_dir(budget_s=budget_s, seed=seed)
    if packaged is not None:
        return str(packaged)
    return str(ensure_testbed(budget_s=budget_s, seed=seed, teacher_verbose_share=share))


def testbed_options(model: str, query: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The options of ``testbed:<model>?key=value&...`` (``query``: the part after ``?``), each converted to
    the type of its default; an unknown key or a bad value is one line naming the model and the query."""
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown testbed:{model} option(s) {unknown} in {query!r}; use {', '.join(defaults)}"
        )
    try:
        return {key: type(default)(options.get(key, default)) for key, default in defaults.items()}
    except ValueError as error:
        raise ValueError(f"bad testbed:{model} option in {query!r}: {error}") from error


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
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

"""The offline testbed: tokenizer, chat template, tiny Qwen3 save/load, synthetic data, warm start, cache."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from egrsd_pl.prompts import PromptBuilder
from egrsd_pl.testbed import (
    TESTBED_VERSION,
    build_testbed,
    cached_testbed_dir,
    ensure_testbed,
    packaged_testbed_dir,
    resolve_model_path,
    synthetic_problems,
)
from egrsd_pl.testbed import build as build_module
from egrsd_pl.testbed.synthetic import split_of, worked_problems
from egrsd_pl.testbed.warmstart import (
    TEACHER_SHARE,
    _lr_factor,
    boxed_answer,
    example_stream,
    fingerprint_drift,
    state_digest,
    train_sft,
    weight_fingerprint,
)


@pytest.fixture(scope="module")
def untrained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A testbed with budget 0: tokenizer and randomly initialised model, no warm start (a few seconds)."""
    return build_testbed(tmp_path_factory.mktemp("untrained"), budget_s=0, seed=0, progress=False)


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_round_trip(tiny_tokenizer: Any) -> None:
    texts = [
        "Mia has 23 apples and buys 3 bags with 14 apples in each.",
        "Check: 118 + 180 = 298. Yes.\n\nSo \\boxed{298}",
        "Unseen words, tabs\tand unicode: café, 3½, 数学 ✓",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nx\n</think>\n\ny<|im_end|>",
    ]
    for text in texts:
        assert tiny_tokenizer.decode(tiny_tokenizer.encode(text), skip_special_tokens=False) == text
    # Digits are split one by one, as in Qwen3: "2026" is four tokens.
    assert tiny_tokenizer.convert_ids_to_tokens(tiny_tokenizer.encode("2026")) == ["2", "0", "2", "6"]


def test_tokenizer_training_is_deterministic(tiny_tokenizer: Any) -> None:
    from egrsd_pl.testbed.build import tokenizer_corpus
    from egrsd_pl.testbed.tokenizer import train_tokenizer

    fresh = train_tokenizer(tokenizer_corpus())
    assert fresh.get_vocab() == tiny_tokenizer.get_vocab()  # the saved tokenizer of another build
    assert fresh.chat_template == tiny_tokenizer.chat_template


def test_special_tokens_follow_qwen3(tiny_tokenizer: Any) -> None:
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    assert tiny_tokenizer.pad_token == "<|endoftext|>"
    assert tiny_tokenizer.bos_token is None
    assert tiny_tokenizer.padding_side == "right"
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        assert tiny_tokenizer.encode(token) == [tiny_tokenizer.convert_tokens_to_ids(token)]
    # <think> tags are added but not special: skip_special_tokens keeps them and drops <|im_end|>.
    ids = tiny_tokenizer.encode("<think>\nx\n</think>\n\ny<|im_end|>")
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nx\n</think>\n\ny"


def test_chat_template_honours_enable_thinking(tiny_tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"}]
    head = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    render = tiny_tokenizer.apply_chat_template
    assert render(messages, tokenize=False, add_generation_prompt=True) == head
    assert render(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True) == head
    assert (
        render(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        == head + "<think>\n\n</think>\n\n"
    )


def test_chat_template_renders_reasoning_like_qwen3(tiny_tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>\nold thought\n</think>\n\nA1"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "<think>\nnew thought\n</think>\n\nA2"},
    ]
    # Reasoning of turns before the last user message is dropped; the final turn keeps it.
    assert tiny_tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n<think>\nnew thought\n</think>\n\nA2<|im_end|>\n"
    )


# --- model -------------------------------------------------------------------------------------


def test_saved_folder_loads_with_from_pretrained(untrained_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from egrsd_pl.testbed.model import build_model

    tokenizer = AutoTokenizer.from_pretrained(untrained_dir)
    model = AutoModelForCausalLM.from_pretrained(untrained_dir, dtype=torch.float32)
    config = model.config
    assert config.model_type == "qwen3" and type(model).__name__ == "Qwen3ForCausalLM"
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config.pad_token_id == tokenizer.pad_token_id
    parameters = sum(p.numel() for p in model.parameters())
    assert 300_000 < parameters < 5_000_000
    generation = GenerationConfig.from_pretrained(untrained_dir)
    assert generation.eos_token_id == [
        tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
    ]
    # Seeded initialisation: a fresh build with the same seed has the saved weights exactly.
    fresh = build_model(config, seed=0)
    ids = torch.tensor([tokenizer.encode("Mia has 3 apples.")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fresh.eval()(ids).logits, atol=0, rtol=0)
    report = json.loads((untrained_dir / "testbed.json").read_text())
    assert report["sft_steps"] == 0 and "greedy_accuracy" not in report


# --- synthetic problems ------------------------------------------------------------------------


def test_generator_is_deterministic_and_splits_are_disjoint() -> None:
    first = synthetic_problems(200, seed=3, split="train")
    assert first == synthetic_problems(200, seed=3, split="train")
    assert first != synthetic_problems(200, seed=4, split="train")
    assert first[:50] == synthetic_problems(50, seed=3, split="train")  # a prefix of a longer list
    texts = {
        split: {p.problem for p in synthetic_problems(300, seed=0, split=split)}
        for split in ("train", "validation", "test")
    }
    assert all(len(found) == 300 for found in texts.values())  # distinct within a split
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert all(split_of(text) == "test" for text in texts["test"])
    with pytest.raises(ValueError, match="split"):
        synthetic_problems(1, seed=0, split="dev")  # type: ignore[arg-type]


def test_problem_records_are_consistent() -> None:
    for worked in worked_problems(300, seed=1, split="validation"):
        problem = worked.problem
        assert problem.id == worked.id and problem.id.startswith("synth-")
        assert problem.answer == str(worked.answer)
        assert boxed_answer(problem.solution) == problem.answer  # solution ends with \boxed{answer}
        for step in worked.steps:
            assert step.result == (step.left + step.right if step.op == "+" else step.left * step.right)
    # Hand-checked example of the rendering.
    step = worked_problems(1, seed=0)[0].steps[0]
    assert step.line() == f"{step.label}: {step.left} {step.op} {step.right} = {step.result}."


def test_verbose_chains_are_correct_and_fit_the_tiny_budget(tiny_tokenizer: Any) -> None:
    builder = PromptBuilder(tiny_tokenizer)
    rng = random.Random(0)
    concise, verbose = [], []
    for worked in worked_problems(300, seed=0, split="test"):
        chain = worked.verbose_chain(rng)
        assert f"= {worked.answer}." in chain or f"is {worked.answer}" in chain  # reaches the answer
        concise.append(len(builder.sft_target_ids(worked.solution)))
        verbose.append(len(builder.sft_target_ids(f"{chain}\n{worked.final_line()}")))
    # Concise solutions are short; verbose chains are about twice as long and never need more than
    # the tiny config's 192 new tokens.
    assert min(concise) >= 25 and max(concise) <= 80
    assert sum(verbose) / len(verbose) > 1.5 * sum(concise) / len(concise)
    assert max(verbose) < 192


def test_warm_start_mix_has_privileged_examples(tiny_tokenizer: Any) -> None:
    builder = PromptBuilder(tiny_tokenizer)
    problems = worked_problems(50, seed=0)
    stream = example_stream(builder, problems, seed=0)
    examples = [next(stream) for _ in range(1000)]
    marker = tiny_tokenizer.encode("=== Reference Solution Begin ===")[1:4]
    teacher = [(p, c) for p, c in examples if _contains(p, marker)]
    assert abs(len(teacher) / len(examples) - TEACHER_SHARE) < 0.05
    by_prompt = {tuple(builder.teacher_prompt_ids(w.text, w.solution)): w for w in problems}
    for prompt, completion in teacher:  # privileged examples answer with the concise solution
        assert completion == builder.sft_target_ids(by_prompt[tuple(prompt)].solution)
    assert all(c[-1] == tiny_tokenizer.eos_token_id for _, c in examples)


def test_uncertain_teacher_recipe_trains_the_teacher_towards_verbose_chains(tiny_tokenizer: Any) -> None:
    builder = PromptBuilder(tiny_tokenizer)
    problems = worked_problems(50, seed=0)
    by_prompt = {tuple(builder.teacher_prompt_ids(w.text, w.solution)): w for w in problems}
    marker = tiny_tokenizer.encode("=== Reference Solution Begin ===")[1:4]

    def teacher_examples(share: float) -> list[tuple[list[int], list[int]]]:
        stream = example_stream(builder, problems, seed=0, teacher_verbose_share=share)
        return [(p, c) for p, c in (next(stream) for _ in range(1000)) if _contains(p, marker)]

    variant = teacher_examples(0.75)
    concise = [c == builder.sft_target_ids(by_prompt[tuple(p)].solution) for p, c in variant]
    # about a quarter still copy the reference; the rest are longer chains ending with the same answer line
    assert 0.15 < sum(concise) / len(variant) < 0.35
    for (prompt, completion), copied in zip(variant, concise, strict=True):
        worked = by_prompt[tuple(prompt)]
        text = tiny_tokenizer.decode(completion, skip_special_tokens=True).rstrip()
        assert text.endswith(worked.final_line())
        assert copied or len(completion) > len(builder.sft_target_ids(worked.solution))


def _contains(sequence: list[int], part: list[int]) -> bool:
    return any(sequence[i : i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


# --- warm start --------------------------------------------------------------------------------


def test_lr_factor_hand_checked() -> None:
    assert _lr_factor(0, 0.0, warmup_steps=30) == pytest.approx(1 / 30)  # warm-up, cosine at 1
    assert _lr_factor(100, 0.5, warmup_steps=30) == pytest.approx(0.55)  # 0.1 + 0.9 * 0.5 * (1 + 0)
    assert _lr_factor(100, 1.0, warmup_steps=30) == pytest.approx(0.1)  # floor


def test_boxed_answer_takes_the_last_box_after_thinking() -> None:
    assert boxed_answer("<think>\n\\boxed{1}\n</think>\n\nSo \\boxed{2} or \\boxed{ 3 }") == "3"
    assert boxed_answer("<think>\nx = \\boxed{4}\n</think>\n\nno box") is None
    assert boxed_answer("no thinking, \\boxed{5}") == "5"


@pytest.mark.slow
def test_warm_start_smoke(tmp_path: Path) -> None:
    folder = build_testbed(tmp_path / "tb", budget_s=3.0, seed=0, progress=False, eval_problems=4)
    report = json.loads((folder / "testbed.json").read_text())
    assert report["sft_steps"] == 33  # round(3 / 0.09)
    assert report["prefix_steps"] is None  # a build shorter than PREFIX_STEPS records no prefix
    assert report["sft_examples"] == 16 * 33
    assert 0.0 <= report["greedy_accuracy"] <= 1.0 and report["eval_problems"] == 4
    assert 1 <= report["mean_completion_length"] <= 192
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }


def test_tiny_model_dir_fixture_is_the_packaged_testbed(tiny_model_dir: Path) -> None:
    report = json.loads((tiny_model_dir / "testbed.json").read_text())
    assert report["version"] == TESTBED_VERSION and report["seed"] == 0
    assert (
        report["sft_steps"] == build_module.sft_steps(build_module.DEFAULT_BUDGET_S) == 2333
    )  # round(210 / 0.09)
    assert packaged_testbed_dir() == build_module.PACKAGED_DIR
    assert build_module.differing_files(tiny_model_dir, build_module.PACKAGED_DIR) == []


class _StateDict:
    """Anything with a ``state_dict()``: what ``weight_fingerprint`` reads."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors


def test_weight_fingerprint_and_drift_hand_checked() -> None:
    model = _StateDict(w=torch.arange(10.0), b=torch.tensor([3.0, 4.0]))
    fingerprint = weight_fingerprint(model)
    assert list(fingerprint) == ["b", "w"]  # sorted by name
    # linspace(0, 9, 8) = 0, 1.29, 2.57, 3.86, 5.14, 6.43, 7.71, 9 -> rounded 0, 1, 3, 4, 5, 6, 8, 9
    assert fingerprint["w"]["sample"] == [0.0, 1.0, 3.0, 4.0, 5.0, 6.0, 8.0, 9.0]
    assert fingerprint["w"]["norm"] == pytest.approx(285**0.5)  # sqrt(0² + 1² + ... + 9²)
    assert fingerprint["b"] == {"norm": 5.0, "sample": [3.0, 4.0]}  # fewer entries than samples: all of them
    moved = weight_fingerprint(
        _StateDict(w=torch.arange(10.0) + torch.eye(10)[3] * 0.25, b=torch.tensor([3.0, 4.0]))
    )
    # entry 3 moved by 0.25; norm sqrt(285 - 9 + 3.25²) = 16.9282 vs 16.8819: relative 2.7e-3 < 0.25
    assert fingerprint_drift(moved, fingerprint) == pytest.approx(0.25)
    assert fingerprint_drift(fingerprint, fingerprint) == 0.0
    assert fingerprint_drift(weight_fingerprint(_StateDict(w=torch.arange(10.0))), fingerprint) == float(
        "inf"
    )


def test_report_differences_accepts_another_cpu_and_names_another_build() -> None:
    shipped = json.loads((build_module.PACKAGED_DIR / "testbed.json").read_text())
    assert build_module.report_differences(shipped, shipped) == []
    # A rebuild on AVX2 (AMD EPYC), measured: other final weights and loss, accuracy 84.4 vs 81.3 %, length 99.9.
    other_cpu = {**shipped, "weights_sha256": "1eb5c461", "sft_final_loss": 0.0698}
    other_cpu.update(greedy_accuracy=0.8438, mean_completion_length=99.9)
    assert build_module.report_differences(other_cpu, shipped) == []
    moved = json.loads(json.dumps(shipped["prefix_fingerprint"]))
    moved["model.norm.weight"]["sample"][0] += 1e-4  # ten times PREFIX_TOLERANCE
    other_build = {**other_cpu, "sft_steps": 2332, "greedy_accuracy": 0.6, "prefix_fingerprint": moved}
    assert build_module.report_differences(other_build, shipped) == [
        "sft_steps 2332 != 2333",
        "prefix weights 0.0001 apart (tolerance 1e-05)",
        "greedy_accuracy 0.6 vs 0.8125 (tolerance 0.1)",
    ]


def test_packaged_testbed_is_what_the_build_makes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A fresh build reproduces the shipped testbed as far as a build is reproducible on this machine.

    Byte for byte on any machine: the tokenizer files, ``config.json`` and ``generation_config.json`` of a
    fresh build; the shipped ``model.safetensors`` holds the weights whose hash (``weights_sha256``) the
    build recorded. Within ``PREFIX_TOLERANCE``: the weights after the first 40 of the 2,333 warm-start
    steps (same corpus, order, schedule and initialisation), replayed here and, as on another CPU type,
    with torch's vectorised kernels off (``ATEN_CPU_CAPABILITY=default``, through ``verify --prefix-only``),
    against the ``prefix_fingerprint`` the build recorded; one step fewer is far outside it. The other
    2,293 steps are ``python -m egrsd_pl.testbed verify``'s (a full build). The prefix is compared only
    under the torch version that made the shipped folder (its initialisation and kernels).
    """
    from transformers import AutoModelForCausalLM

    from egrsd_pl.testbed.build import _fresh_testbed

    tokenizer, model = _fresh_testbed(seed=0)
    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
    ):
        assert (tmp_path / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    shipped = json.loads((tiny_model_dir / "testbed.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert state_digest(loaded) == shipped["weights_sha256"]
    assert shipped["prefix_steps"] == build_module.PREFIX_STEPS == 40
    if shipped["torch"] != torch.__version__:
        pytest.skip(
            f"the shipped testbed was built with torch {shipped['torch']}, this is {torch.__version__}"
        )
    seen: dict[int, dict[str, Any]] = {}

    def record(done: int) -> None:
        if done >= 39:
            seen[done] = weight_fingerprint(model)

    steps = build_module.sft_steps(build_module.DEFAULT_BUDGET_S)
    train_sft(model, PromptBuilder(tokenizer), steps=steps, seed=0, stop_after=40, on_step=record)
    reference = shipped["prefix_fingerprint"]
    assert fingerprint_drift(seen[40], reference) <= build_module.PREFIX_TOLERANCE
    assert fingerprint_drift(seen[39], reference) > 100 * build_module.PREFIX_TOLERANCE  # measured: 1.8e-2

    other_kernels = subprocess.run(
        [sys.executable, "-m", "egrsd_pl.testbed", "verify", "--prefix-only"],
        env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert other_kernels.returncode == 0, other_kernels.stderr[-2000:]
    assert "testbed verify: the same build as" in other_kernels.stderr


# --- cache and resolution ----------------------------------------------------------------------


def test_ensure_testbed_caches_and_builds_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_build = build_module.build_testbed

    def counting_build(output: Path, **kwargs: Any) -> Path:
        calls.append(output)
        return real_build(output, **kwargs)

    monkeypatch.setattr(build_module, "build_testbed", counting_build)
    folder = ensure_testbed(tmp_path, budget_s=0, seed=2, progress=False)
    assert (
        folder
        == cached_testbed_dir(tmp_path, budget_s=0, seed=2)
        == tmp_path / f"testbed-v{TESTBED_VERSION}-budget0-seed2"
    )
    assert (folder / "testbed.json").is_file() and calls[0] != folder  # built in a staging folder
    assert ensure_testbed(tmp_path, budget_s=0, seed=2, progress=False) == folder
    assert len(calls) == 1  # the second call hit the cache

    def failing_build(output: Path, **kwargs: Any) -> Path:
        (Path(output) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "build_testbed", failing_build)
    with pytest.raises(KeyboardInterrupt):
        ensure_testbed(tmp_path, budget_s=0, seed=3, progress=False)
    # Nothing half-built is left: neither the target nor the staging folder.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [folder.name]


def test_resolve_model_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model_path("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    assert resolve_model_path("/models/qwen3") == "/models/qwen3"
    monkeypatch.setenv("EGRSD_PL_CACHE", str(tmp_path))
    monkeypatch.setattr(build_module, "ensure_testbed", lambda **kw: cached_testbed_dir(**kw))
    assert resolve_model_path("testbed:tiny") == str(build_module.PACKAGED_DIR)  # shipped: no build
    assert resolve_model_path("testbed:tiny?seed=0") == str(build_module.PACKAGED_DIR)
    monkeypatch.setattr(build_module, "PACKAGED_DIR", tmp_path / "not-shipped")
    assert resolve_model_path("testbed:tiny") == str(tmp_path / f"testbed-v{TESTBED_VERSION}-budget210-seed0")
    assert resolve_model_path("testbed:tiny?budget_s=30&seed=1") == str(
        tmp_path / f"testbed-v{TESTBED_VERSION}-budget30-seed1"
    )
    monkeypatch.undo()
    monkeypatch.setenv("EGRSD_PL_CACHE", str(tmp_path))
    monkeypatch.setattr(build_module, "ensure_testbed", lambda **kw: cached_testbed_dir(**kw))
    # the uncertain-teacher recipe is never the shipped folder
    assert resolve_model_path("testbed:tiny?teacher_verbose=0.75") == str(
        tmp_path / f"testbed-v{TESTBED_VERSION}-budget210-seed0-teacherverbose0.75"
    )
    for bad in (
        "testbed:huge",
        "testbed:tiny?steps=3",
        "testbed:tiny?seed=x",
        "testbed:tiny?teacher_verbose=2",
    ):
        with pytest.raises(ValueError, match="testbed"):
            resolve_model_path(bad)


def test_pyproject_ships_every_file_of_the_packaged_testbed() -> None:
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["egrsd_pl.testbed.tiny"]
    shipped = [p.name for p in build_module.PACKAGED_DIR.iterdir()]
    assert {"model.safetensors", "tokenizer.json", "config.json", "testbed.json"} <= {
        Path(p).name for p in shipped
    }
    assert all(any(fnmatch.fnmatch(name, pattern) for pattern in patterns) for name in shipped)
    assert sum(p.stat().st_size for p in build_module.PACKAGED_DIR.iterdir()) < 3_000_000  # small: ~1.9 MB

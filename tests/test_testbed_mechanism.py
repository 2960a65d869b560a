"""The mechanism world (``testbed:mechanism``): its problems and chains, its options, a deterministic build.

Its diagnose figures (pivots, forks, gap ratio, ω) are measured on the full build and recorded in
docs/testbed.md, "The mechanism world"; a build takes minutes, too long for the suite.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from egrsd_pl.evaluation import resolve_benchmark
from egrsd_pl.problem_sources import load_problems
from egrsd_pl.prompts import PromptBuilder, pack_completions
from egrsd_pl.testbed import build as build_module
from egrsd_pl.testbed import build_testbed, cached_testbed_dir, resolve_model_path
from egrsd_pl.testbed.__main__ import main as cli_main
from egrsd_pl.testbed.build import tokenizer_corpus
from egrsd_pl.testbed.mechanism import ANSWER_SLOTS, STUDENT_HABIT, mechanism_problems
from egrsd_pl.testbed.model import build_model, tiny_qwen3_config
from egrsd_pl.testbed.tokenizer import train_tokenizer
from egrsd_pl.testbed.warmstart import TEACHER_SHARE, boxed_answer, example_stream, supervised_loss
from egrsd_pl.testbed.worlds import world

_LINE = re.compile(r"^(\w+): ([\d +]+) ([*+]) (\d+) = (\d+)\.$")


@pytest.fixture(scope="module")
def mechanism_tokenizer() -> Any:
    return train_tokenizer(tokenizer_corpus(world_name="mechanism"))


def _arithmetic(line: str) -> tuple[str, list[int], str, int]:
    """``(label, operands, op, result)`` of a concise line ``Bags: 8 * 10 = 80.``"""
    found = _LINE.match(line)
    assert found, line
    label, left, op, right, result = found.groups()
    return label, [int(v) for v in left.split(" + ")] + [int(right)], op, int(result)


def test_concise_chains_are_correct_and_choose_what_the_reference_leaves_open() -> None:
    problems = mechanism_problems(200, seed=0, split="test")
    rng = random.Random(0)
    same_as_reference = 0
    for worked in problems:
        assert worked.solution == worked.solution  # seeded by the id: the same every time
        assert boxed_answer(worked.solution) == worked.problem.answer == str(worked.answer)
        completion = worked.completion(rng, verbose=False, teacher=True)
        same_as_reference += completion == worked.solution
        *lines, answer_line = completion.split("\n")
        assert len(lines) == len(worked.products) + 1  # one line per product, then the total
        for line in lines[:-1]:
            label, operands, op, result = _arithmetic(line)
            assert op == "*" and operands[0] * operands[1] == result
        label, operands, op, result = _arithmetic(lines[-1])
        assert label in ("Total", "Sum", "Together") and sum(operands) == result == worked.answer
        expected = sorted([p.result for p in worked.products] + list(worked.addends))
        assert sorted(operands) == expected  # the terms, in whatever order
        assert answer_line.endswith(f" \\boxed{{{worked.answer}}}")
    # Hand-checked share: a two-product problem has 2 (order) x 2 x 2 (operands) x 2 (addends) x 3 (label)
    # x 4^8 (sentence) renderings, so a fresh one almost never equals the reference.
    assert same_as_reference == 0


def test_verbose_chains_are_longer_and_fit_the_config(mechanism_tokenizer: Any) -> None:
    builder = PromptBuilder(mechanism_tokenizer)
    rng = random.Random(1)
    concise, verbose = [], []
    for worked in mechanism_problems(200, seed=0, split="test"):
        concise.append(len(builder.sft_target_ids(worked.completion(rng, verbose=False))))
        chain = worked.completion(rng, verbose=True)
        assert boxed_answer(chain) == str(worked.answer)
        verbose.append(len(builder.sft_target_ids(chain)))
    assert sum(verbose) / len(verbose) > 1.7 * sum(concise) / len(concise)
    assert max(verbose) < 224  # configs/mechanism.yaml: max_new_tokens 224


def test_answer_words_are_single_tokens(mechanism_tokenizer: Any) -> None:
    # The answer sentence is eight uncertain tokens in a row only if every word is one token.
    for words in ANSWER_SLOTS:
        for word in words:
            assert len(mechanism_tokenizer.encode(word, add_special_tokens=False)) == 1, word


def test_teacher_examples_are_fresh_renderings_mostly_concise(mechanism_tokenizer: Any) -> None:
    builder = PromptBuilder(mechanism_tokenizer)
    problems = mechanism_problems(40, seed=0)
    by_prompt = {tuple(builder.teacher_prompt_ids(w.text, w.solution)): w for w in problems}
    share = world("mechanism").teacher_verbose_share
    stream = example_stream(builder, problems, seed=0, teacher_verbose_share=share)
    examples = [next(stream) for _ in range(1600)]
    teacher = [(p, c) for p, c in examples if tuple(p) in by_prompt]
    assert abs(len(teacher) / len(examples) - TEACHER_SHARE) < 0.04
    copies = verbose = 0
    for prompt, completion in teacher:
        worked = by_prompt[tuple(prompt)]
        text = mechanism_tokenizer.decode(completion, skip_special_tokens=True)
        reasoning = text.split("</think>")[0]
        verbose += "Check" in reasoning or "Let me" in reasoning or "wait" in reasoning
        assert boxed_answer(text) == str(worked.answer)
        copies += completion == builder.sft_target_ids(worked.solution)
    assert copies == 0  # the choices are drawn afresh, not read off s*
    # Verbose: the share drawn (0.15); a verbose chain lacks every insertion with probability
    # 0.1 * 0.8 * 0.2^lines * 0.3 < 0.001. About 400 teacher examples: one standard deviation ~0.018.
    assert verbose / len(teacher) == pytest.approx(share, abs=0.06)


def test_options_and_sources_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EGRSD_PL_CACHE", str(tmp_path))
    monkeypatch.setattr(build_module, "ensure_testbed", lambda **kw: cached_testbed_dir(**kw))
    version = world("mechanism").version
    assert resolve_model_path("testbed:mechanism") == str(
        tmp_path / f"testbed-mechanism-v{version}-budget210-seed0"
    )
    assert resolve_model_path("testbed:mechanism?budget_s=30&seed=1") == str(
        tmp_path / f"testbed-mechanism-v{version}-budget30-seed1"
    )
    for bad in ("testbed:mechanism?teacher_verbose=0.75", "testbed:mechanism?seed=x", "testbed:world"):
        with pytest.raises(ValueError, match="testbed"):
            resolve_model_path(bad)
    problems = load_problems("synthetic:mechanism:5", split="test")
    assert [p.id for p in problems] == [w.id for w in mechanism_problems(5, seed=0, split="test")]
    assert resolve_benchmark("mechanism").source == "synthetic:mechanism:200"
    assert cli_main(["path", "mechanism", "--budget-s", "30", "--cache-dir", str(tmp_path)]) == 0
    with pytest.raises(SystemExit):
        cli_main(["build", "mechanism", "--teacher-verbose", "0.5"])


def test_short_build_is_deterministic(tmp_path: Path) -> None:
    folders = [
        build_testbed(
            tmp_path / name, budget_s=0.9, seed=0, progress=False, eval_problems=0, world_name="mechanism"
        )
        for name in ("a", "b")
    ]
    report = json.loads((folders[0] / "testbed.json").read_text())
    assert report["world"] == "mechanism" and report["sft_steps"] == 10 and report["sft_examples"] == 160
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "config.json",
        "testbed.json",
    ):
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name
    first, second = (load_file(folder / "model.safetensors") for folder in folders)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)  # same machine: bit for bit


def test_student_has_habits_and_the_teacher_none() -> None:
    problems = mechanism_problems(50, seed=0)
    rng = random.Random(2)

    def first_word_share(teacher: bool) -> float:
        lines = [w.completion(rng, verbose=False, teacher=teacher).split("\n")[-1] for w in problems * 40]
        return sum(line.startswith("So ") for line in lines) / len(lines)

    # Hand-computed: the habitual word with probability 0.6, else uniform over 4: 0.6 + 0.4 / 4 = 0.7;
    # the teacher is uniform: 1 / 4. 2,000 draws each: one standard deviation is about 0.01.
    assert first_word_share(teacher=False) == pytest.approx(STUDENT_HABIT + (1 - STUDENT_HABIT) / 4, abs=0.04)
    assert first_word_share(teacher=True) == pytest.approx(0.25, abs=0.04)


def test_student_smoothing_is_torch_label_smoothing(mechanism_tokenizer: Any) -> None:
    model = build_model(tiny_qwen3_config(mechanism_tokenizer), seed=0)
    builder = PromptBuilder(mechanism_tokenizer)
    stream = example_stream(builder, mechanism_problems(8, seed=0), seed=0)
    prompts, completions = zip(*(next(stream) for _ in range(4)), strict=True)
    pad = mechanism_tokenizer.pad_token_id
    with torch.no_grad():
        plain = supervised_loss(model, prompts, completions, pad)
        smoothed = supervised_loss(model, prompts, completions, pad, [0.1] * 4)
        mixed = supervised_loss(model, prompts, completions, pad, [0.0, 0.1, 0.0, 0.1])
        assert supervised_loss(model, prompts, completions, pad, [0.0] * 4) == pytest.approx(
            plain.item(), abs=1e-6
        )
        # the reference: torch's own label smoothing on the same logits
        packed = pack_completions(prompts, completions, pad_id=pad)
        input_ids, attention_mask, positions, targets, mask = packed
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = model.lm_head(hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1))))
        expected = F.cross_entropy(logits[mask], targets[mask], label_smoothing=0.1)
        assert smoothed.item() == pytest.approx(expected.item(), rel=1e-5)
        assert plain.item() < mixed.item() < smoothed.item()


RECORD = Path(build_module.__file__).with_name("mechanism_record.json")


def test_a_fresh_build_matches_the_recorded_one(tmp_path: Path) -> None:
    """The recorded ``testbed:mechanism`` build (``egrsd_pl/testbed/mechanism_record.json``, seed 0, default
    budget) against a fresh one: tokenizer and configs byte for byte (SHA-256), and the weights after the first
    40 warm-start steps within ``PREFIX_TOLERANCE`` of the recorded fingerprint, on any x86-64 CPU type (as for
    ``testbed:tiny``; compared only under the torch version that made the record)."""
    import hashlib

    record = json.loads(RECORD.read_text())
    built = record["testbed"]
    spec = world("mechanism")
    assert (built["world"], built["version"], built["seed"]) == ("mechanism", spec.version, 0)
    assert built["budget_s"] == build_module.default_budget_s("mechanism")
    tokenizer, model = build_module._fresh_testbed(seed=built["seed"], spec=spec)
    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    written = {
        name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in build_module.EXACT_FILES
    }
    assert written == record["files_sha256"]
    if torch.__version__ != built["torch"]:
        pytest.skip(f"the prefix was recorded under torch {built['torch']}, this is {torch.__version__}")
    drift = build_module.prefix_drift(built)
    assert drift <= build_module.PREFIX_TOLERANCE, drift


def test_diagnose_on_the_built_world_lands_in_the_target_ranges(tmp_path: Path) -> None:
    """A regression guard for the world (not a timing test): ``egrsd diagnose`` on the base model, with the
    settings its figures in docs/testbed.md were measured with (100 problems x 2 samples, γ 0.3, W 5, τ 0.1 /
    0.3), lands in the ranges the world was designed for. Needs the built world (about 9 CPU-minutes:
    ``python -m egrsd_pl.testbed build mechanism``); skipped where it is not cached."""
    from egrsd_pl.cli import parse_run
    from egrsd_pl.diagnostics import main as diagnose

    if not (cached_testbed_dir(world_name="mechanism") / "testbed.json").is_file():
        pytest.skip("testbed:mechanism is not built here: python -m egrsd_pl.testbed build mechanism")
    config = str(Path(__file__).parents[1] / "configs" / "mechanism.yaml")
    arguments = ["--config", config, "--problems", "100", "--samples", "2", "--output", str(tmp_path / "d")]
    assert diagnose(arguments, parse_run=parse_run) == 0
    summary = json.loads((tmp_path / "d" / "diagnostics.json").read_text())
    assert (summary["settings"]["gamma"], summary["settings"]["window"]) == (0.3, 5)
    regimes = dict(zip(summary["regimes"]["names"], summary["regimes"]["shares"], strict=True))
    assert 0.10 <= regimes["pivot"] <= 0.30 and regimes["fork"] >= 0.02, regimes
    deciles = summary["deciles"]
    assert 30 <= deciles["gap_ratio"] <= 1000
    top_five = deciles["mean_abs_gap"][5:]
    assert all(a < b for a, b in zip(top_five, top_five[1:], strict=False)), top_five
    assert deciles["mean_omega"][-1] <= 0.85
    counts, omegas = deciles["counts"], deciles["mean_omega"]
    assert sum(c * w for c, w in zip(counts, omegas, strict=True)) / sum(counts) <= 0.97

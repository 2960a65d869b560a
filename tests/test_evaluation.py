"""avg@K scoring, reports and the periodic evaluation callback."""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Sequence
from pathlib import Path

import jsonargparse
import lightning.pytorch as pl
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from egrsd_pl.callbacks import PeriodicEvaluation
from egrsd_pl.evaluation import (
    PAPER_BENCHMARKS,
    REPEAT_SEED_STRIDE,
    Benchmark,
    BenchmarkMetric,
    BenchmarkScores,
    EvalResult,
    FrontierPoint,
    evaluate,
    format_table,
    load_benchmarks,
    load_history,
    resolve_benchmark,
    write_report,
)
from egrsd_pl.problem import Problem
from egrsd_pl.prompts import PromptBuilder
from egrsd_pl.rewards import AnswerVerifier
from egrsd_pl.rollout.base import Rollout, RolloutEngine, SamplingConfig
from egrsd_pl.rollout.hf import HFGenerateEngine
from egrsd_pl.testbed.synthetic import synthetic_problems

BENCH_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "bench"
PAPER_COUNTS = {"aime24": 30, "aime25": 30, "hmmt25": 30, "math500": 500, "minerva": 272, "gsm8k": 1319}


# --------------------------------------------------------------------------- fakes
class IndexPrompts:
    """Prompt ids of problem text ``q<i>`` are ``[i]``."""

    def student_prompt_ids(self, problem: str) -> list[int]:
        return [int(problem[1:])]


class TableEngine(RolloutEngine):
    """Answers prompt ``[i]`` with ``answers[i][k]`` (a string), ``lengths[i][k]`` tokens long."""

    def __init__(self, answers: list[list[str]], lengths: list[list[int]], cap: int = 1000) -> None:
        self.answers, self.lengths, self.cap = answers, lengths, cap
        self.synced: list[int] = []
        self.calls = 0

    def setup(self, model, tokenizer, *, model_path, seed) -> None:  # noqa: ANN001 - unused
        pass

    def sync_policy(self, model, step: int) -> None:  # noqa: ANN001
        self.synced.append(step)

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        self.calls += 1
        out = []
        for index, ids in enumerate(prompt_ids):
            row = ids[0]
            for k in range(sampling.num_rollouts):
                length = self.lengths[row][k]
                out.append(Rollout(index, tuple([7] * length), self.answers[row][k], length >= self.cap))
        return out


class ExactVerifier:
    def verify_batch(self, completions: Sequence[str], golds: Sequence[str]) -> list[bool]:
        return [c == g for c, g in zip(completions, golds, strict=True)]


def problems(golds: Sequence[str], prefix: str = "") -> list[Problem]:
    return [Problem(f"{prefix}{i}", f"q{i}", "", gold) for i, gold in enumerate(golds)]


# 3 problems x K=4: correct = [[1,0,1,0], [0,0,0,0], [1,1,1,1]] (gold "a" for every problem).
ANSWERS = [["a", "x", "a", "x"], ["x", "x", "x", "x"], ["a", "a", "a", "a"]]
LENGTHS = [[10, 20, 30, 40], [50, 50, 50, 1000], [1, 2, 3, 4]]
SAMPLING4 = SamplingConfig(temperature=1.0, top_p=0.95, top_k=-1, max_new_tokens=1000, num_rollouts=4, seed=0)


# --------------------------------------------------------------------------- metric math
def test_metric_by_hand_in_two_updates() -> None:
    correct = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)  # [3, 4]
    lengths = torch.tensor(LENGTHS)  # [3, 4]
    truncated = lengths >= 1000  # [3, 4]: one sample
    metric = BenchmarkMetric()
    metric.update(correct[:2], lengths[:2], truncated[:2])
    metric.update(correct[2:], lengths[2:], truncated[2:])
    scores = metric.compute()
    assert scores.avg_at_k == pytest.approx(50.0)  # (2 + 0 + 4) / 12 = 0.5
    assert scores.pass_at_k == pytest.approx(200 / 3)  # 2 of 3 problems solved
    assert scores.mean_length == pytest.approx(1260 / 12)  # (100 + 1150 + 10) / 12 = 105
    assert scores.truncated == pytest.approx(100 / 12)  # 1 of 12
    assert (scores.num_problems, scores.num_samples) == (3, 12)


def test_metric_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[P, K\]"):
        BenchmarkMetric().update(torch.zeros(2, 4, dtype=torch.bool), torch.zeros(2, 3), torch.zeros(2, 4))


def test_overall_avg_avg_len_eff_are_macro_means() -> None:
    result = EvalResult(
        k=4,
        benchmarks={
            "a": BenchmarkScores(50.0, 66.0, 105.0, 0.0, 3, 12),
            "b": BenchmarkScores(100.0, 100.0, 1895.0, 0.0, 1, 4),
        },
        samples=[],
        sampling=SAMPLING4,
    )
    assert result.avg == pytest.approx(75.0)  # (50 + 100) / 2
    assert result.avg_len == pytest.approx(1000.0)  # (105 + 1895) / 2, not (12*105 + 4*1895) / 16
    assert result.eff == pytest.approx(75.0)  # 75 / (1000 / 1000)
    scalars = result.scalars()
    assert scalars["eval/a/avg@4"] == 50.0 and scalars["eval/b/pass@4"] == 100.0
    assert scalars["eval/b/len"] == 1895.0 and scalars["eval/eff"] == pytest.approx(75.0)
    metrics = ("avg@4", "pass@4", "len", "truncated")
    assert set(scalars) == {f"eval/{b}/{m}" for b in "ab" for m in metrics} | {
        "eval/avg",
        "eval/avg_len",
        "eval/eff",
    }


# --------------------------------------------------------------------------- evaluate
def test_evaluate_scores_a_table_engine() -> None:
    engine = TableEngine(ANSWERS, LENGTHS)
    result = evaluate(
        engine,
        IndexPrompts(),
        {"bench": problems(["a", "a", "a"])},
        sampling=SAMPLING4,
        verifier=ExactVerifier(),
        prompts_per_call=2,
        progress=False,
    )
    scores = result.benchmarks["bench"]
    assert (scores.avg_at_k, scores.mean_length) == (50.0, 105.0)  # as in the metric test
    assert scores.pass_at_k == pytest.approx(200 / 3) and scores.truncated == pytest.approx(100 / 12)
    assert engine.calls == 2  # 3 problems, 2 per call
    assert [(s.problem_id, s.sample_index, s.correct) for s in result.samples[:4]] == [
        ("0", 0, True),
        ("0", 1, False),
        ("0", 2, True),
        ("0", 3, False),
    ]
    assert result.samples[7].truncated and result.samples[7].length == 1000


def test_evaluate_shards_problems_by_rank() -> None:
    engine = TableEngine([["a"]] * 5, [[1]] * 5)
    sampling = SamplingConfig(temperature=0.0, num_rollouts=1)
    shard = evaluate(
        engine,
        IndexPrompts(),
        {"b": problems("aaaaa")},
        sampling=sampling,
        verifier=ExactVerifier(),
        rank=1,
        world_size=2,
        progress=False,
    )
    assert [s.problem_id for s in shard.samples] == ["1", "3"]  # rank 1 of 2: problems 1, 3
    with pytest.raises(ValueError, match="rank"):
        evaluate(engine, IndexPrompts(), {"b": problems("a")}, sampling=sampling, rank=2, world_size=2)


def _ddp_worker(rank: int, port: int, queue) -> None:  # noqa: ANN001
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        result = evaluate(
            TableEngine(ANSWERS, LENGTHS),
            IndexPrompts(),
            {"bench": problems(["a", "a", "a"]), "tiny": problems(["z"])},  # rank 1 holds no "tiny" problem
            sampling=SAMPLING4,
            verifier=ExactVerifier(),
            rank=rank,
            world_size=2,
            progress=False,
        )
        queue.put((rank, {name: tuple(s) for name, s in result.benchmarks.items()}, len(result.samples)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_evaluate_reduces_across_two_gloo_ranks() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = torch.multiprocessing.get_context("spawn")
    queue = context.Queue()
    torch.multiprocessing.start_processes(_ddp_worker, args=(port, queue), nprocs=2, start_method="spawn")
    outputs = sorted(queue.get(timeout=60) for _ in range(2))
    # rank 0 scores problems 0, 2 (+ "tiny" 0), rank 1 problem 1; the reduced scores are the global ones.
    expected_bench = (50.0, pytest.approx(200 / 3), 105.0, pytest.approx(100 / 12), 3, 12)
    for _, scores, _ in outputs:
        assert scores["bench"][:6] == expected_bench
        assert scores["tiny"][:6] == (0.0, 0.0, 25.0, 0.0, 1, 4)  # gold "z" never answered; (10+20+30+40) / 4
    assert [n for _, _, n in outputs] == [8 + 4, 4]


# --------------------------------------------------------------------------- benchmarks
def test_resolve_benchmark_names() -> None:
    local = resolve_benchmark("aime24", "/data/bench")
    assert (local.source, local.id_column) == ("/data/bench/aime24.jsonl", "id")
    hub = resolve_benchmark(Benchmark("minerva", limit=5))
    assert (hub.source, hub.split, hub.problem_column, hub.limit) == (
        "math-ai/minervamath",
        "test",
        "question",
        5,
    )
    assert resolve_benchmark("synthetic").source == "synthetic:200"
    mine = Benchmark("mine", source="x.jsonl")
    assert resolve_benchmark(mine, "/data/bench") is mine
    with pytest.raises(ValueError, match="not one of"):
        resolve_benchmark("aime23")
    with pytest.raises(ValueError, match="limit"):
        Benchmark("aime24", limit=0)


def test_callback_config_parses_from_yaml() -> None:
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(PeriodicEvaluation, "evaluation")
    config = parser.parse_object(
        yaml.safe_load(
            """
            evaluation:
              benchmarks: [aime24, {name: math500, limit: 5}, {name: aime25, repeats: 5}]
              bench_dir: data/bench
              every_n_steps: 10
              k: 2
            """
        )
    )
    callback = parser.instantiate_classes(config).evaluation
    assert callback.benchmarks == ["aime24", Benchmark("math500", limit=5), Benchmark("aime25", repeats=5)]
    assert (callback.every_n_steps, callback.sampling.num_rollouts, callback.sampling.top_p) == (10, 2, 0.95)
    assert callback.sampling.max_new_tokens == 32768 and callback.sampling.temperature == 1.0


@pytest.mark.skipif(not BENCH_DIR.is_dir(), reason="shared/data/bench is absent")
def test_paper_benchmarks_load_with_their_counts() -> None:
    loaded = load_benchmarks(list(PAPER_BENCHMARKS), BENCH_DIR)
    assert {name: len(p) for name, p in loaded.items()} == PAPER_COUNTS
    assert loaded["gsm8k"][0].answer == "18" and loaded["hmmt25"][0].answer == "103"
    assert len(load_benchmarks([Benchmark("math500", limit=7)], BENCH_DIR)["math500"]) == 7


@pytest.mark.slow
@pytest.mark.skipif(not BENCH_DIR.is_dir(), reason="shared/data/bench is absent")
def test_every_paper_gold_boxed_after_thinking_is_correct() -> None:
    loaded = load_benchmarks(list(PAPER_BENCHMARKS), BENCH_DIR)
    golds = [p.answer for name in PAPER_BENCHMARKS for p in loaded[name]]
    completions = [
        f"<think>\nLet me work it out.\n</think>\n\nThe answer is $\\boxed{{{gold}}}$." for gold in golds
    ]
    verifier = AnswerVerifier()
    try:
        verdicts = verifier.verify_batch(completions, golds)
    finally:
        if hasattr(verifier, "close"):
            verifier.close()
    failed = [(name, p.id, p.answer) for name in PAPER_BENCHMARKS for p in loaded[name]]
    failed = [f for f, ok in zip(failed, verdicts, strict=True) if not ok]
    assert len(golds) == 2181
    assert failed == []


# --------------------------------------------------------------------------- reports
def _result(rank: int = 0, world_size: int = 1) -> EvalResult:
    return evaluate(
        TableEngine(ANSWERS, LENGTHS),
        IndexPrompts(),
        {"bench": problems(["a", "a", "a"])},
        sampling=SAMPLING4,
        verifier=ExactVerifier(),
        rank=rank,
        world_size=world_size,
        progress=False,
    )


def test_format_table_rows() -> None:
    table = format_table(_result())
    assert "| benchmark | problems | runs | avg@4 | pass@4 | length | truncated |" in table
    assert "| bench | 3 | 1 | 50.00 | 66.67 | 105 | 8.3% |" in table
    assert "| **Avg.** | 3 | | 50.00 | | 105 | |" in table
    assert "Eff = Acc(%) / (AvgLen / 1000) = 476.19" in table  # 50 / 0.105


def test_write_report_files_and_history(tmp_path: Path) -> None:
    earlier = FrontierPoint("step_000010", 10, 40.0, 120.0)
    paths = write_report(_result(), tmp_path / "step_000020", step=20, history=[earlier])
    summary = json.loads(paths["json"].read_text())
    assert (summary["label"], summary["step"], summary["k"], summary["avg"]) == ("step_000020", 20, 4, 50.0)
    assert summary["benchmarks"]["bench"]["pass_at_k"] == pytest.approx(200 / 3)
    assert summary["sampling"]["top_p"] == 0.95
    assert "| bench | 3 | 1 | 50.00 |" in paths["markdown"].read_text()
    lines = paths["completions"].read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[0])["completion"] == "a"
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_history(tmp_path) == [FrontierPoint("step_000020", 20, 50.0, 105.0)]

    other = write_report(_result(rank=1, world_size=2), tmp_path / "sharded", step=20)
    assert set(other) == {"completions"} and other["completions"].name == "completions.rank1.jsonl"


# --------------------------------------------------------------------------- callback
def test_should_evaluate_once_per_step() -> None:
    callback = PeriodicEvaluation(benchmarks=["synthetic"], every_n_steps=2)
    assert [s for s in range(7) if callback.should_evaluate(s)] == [2, 4, 6]
    callback.last_evaluated_step = 4  # gradient accumulation: the hook fires again at the same step
    assert not callback.should_evaluate(4)
    assert not any(PeriodicEvaluation(every_n_steps=0).should_evaluate(s) for s in range(5))
    with pytest.raises(ValueError, match="every_n_steps"):
        PeriodicEvaluation(every_n_steps=-1)


class _StubModule(pl.LightningModule):
    """The callback's protocol: ``policy``, ``prompt_builder`` and ``engine``."""

    def __init__(self, engine: RolloutEngine) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.policy = self.layer
        self.prompt_builder = IndexPrompts()
        self.engine = engine

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(64, 1), batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(2, 1), batch_size=1)


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert "eval/frontier" in events.Tags()["images"]
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_callback_logs_to_tensorboard_under_accumulation(tmp_path: Path) -> None:
    bench = tmp_path / "bench.jsonl"
    rows = [{"id": f"p{i}", "problem": f"q{i}", "answer": "1"} for i in range(2)]
    bench.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # Problem 0 is answered 1 (correct), problem 1 is answered 2 (wrong); 5 and 15 tokens.
    answers = [[f"<think>\nsum\n</think>\n\nSo \\boxed{{{n}}}"] for n in (1, 2)]
    engine = TableEngine(answers, [[5], [15]])
    callback = PeriodicEvaluation(
        benchmarks=[Benchmark("tiny", source=str(bench))],
        every_n_steps=2,
        k=1,
        temperature=0.0,
        progress=False,
    )
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = pl.Trainer(
        max_steps=4,
        accumulate_grad_batches=2,
        callbacks=[callback],
        logger=logger,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
    )
    trainer.fit(_StubModule(engine))
    assert engine.synced == [2, 4]  # after optimizer steps 2 and 4, once each; at_end skips the evaluated 4
    scalars = _scalars(Path(logger.log_dir))
    assert scalars["eval/avg"] == [(2, 50.0), (4, 50.0)]  # 1 of 2 correct
    assert scalars["eval/tiny/avg@1"] == [(2, 50.0), (4, 50.0)]
    assert scalars["eval/avg_len"] == [(2, 10.0), (4, 10.0)]  # (5 + 15) / 2
    assert scalars["eval/eff"] == [(2, 5000.0), (4, 5000.0)]  # 50 / (10 / 1000)
    assert {"eval/tiny/pass@1", "eval/tiny/len"} <= set(scalars)
    report = Path(logger.log_dir) / "eval"
    assert sorted(p.name for p in report.iterdir()) == ["step_000002", "step_000004"]
    state = callback.state_dict()
    assert [p["step"] for p in state["history"]] == [2, 4] and state["last_evaluated_step"] == 4

    trainer.save_checkpoint(tmp_path / "final.ckpt")

    # `main.py validate`: the base weights, then the checkpoint (its step comes from the checkpoint).
    for ckpt_path in (None, tmp_path / "final.ckpt"):
        validator = PeriodicEvaluation(benchmarks=[Benchmark("tiny", source=str(bench))], k=1, progress=False)
        validate = pl.Trainer(
            callbacks=[validator], logger=logger, accelerator="cpu", enable_progress_bar=False
        )
        validate.validate(_StubModule(engine), ckpt_path=ckpt_path)
    assert engine.synced[2:] == [0, 4]
    labels = [(p.label, p.step) for p in load_history(report)]
    assert labels == [("base", 0), ("step_000002", 2), ("final", 4), ("step_000004", 4)]
    assert [p.label for p in validator.history] == ["step_000002", "step_000004", "final"]  # resumed state


# --------------------------------------------------------------------------- tiny testbed
@pytest.mark.slow
def test_greedy_avg_at_1_equals_a_plain_greedy_loop(tiny_model_dir: Path) -> None:
    """`validate`'s scoring path on the warm-started testbed model against a hand-written greedy loop.

    The engine runs one prompt per call (no padding), so the completions must be identical, not only
    the verdicts; the testbed model may solve few problems, which the text equality still checks.
    """
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    builder = PromptBuilder(tokenizer, student_thinking=True)
    held_out = synthetic_problems(16, seed=0, split="test")
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=192, num_rollouts=1)

    engine = HFGenerateEngine(batch_size=1)
    engine.setup(model, tokenizer, model_path=str(tiny_model_dir), seed=0)
    result = evaluate(engine, builder, {"synthetic": held_out}, sampling=greedy, progress=False)

    texts = []
    for problem in held_out:
        prompt = torch.tensor([builder.student_prompt_ids(problem.problem)])  # [1, L]
        with torch.no_grad():
            output = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=192, do_sample=False
            )  # [1, L + new]
        texts.append(tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True))
    with AnswerVerifier() as checker:
        verdicts = checker.verify_batch(texts, [problem.answer for problem in held_out])
    assert [s.completion for s in result.samples] == texts
    assert [s.correct for s in result.samples] == verdicts
    assert result.benchmarks["synthetic"].avg_at_k == pytest.approx(100.0 * sum(verdicts) / len(verdicts))


def test_eff_is_nan_without_length() -> None:
    result = EvalResult(
        k=1, benchmarks={"a": BenchmarkScores(0.0, 0.0, 0.0, 0.0, 1, 1)}, samples=[], sampling=SAMPLING4
    )
    assert math.isnan(result.eff)


# --------------------------------------------------------------------------- repeats and seeds
class SeedRecordingEngine(RolloutEngine):
    """Answers "a" (correct) on the first ``correct_by_repeat[r]`` of K samples, ``r`` read off the seed."""

    def __init__(self, correct_by_repeat: list[int]) -> None:
        self.correct_by_repeat = correct_by_repeat
        self.request_seeds: list[int] = []

    def setup(self, model, tokenizer, *, model_path, seed) -> None:  # noqa: ANN001 - unused
        pass

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        assert sampling.seed is not None
        k = sampling.num_rollouts
        self.request_seeds += [sampling.seed + i for i in range(len(prompt_ids) * k)]  # as VLLMEngine seeds
        hits = self.correct_by_repeat[sampling.seed // REPEAT_SEED_STRIDE]
        return [
            Rollout(i // k, (7,) * (1 + i % k), "a" if i % k < hits else "x", False)
            for i in range(len(prompt_ids) * k)
        ]


def test_repeats_report_mean_and_std_over_runs_with_their_seeds(tmp_path: Path) -> None:
    engine = SeedRecordingEngine(correct_by_repeat=[2, 1, 0])  # K = 2: avg@2 = 100, 50, 0 per run
    sampling = SamplingConfig(temperature=1.0, num_rollouts=2, max_new_tokens=8, seed=0)
    result = evaluate(
        engine,
        IndexPrompts(),
        {"aime24": problems("aa"), "once": problems("a")},
        sampling=sampling,
        verifier=ExactVerifier(),
        repeats={"aime24": 3},
        progress=False,
    )
    scores = result.benchmarks["aime24"]
    assert scores.avg_at_k_runs == (100.0, 50.0, 0.0)
    assert scores.avg_at_k == 50.0  # (100 + 50 + 0) / 3
    assert scores.avg_at_k_std == 50.0  # sqrt((50² + 0² + 50²) / (3 - 1))
    assert scores.pass_at_k == pytest.approx(200 / 3)  # (100 + 100 + 0) / 3
    assert scores.mean_length == 1.5  # lengths 1 and 2 in every run
    assert scores.seeds == (0, REPEAT_SEED_STRIDE, 2 * REPEAT_SEED_STRIDE)
    assert (scores.repeats, scores.num_problems, scores.num_samples) == (3, 2, 12)
    assert result.benchmarks["once"][6:] == (0.0, 1, (100.0,), (0,))
    assert [s.repeat for s in result.samples if s.benchmark == "aime24"] == [0] * 4 + [1] * 4 + [2] * 4
    assert len(set(engine.request_seeds)) == len(engine.request_seeds) == 14  # no request shares a seed

    paths = write_report(result, tmp_path / "base", step=0)
    saved = json.loads(paths["json"].read_text())["benchmarks"]["aime24"]
    assert saved["seeds"] == [0, REPEAT_SEED_STRIDE, 2 * REPEAT_SEED_STRIDE] and saved["avg_at_k_std"] == 50.0
    assert {"avg_at_k", "pass_at_k", "mean_length", "truncated", "num_problems", "num_samples"} <= set(saved)
    assert "| aime24 | 2 | 3 | 50.00 ± 50.00 | 66.67 | 2 | 0.0% |" in paths["markdown"].read_text()
    assert result.scalars()["eval/aime24/avg@2_std"] == 50.0 and "eval/once/avg@2_std" not in result.scalars()


def test_call_seeds_of_ranks_benchmarks_and_calls_never_overlap() -> None:
    seen = []
    for rank in (0, 1):
        engine = SeedRecordingEngine(correct_by_repeat=[0, 0])
        evaluate(
            engine,
            IndexPrompts(),
            {"a": problems("aaaaa"), "b": problems("aaa")},
            sampling=SamplingConfig(num_rollouts=3, seed=11),
            verifier=ExactVerifier(),
            repeats={"a": 2},
            rank=rank,
            world_size=2,
            prompts_per_call=2,
            progress=False,
        )
        seen += engine.request_seeds
    # rank 0: a 3 problems x 2 runs + b 2 problems; rank 1: a 2 x 2 + b 1; 3 samples each
    assert len(seen) == 3 * (3 * 2 + 2 + 2 * 2 + 1) == len(set(seen))


def test_paper_configs_average_aime24_over_five_runs() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    for config in [*root.glob("*.yaml"), *root.glob("qwen3_8b/*.yaml")]:
        data = yaml.safe_load(config.read_text())
        benchmarks = data.get("evaluation", {}).get("benchmarks")
        if str(data.get("model", {}).get("model_name_or_path")).startswith("Qwen/") and benchmarks:
            assert {"name": "aime24", "repeats": 5} in benchmarks, config.name

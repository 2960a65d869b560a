"""No silent truncation: a request that cannot fit fails before generating, naming the flag; a completion
ends only at a stop token or at max_new_tokens."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import Qwen3Config, Qwen3ForCausalLM

from egrsd_pl.callbacks import PeriodicEvaluation
from egrsd_pl.evaluation import Benchmark
from egrsd_pl.rollout.base import (
    Rollout,
    RolloutEngine,
    SamplingConfig,
    SequenceTooLongError,
    check_sequence_fits,
    model_context_length,
)
from egrsd_pl.rollout.hf import HFGenerateEngine

ROOT = Path(__file__).resolve().parents[1]


def test_check_sequence_fits_boundaries_and_messages() -> None:
    fits = dict(model_context=100, engine_limit=(90, "--engine.cap"), new_tokens_flag="--x.max_new_tokens")
    check_sequence_fits(10, 80, prompt_name="p", **fits)  # 90 = the engine cap: fits
    with pytest.raises(SequenceTooLongError) as engine_error:
        check_sequence_fits(10, 81, prompt_name="the longest prompt", **fits)
    assert str(engine_error.value) == (
        "--x.max_new_tokens 81 plus the longest prompt (10 tokens) = 91 tokens exceed the rollout engine's cap "
        "--engine.cap 90; raise it to at least 91 (or set it to null: sized from what the run needs)"
    )
    with pytest.raises(SequenceTooLongError) as model_error:  # the model's context is checked first
        check_sequence_fits(10, 100_000, prompt_name="the longest prompt", **fits)
    assert str(model_error.value) == (
        "--x.max_new_tokens 100,000 plus the longest prompt (10 tokens) = 100,010 tokens exceed the model's "
        "context (max_position_embeddings 100); set --x.max_new_tokens to at most 90"
    )
    check_sequence_fits(
        10**6, 10**6, model_context=None, engine_limit=None, new_tokens_flag="f", prompt_name="p"
    )


# --------------------------------------------------------------------------- evaluation callback
class CountingEngine(RolloutEngine):
    """Answers everything with "x"; counts generate calls and reservations."""

    def __init__(self, limit: tuple[int, str] | None = None) -> None:
        self.limit, self.calls, self.reserved = limit, 0, []

    def setup(self, model, tokenizer, *, model_path, seed) -> None:  # noqa: ANN001 - unused
        pass

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        self.calls += 1
        k = sampling.num_rollouts
        return [Rollout(i // k, (1,), "x", False) for i in range(len(prompt_ids) * k)]

    def reserve_length(self, tokens: int) -> None:
        self.reserved.append(tokens)

    def max_sequence_length(self) -> tuple[int, str] | None:
        return self.limit


class ThreeTokenPrompts:
    def student_prompt_ids(self, problem: str) -> list[int]:
        return [1, 2, 3]


class ContextModule(pl.LightningModule):
    """A policy whose config says ``max_position_embeddings = 100``."""

    def __init__(self, engine: RolloutEngine) -> None:
        super().__init__()
        self.policy = torch.nn.Linear(1, 1)
        self.policy.config = SimpleNamespace(max_position_embeddings=100)  # type: ignore[assignment]
        self.prompt_builder = ThreeTokenPrompts()
        self.engine = engine

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        pass

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(1, 1), batch_size=1)


def validate(engine: RolloutEngine, max_new_tokens: int, tmp_path: Path) -> PeriodicEvaluation:
    callback = PeriodicEvaluation(
        benchmarks=[Benchmark("synthetic", limit=2)],
        k=1,
        max_new_tokens=max_new_tokens,
        progress=False,
        verbose=False,
        report_dir=str(tmp_path),
    )
    trainer = pl.Trainer(callbacks=[callback], logger=False, accelerator="cpu", enable_progress_bar=False)
    trainer.validate(ContextModule(engine))
    return callback


def test_validate_refuses_more_new_tokens_than_the_context_before_generating(tmp_path: Path) -> None:
    assert model_context_length(ContextModule(CountingEngine()).policy) == 100
    engine = CountingEngine()
    with pytest.raises(SequenceTooLongError, match=r"^--evaluation.max_new_tokens 98 plus the longest"):
        validate(engine, 98, tmp_path)  # 3 + 98 = 101 > 100
    assert engine.calls == 0 and engine.reserved == []

    capped = CountingEngine(limit=(50, "--data.engine.init_args.max_model_len"))
    with pytest.raises(SequenceTooLongError, match="max_model_len 50; raise it to at least 51"):
        validate(capped, 48, tmp_path)
    assert capped.calls == 0

    fits = CountingEngine()
    validate(fits, 97, tmp_path)  # 3 + 97 = 100: fits, reserved, then generated
    assert set(fits.reserved) == {100} and fits.calls == 1


# --------------------------------------------------------------------------- HF engine
class StubTokenizer:
    pad_token_id = 31

    def __init__(self, eos: int) -> None:
        self.eos_token_id = eos

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def constant_qwen3(context: int, eos: int) -> Qwen3ForCausalLM:
    """A 1-layer Qwen3 whose logits are all 0, so greedy decoding always picks token 0."""
    config = Qwen3Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=context,
        eos_token_id=eos,
        pad_token_id=31,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def engine_for(model: Qwen3ForCausalLM, eos: int) -> HFGenerateEngine:
    engine = HFGenerateEngine(batch_size=2)
    engine.setup(model, StubTokenizer(eos), model_path="unused", seed=0)
    return engine


def test_hf_engine_refuses_a_request_beyond_the_context_before_generating() -> None:
    engine = engine_for(constant_qwen3(context=16, eos=1), eos=1)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    with pytest.raises(SequenceTooLongError, match=r"max_new_tokens 12 plus .* \(5 tokens\) = 17 .* 16\)"):
        engine.generate([[3, 4], [3, 4, 5, 6, 7]], greedy)


def test_hf_engine_ends_a_completion_only_at_a_stop_token_or_at_max_new_tokens() -> None:
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    # Token 0 is not a stop token: every completion runs to the cap (4 + 12 = 16 fits the context).
    capped = engine_for(constant_qwen3(context=16, eos=1), eos=1).generate([[3, 4], [3, 4, 5, 6]], greedy)
    assert [(r.completion_ids, r.truncated) for r in capped] == [((0,) * 12, True)] * 2
    # Token 0 is the stop token: one-token completions, the stop token counted in |y|.
    stopped = engine_for(constant_qwen3(context=16, eos=0), eos=0).generate([[3, 4], [3, 4, 5, 6]], greedy)
    assert [(r.completion_ids, r.length, r.truncated) for r in stopped] == [((0,), 1, False)] * 2


# --------------------------------------------------------------------------- vLLM engine (not started)
@pytest.mark.vllm
def test_vllm_max_model_len_is_sized_from_reservations_or_checked() -> None:
    from egrsd_pl.rollout.vllm import MAX_MODEL_LEN_FLAG, VLLMEngine

    derived = VLLMEngine()  # max_model_len None: the largest reservation, no cap before start-up
    derived.reserve_length(1_100)  # training: student prompt + 1,024
    derived.reserve_length(33_000)  # evaluation: prompt + 32,768
    derived.reserve_length(500)
    assert derived.max_sequence_length() is None and derived._reserved == 33_000

    explicit = VLLMEngine(max_model_len=20_000)
    assert explicit.max_sequence_length() == (20_000, MAX_MODEL_LEN_FLAG)
    explicit.reserve_length(20_000)
    with pytest.raises(SequenceTooLongError, match=r"33,000 tokens .* holds 20,000 \(--data.engine"):
        explicit.reserve_length(33_000)


# --------------------------------------------------------------------------- the command line
def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [
        (
            "validate",
            ["--evaluation.max_new_tokens", "5000"],
            "error: --evaluation.max_new_tokens 5,000 plus the longest evaluation prompt (",
        ),
        (
            "fit",
            ["--data.max_new_tokens", "3000", "--data.max_length", "4000"],
            "error: --data.max_new_tokens 3,000 plus the longest teacher prompt kept by --data.max_length (",
        ),
    ],
)
def test_more_new_tokens_than_the_testbed_context_is_one_line_before_generating(
    command: str, flags: list[str], message: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    result = run_main(
        command,
        "--config",
        "configs/tiny.yaml",
        "--model.model_name_or_path",
        str(tiny_model_dir),
        *flags,
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message) and "max_position_embeddings 2,048" in last  # the testbed's context
    assert "Traceback" not in result.stderr and not (tmp_path / "eval").exists()

"""RolloutDataModule.score and make_batch on hand-built rollouts: rewards, truncation, |y|, packing."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import SimpleNamespace

import pytest
import torch

from egrsd_pl.datamodule import RolloutDataModule
from egrsd_pl.losses import OBJECTIVES
from egrsd_pl.problem import Problem
from egrsd_pl.rewards import AnswerVerifier
from egrsd_pl.rollout.base import Rollout, RolloutEngine, SamplingConfig, SequenceTooLongError

STOP = 2  # the stop token id of these fakes
PAD = 0
ANSWER = "<think>\nwork\n</think>\n\nSo \\boxed{4}"


class FakeBuilder:
    """Student prompt of problem text ``q<i>``: ``[10 + i]`` repeated ``i + 1`` times; teacher: 7 ids more."""

    def student_prompt_ids(self, problem: str) -> list[int]:
        i = int(problem[1:])
        return [10 + i] * (i + 1)

    def teacher_prompt_ids(self, problem: str, solution: str) -> list[int]:
        return [20, 21, 22, 23, 24, 25, 26, *self.student_prompt_ids(problem)]


class ScriptedEngine(RolloutEngine):
    """Returns the given rollouts and records what it was asked."""

    def __init__(self, rollouts: list[Rollout], limit: tuple[int, str] | None = None) -> None:
        self.rollouts, self.limit = rollouts, limit
        self.calls: list[tuple[list[list[int]], SamplingConfig]] = []
        self.synced: list[int] = []
        self.reserved: list[int] = []

    def setup(self, model, tokenizer, *, model_path, seed) -> None:  # noqa: ANN001 - unused
        pass

    def sync_policy(self, model, step: int) -> None:  # noqa: ANN001
        self.synced.append(step)

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        self.calls.append(([list(p) for p in prompt_ids], sampling))
        return self.rollouts

    def reserve_length(self, tokens: int) -> None:
        self.reserved.append(tokens)

    def max_sequence_length(self) -> tuple[int, str] | None:
        return self.limit


def rollout(prompt_index: int, text: str, length: int, *, truncated: bool) -> Rollout:
    """``length`` ids ending in the stop token, or ``length`` ids without one when ``truncated``."""
    ids = [5 + prompt_index] * length if truncated else [5 + prompt_index] * (length - 1) + [STOP]
    return Rollout(prompt_index, tuple(ids), text, truncated)


@pytest.fixture
def verifier() -> Iterator[AnswerVerifier]:
    with AnswerVerifier() as checker:
        yield checker


def datamodule(engine: RolloutEngine, verifier: AnswerVerifier, **kwargs: object) -> RolloutDataModule:
    dm = RolloutDataModule(engine=engine, max_new_tokens=10, max_length=64, length_beta=0.5, **kwargs)  # type: ignore[arg-type]
    dm.verifier = verifier
    return dm


PROBLEMS = [Problem("p0", "q0", "s0", "4"), Problem("p1", "q1", "s1", "4")]


def test_score_verifies_a_truncated_completion_that_holds_its_answer(verifier: AnswerVerifier) -> None:
    rollouts = [
        rollout(0, ANSWER, 5, truncated=False),  # correct, 5 tokens with the stop token
        rollout(0, "<think>\nstill working on 2 + 2 = \\boxed{4}", 10, truncated=True),  # cut inside thinking
        rollout(1, ANSWER, 10, truncated=True),  # cut after its final boxed answer
        rollout(1, ANSWER.replace("{4}", "{5}"), 6, truncated=False),  # wrong
        rollout(1, ANSWER[:-1], 10, truncated=True),  # cut inside the box: "\boxed{4"
    ]
    rewards, correct = datamodule(ScriptedEngine([]), verifier).score(PROBLEMS, rollouts)
    assert correct.tolist() == [True, False, True, False, False]
    # r = 1[correct] * (1 + 0.5 * (1 - |y| / 10)): 1 + 0.5 * 0.5 = 1.25; the truncated correct one 1 + 0 = 1.
    assert rewards.tolist() == [1.25, 0.0, 1.0, 0.0, 0.0]
    assert rewards.dtype == torch.float32 and correct.dtype == torch.bool


def test_make_batch_packs_student_and_teacher_row_by_row(verifier: AnswerVerifier) -> None:
    rollouts = [
        rollout(0, ANSWER, 3, truncated=False),
        rollout(0, "<think>\nlong", 10, truncated=True),
        rollout(1, ANSWER, 1, truncated=False),  # only the stop token
        rollout(1, ANSWER.replace("{4}", "{5}"), 4, truncated=False),
    ]
    engine = ScriptedEngine(rollouts)
    dm = datamodule(engine, verifier, num_rollouts=2)
    module = SimpleNamespace(
        prompt_builder=FakeBuilder(),
        tokenizer=SimpleNamespace(pad_token_id=PAD),
        objective_spec=OBJECTIVES["egrsd"],
        policy=None,
        model_path="unused",
    )
    batch = dm.make_batch(PROBLEMS, module, step=7, seed=123)

    assert engine.synced == [7]
    [(prompts, sampling)] = engine.calls
    assert prompts == [[10], [11, 11]]  # one prompt per problem; the engine expands num_rollouts
    assert (sampling.seed, sampling.num_rollouts, sampling.max_new_tokens) == (123, 2, 10)
    assert batch.group_ids.tolist() == [0, 0, 1, 1]
    assert batch.correct.tolist() == [True, False, True, False]
    assert batch.rewards.tolist() == pytest.approx(
        [1.35, 0.0, 1.45, 0.0]
    )  # 1 + 0.5 * (1 - 3/10); 1 + 0.5 * (1 - 1/10)

    student, teacher = batch.student, batch.teacher
    assert teacher is not None
    lengths = [3, 10, 1, 4]  # |y| counts the stop token
    assert student.completion_mask.sum(-1).tolist() == lengths
    assert torch.equal(student.completion_ids, teacher.completion_ids)
    assert torch.equal(student.completion_mask, teacher.completion_mask)
    student_prompts = [[10], [10], [11, 11], [11, 11]]
    teacher_prompts = [[20, 21, 22, 23, 24, 25, 26, *p] for p in student_prompts]
    for row, (r, length) in enumerate(zip(rollouts, lengths, strict=True)):
        ids = list(r.completion_ids)
        assert student.completion_ids[row, :length].tolist() == ids
        for packed, prompt in ((student, student_prompts[row]), (teacher, teacher_prompts[row])):
            width = len(prompt) + length
            assert packed.input_ids[row, :width].tolist() == prompt + ids
            assert packed.attention_mask[row].sum() == width
            # the hidden state at positions[t] predicts completion token t: input_ids[positions[t] + 1]
            positions = packed.positions[row, :length]
            assert positions.tolist() == list(range(len(prompt) - 1, len(prompt) - 1 + length))
            assert packed.input_ids[row, positions + 1].tolist() == ids


def test_check_lengths_names_the_flag_and_reserves_the_engine(verifier: AnswerVerifier) -> None:
    fits = ScriptedEngine([], limit=(12, "--engine.cap"))
    dm = datamodule(fits, verifier)
    dm.check_lengths(FakeBuilder(), PROBLEMS, longest_teacher=9)  # longest student prompt 2 + 10 = 12
    assert fits.reserved == [12]

    too_short = ScriptedEngine([], limit=(11, "--engine.cap"))
    with pytest.raises(SequenceTooLongError, match=r"--data.max_new_tokens 10 .* --engine.cap 11") as error:
        datamodule(too_short, verifier).check_lengths(FakeBuilder(), PROBLEMS, longest_teacher=9)
    assert "\n" not in str(error.value) and too_short.reserved == []

"""Student / teacher prompts through the chat template, SFT targets, and token-exact packing."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from egrsd_pl.prompts import DEFAULT_CONCISE_INSTRUCTION, PackedBatch, PromptBuilder, pack_completions
from egrsd_pl.testbed.build import tokenizer_corpus
from egrsd_pl.testbed.tokenizer import train_tokenizer

PROBLEM = "Mia has 3 apples and gets 4 more. How many apples does Mia have now?"
SOLUTION = "Total: 3 + 4 = 7.\nMia has 7 apples now. \\boxed{7}"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The testbed tokenizer, trained in memory (about a second; no model needed)."""
    return train_tokenizer(tokenizer_corpus())


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_student_prompt_text(tokenizer: Any) -> None:
    thinking = PromptBuilder(tokenizer, student_thinking=True)
    plain = PromptBuilder(tokenizer, student_thinking=False)
    user = f"<|im_start|>user\n{PROBLEM}\n\n{INSTRUCTION}<|im_end|>\n"
    assert decode(tokenizer, thinking.student_prompt_ids(PROBLEM)) == user + "<|im_start|>assistant\n"
    assert decode(tokenizer, plain.student_prompt_ids(PROBLEM)) == (
        user + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_teacher_prompt_text_and_independent_thinking_flags(tokenizer: Any) -> None:
    # OPSD's own setting: non-thinking student, thinking teacher.
    builder = PromptBuilder(tokenizer, student_thinking=False, teacher_thinking=True)
    expected = (
        f"<|im_start|>user\n{PROBLEM}\n\n"
        "Here is a reference solution to this problem:\n"
        "=== Reference Solution Begin ===\n"
        f"{SOLUTION}\n"
        "=== Reference Solution End ===\n\n"
        "After reading the reference solution above, solve the problem yourself in your own words "
        "and reach the same final answer.\n\n"
        f"{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert decode(tokenizer, builder.teacher_prompt_ids(PROBLEM, SOLUTION)) == expected
    assert decode(tokenizer, builder.student_prompt_ids(PROBLEM)).endswith("<think>\n\n</think>\n\n")
    flipped = PromptBuilder(tokenizer, student_thinking=True, teacher_thinking=False)
    assert decode(tokenizer, flipped.teacher_prompt_ids(PROBLEM, SOLUTION)).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert decode(tokenizer, flipped.student_prompt_ids(PROBLEM)).endswith("<|im_start|>assistant\n")


def test_teacher_prompt_contains_the_student_problem_and_instruction(tokenizer: Any) -> None:
    builder = PromptBuilder(tokenizer, instruction="Answer briefly.", transition="Now solve it yourself.")
    message = builder.teacher_message(PROBLEM, SOLUTION)
    assert message.startswith(PROBLEM + "\n\n")
    assert message.endswith("\n\nNow solve it yourself.\n\nAnswer briefly.")
    assert builder.student_message(PROBLEM) == f"{PROBLEM}\n\nAnswer briefly."


def contains_run(ids: list[int], run: list[int]) -> bool:
    return any(ids[i : i + len(run)] == run for i in range(len(ids) - len(run) + 1))


@pytest.mark.parametrize("student_thinking", [True, False], ids=["thinking", "non_thinking"])
def test_crisp_teacher_prompt_is_the_student_prompt_behind_the_instruction(
    tokenizer: Any, student_thinking: bool
) -> None:
    # teacher_thinking differs on purpose: CRISP's teacher sees the student's own prompt.
    builder = PromptBuilder(
        tokenizer, student_thinking=student_thinking, teacher_thinking=not student_thinking
    )
    student = builder.student_prompt_ids(PROBLEM)
    teacher = builder.concise_teacher_prompt_ids(PROBLEM)
    assert contains_run(teacher, student) and teacher[-len(student) :] == student
    text = decode(tokenizer, teacher)
    assert text == f"<|im_start|>system\n{DEFAULT_CONCISE_INSTRUCTION}<|im_end|>\n" + decode(
        tokenizer, student
    )
    # Neither the reference solution nor the gold answer (7; no "7" in the problem or instructions).
    assert SOLUTION not in text and "Reference Solution" not in text and "7" not in text
    assert not contains_run(teacher, tokenizer.encode(SOLUTION, add_special_tokens=False))
    # The knob: another instruction gives another prompt, with the same student prompt at its end.
    other = builder.concise_teacher_prompt_ids(PROBLEM, "Be brief.")
    assert other != teacher and other[-len(student) :] == student
    assert decode(tokenizer, other).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    with pytest.raises(ValueError, match="non-empty conciseness instruction"):
        builder.concise_teacher_prompt_ids(PROBLEM, " ")


def test_sft_target_thinking_matches_the_chat_template(tokenizer: Any) -> None:
    builder = PromptBuilder(tokenizer, student_thinking=True)
    target = builder.sft_target_ids(SOLUTION)
    # The last line is the answer, the lines before it the reasoning.
    assert decode(tokenizer, target) == (
        "<think>\nTotal: 3 + 4 = 7.\n</think>\n\nMia has 7 apples now. \\boxed{7}<|im_end|>"
    )
    assert target[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Prompt + target is exactly the templated two-turn conversation (which adds a final "\n").
    conversation = [
        {"role": "user", "content": builder.student_message(PROBLEM)},
        {"role": "assistant", "content": decode(tokenizer, target[:-1])},
    ]
    full = tokenizer.apply_chat_template(conversation, tokenize=False, enable_thinking=True)
    assert builder.student_prompt_ids(PROBLEM) + target + tokenizer.encode("\n") == tokenizer.encode(full)


def test_sft_target_non_thinking_is_the_plain_solution(tokenizer: Any) -> None:
    builder = PromptBuilder(tokenizer, student_thinking=False)
    assert decode(tokenizer, builder.sft_target_ids(SOLUTION)) == SOLUTION + "<|im_end|>"
    # A one-line solution in thinking mode gets Qwen3's empty thinking block.
    one_line = PromptBuilder(tokenizer).sft_target_ids("The answer is \\boxed{7}")
    assert decode(tokenizer, one_line) == "<think>\n\n</think>\n\nThe answer is \\boxed{7}<|im_end|>"


def test_prompt_builder_rejects_bad_inputs(tokenizer: Any) -> None:
    builder = PromptBuilder(tokenizer)
    with pytest.raises(ValueError, match="reference solution"):
        builder.teacher_prompt_ids(PROBLEM, "  ")
    with pytest.raises(ValueError, match="non-empty solution"):
        builder.sft_target_ids("")

    class NoTemplate:
        chat_template = None
        eos_token_id = 1

    with pytest.raises(ValueError, match="chat template"):
        PromptBuilder(NoTemplate())


def test_pack_completions_hand_checked() -> None:
    packed = pack_completions([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert isinstance(packed, PackedBatch)
    # Row 0: prompt length 3, so completion token t is predicted at 3 - 1 + t = 2, 3.
    # Row 1: prompt length 1, so at 0, 1, 2.
    assert packed.input_ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert packed.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert packed.positions.tolist() == [[2, 3, 0], [0, 1, 2]]
    assert packed.completion_ids.tolist() == [[1, 2, 0], [3, 4, 9]]
    assert packed.completion_mask.tolist() == [[True, True, False], [True, True, True]]
    assert packed.positions.dtype == torch.long and packed.completion_mask.dtype == torch.bool


def test_pack_completions_empty_completion_and_errors() -> None:
    packed = pack_completions([[5, 6], [7]], [[], [1]], pad_id=9)
    assert packed.input_ids.tolist() == [[5, 6], [7, 1]]
    assert packed.completion_ids.tolist() == [[9], [1]]
    assert packed.completion_mask.tolist() == [[False], [True]]
    assert packed.positions.tolist() == [[0], [0]]
    with pytest.raises(ValueError, match="empty batch"):
        pack_completions([], [], pad_id=0)
    with pytest.raises(ValueError, match="at least one token"):
        pack_completions([[1], []], [[2], [3]], pad_id=0)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        pack_completions([[1], [2]], [[3]], pad_id=0)


def test_teacher_and_student_see_the_same_completion_ids(tokenizer: Any) -> None:
    builder = PromptBuilder(tokenizer, student_thinking=True, teacher_thinking=True)
    ids = tokenizer.convert_tokens_to_ids
    # A rollout whose ids are *not* what re-tokenising its text would give ("Total" spelled
    # letter by letter): keeping ids end to end must preserve them exactly.
    odd = [ids("<think>"), ids("Ċ"), ids("T"), ids("o"), ids("t"), ids("a"), ids("l")]
    assert tokenizer.encode(decode(tokenizer, odd)) != odd
    rollouts = [odd, builder.sft_target_ids(SOLUTION)]
    problems = [
        (PROBLEM, SOLUTION),
        ("Sam has 2 pens and gets 5 more. How many pens?", "2 + 5 = 7.\n\\boxed{7}"),
    ]
    student = pack_completions([builder.student_prompt_ids(p) for p, _ in problems], rollouts, pad_id=0)
    teacher = pack_completions([builder.teacher_prompt_ids(p, s) for p, s in problems], rollouts, pad_id=0)
    assert torch.equal(student.completion_ids, teacher.completion_ids)
    assert torch.equal(student.completion_mask, teacher.completion_mask)
    for packed in (student, teacher):
        # The token after each recorded position is the completion token it predicts.
        following = packed.input_ids.gather(1, packed.positions + 1)  # [B, T]
        assert torch.equal(following[packed.completion_mask], packed.completion_ids[packed.completion_mask])
    # The teacher input of rollout 0 is the teacher prompt's ids followed by the rollout's exact ids.
    teacher_prompt = builder.teacher_prompt_ids(*problems[0])
    row = teacher.input_ids[0, : len(teacher_prompt) + len(odd)].tolist()
    assert row == teacher_prompt + odd


def test_packed_positions_give_the_unpadded_log_probs(tiny_model_dir: Any, tiny_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    builder = PromptBuilder(tiny_tokenizer)
    prompts = [builder.student_prompt_ids(PROBLEM), builder.teacher_prompt_ids(PROBLEM, SOLUTION)]
    completions = [builder.sft_target_ids(SOLUTION), builder.sft_target_ids(SOLUTION)[:5]]
    packed = pack_completions(prompts, completions, pad_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits  # [B, L, V]
        index = packed.positions.unsqueeze(-1).expand(-1, -1, logits.size(-1))  # [B, T, V]
        log_probs = logits.gather(1, index).log_softmax(-1)  # [B, T, V]
        packed_lp = log_probs.gather(-1, packed.completion_ids.unsqueeze(-1)).squeeze(-1)  # [B, T]
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            alone = model(input_ids=torch.tensor([prompt + completion])).logits[0]  # [L_b, V]
            expected = alone[len(prompt) - 1 : -1].log_softmax(-1)  # [T_b, V]
            expected = expected.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)  # [T_b]
            torch.testing.assert_close(packed_lp[row, : len(completion)], expected, atol=1e-5, rtol=1e-5)

"""Student and privileged-teacher prompts, and the packing of rollouts behind either prompt.

The student sees the problem ``x``; the teacher sees ``x`` with the reference solution ``s*``
and a transition instruction. Both prompts go through the tokenizer's own chat template and
stay token ids from here on: a rollout's sampled ids are appended to each prompt's ids as they
are, never decoded and re-tokenised, so the completion tokens -- and every per-token quantity of
docs/algorithm.md#actors -- are aligned between student and teacher by construction.

Decision (teacher prompt, paper App. D "a two-turn chat template consisting of a reference
reasoning segment, a transition prompt, and the student's on-policy rollout"): the two turns are
one *user* turn holding the problem, the reference solution and the transition instruction, and
the *assistant* turn holding the rollout. This is the layout of the OPSD reference code the
paper builds on (one user message: problem, fenced reference solution, transition, instruction);
a user / assistant(reference) / user(transition) layout would present ``s*`` as the model's own
earlier answer, which neither the paper nor OPSD does. The user turn starts with the student's
problem text and ends with the student's instruction, so the teacher only *adds* context.

CRISP's teacher (docs/algorithm.md#crisp) sees no solution: its prompt is the student's prompt with a
conciseness instruction prepended (:meth:`PromptBuilder.concise_teacher_prompt_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_TRANSITION = (
    "After reading the reference solution above, solve the problem yourself in your own words "
    "and reach the same final answer."
)
REFERENCE_HEADER = "Here is a reference solution to this problem:"
REFERENCE_BEGIN = "=== Reference Solution Begin ==="
REFERENCE_END = "=== Reference Solution End ==="
# Our own wording of CRISP's intent (docs/algorithm.md#crisp); --data.crisp_instruction replaces it.
DEFAULT_CONCISE_INSTRUCTION = (
    "Solve the problem concisely and correctly. Be direct: no unnecessary elaboration, no redundant "
    "steps, no restating of the problem. Write only the key reasoning steps."
)


class PromptBuilder:
    """Builds student prompts, privileged teacher prompts and SFT targets as token ids.

    Args:
        tokenizer: A Hugging Face tokenizer with a Qwen3-style chat template (``enable_thinking``)
            and ``<|im_end|>`` as its EOS token.
        student_thinking: ``enable_thinking`` of the student prompt. False appends Qwen3's empty
            ``<think>\\n\\n</think>\\n\\n`` block to the prompt (OPSD's own runs); True lets the model
            open its own thinking block (the paper's Qwen3 runs).
        teacher_thinking: ``enable_thinking`` of the teacher prompt, set independently.
        instruction: Appended to the problem in both prompts, after a blank line.
        transition: The teacher's instruction to solve the problem itself after the reference.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        student_thinking: bool = True,
        teacher_thinking: bool = True,
        instruction: str = DEFAULT_INSTRUCTION,
        transition: str = DEFAULT_TRANSITION,
    ) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("PromptBuilder needs a tokenizer with a chat template")
        if tokenizer.eos_token_id is None:
            raise ValueError("PromptBuilder needs a tokenizer with an EOS token (<|im_end|> for Qwen3)")
        self.tokenizer = tokenizer
        self.student_thinking = student_thinking
        self.teacher_thinking = teacher_thinking
        self.instruction = instruction
        self.transition = transition

    def student_message(self, problem: str) -> str:
        """The student's user turn: ``{problem}\\n\\n{instruction}``."""
        return f"{problem}\n\n{self.instruction}" if self.instruction else problem

    def teacher_message(self, problem: str, solution: str) -> str:
        """The teacher's user turn: problem, fenced reference solution, transition, instruction."""
        parts = [
            problem,
            f"{REFERENCE_HEADER}\n{REFERENCE_BEGIN}\n{solution.strip()}\n{REFERENCE_END}",
            self.transition,
            self.instruction,
        ]
        return "\n\n".join(part for part in parts if part)

    def student_prompt_ids(self, problem: str) -> list[int]:
        """Token ids of the student prompt, ending with the generation prompt."""
        return self._chat_ids(self.student_message(problem), thinking=self.student_thinking)

    def teacher_prompt_ids(self, problem: str, solution: str) -> list[int]:
        """Token ids of the privileged teacher prompt, ending with the generation prompt.

        The teacher input of a rollout is these ids followed by the rollout's own ids.
        """
        if not solution.strip():
            raise ValueError("the teacher prompt needs a non-empty reference solution")
        return self._chat_ids(self.teacher_message(problem, solution), thinking=self.teacher_thinking)

    def concise_teacher_prompt_ids(
        self, problem: str, instruction: str = DEFAULT_CONCISE_INSTRUCTION
    ) -> list[int]:
        """CRISP's teacher prompt: a system turn holding ``instruction``, then the student's prompt.

        No reference solution and no gold answer. The student's prompt ids (user turn and generation
        prompt, with the *student's* ``enable_thinking``) are the exact tail of these ids, so the teacher
        only adds the instruction in front.

        Decision: the instruction is prepended as a system turn rather than inside the user turn, so the
        student's prompt stays token-for-token what the student saw (CRISP prepends it to the prompt).

        Raises:
            ValueError: On an empty instruction, or a chat template that does not render a system turn
                in front of the unchanged user turn.
        """
        if not instruction.strip():
            raise ValueError("the CRISP teacher prompt needs a non-empty conciseness instruction")
        student = self.student_prompt_ids(problem)
        messages = [
            {"role": "system", "content": instruction},
            {"role": "user", "content": self.student_message(problem)},
        ]
        ids = self._chat_ids(messages, thinking=self.student_thinking)
        if len(ids) <= len(student) or ids[-len(student) :] != student:
            raise ValueError(
                "the tokenizer's chat template does not render a system turn in front of the unchanged user "
                "turn: the CRISP teacher prompt cannot hold the student prompt as it is"
            )
        return ids

    def sft_target_ids(self, solution: str) -> list[int]:
        """The reference solution as the student's completion, ending with ``<|im_end|>``.

        Thinking student: the solution's last non-empty line is the answer and the lines before it
        the reasoning, ``<think>\\n{reasoning}\\n</think>\\n\\n{answer line}<|im_end|>`` -- what the
        chat template renders for that assistant turn, so prompt ids + target ids equal the
        templated conversation. Non-thinking student (the prompt already holds the empty thinking
        block): ``{solution}<|im_end|>``.
        """
        solution = solution.strip()
        if not solution:
            raise ValueError("the SFT target needs a non-empty solution")
        if self.student_thinking:
            reasoning, _, answer = solution.rpartition("\n")
            text = f"<think>\n{reasoning.strip()}\n</think>\n\n{answer.strip()}"
        else:
            text = solution
        return [*self.tokenizer.encode(text, add_special_tokens=False), self.tokenizer.eos_token_id]

    def _chat_ids(self, message: str | list[dict[str, str]], *, thinking: bool) -> list[int]:
        """Ids of one user turn (or of the given messages) through the chat template."""
        messages = [{"role": "user", "content": message}] if isinstance(message, str) else message
        text = self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=thinking,
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))


class PackedBatch(NamedTuple):
    """Prompts followed by their completions, right-padded, with the completion positions.

    Attributes:
        input_ids: ``[B, L]`` prompt ids then completion ids, then ``pad_id``.
        attention_mask: ``[B, L]`` 1 on prompt and completion tokens, 0 on padding.
        positions: ``[B, T]`` index in ``input_ids`` of the hidden state that predicts completion
            token ``t`` (``len(prompt) - 1 + t``); 0 where ``completion_mask`` is False.
        completion_ids: ``[B, T]`` the completion ids, ``pad_id`` where masked.
        completion_mask: ``[B, T]`` bool, True on real completion tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor


def pack_completions(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *, pad_id: int
) -> PackedBatch:
    """Concatenates each prompt with its completion's exact ids and records where the completion is.

    Packing the same completions behind student prompts and behind teacher prompts gives two
    batches with identical ``completion_ids`` and ``completion_mask`` (``T`` is the longest
    completion in both), so ``logits[b, positions[b, t]]`` of either model predicts the same
    token ``completion_ids[b, t]``.

    Args:
        prompt_ids: ``B`` non-empty prompts (token ids).
        completion_ids: ``B`` completions (token ids; may be empty).
        pad_id: Id written into padding (masked everywhere).

    Raises:
        ValueError: On an empty batch, an empty prompt, or ``len(prompt_ids) != len(completion_ids)``.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if not prompt_ids:
        raise ValueError("cannot pack an empty batch")
    if any(len(prompt) == 0 for prompt in prompt_ids):
        raise ValueError(
            "every prompt needs at least one token (its last one predicts the first completion token)"
        )
    batch = len(prompt_ids)
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True))
    horizon = max(len(c) for c in completion_ids)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((batch, width), dtype=torch.long)  # [B, L]
    positions = torch.zeros((batch, horizon), dtype=torch.long)  # [B, T]
    completions = torch.full((batch, horizon), pad_id, dtype=torch.long)  # [B, T]
    completion_mask = torch.zeros((batch, horizon), dtype=torch.bool)  # [B, T]
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        start, length = len(prompt), len(completion)
        input_ids[row, : start + length] = torch.tensor([*prompt, *completion], dtype=torch.long)
        attention_mask[row, : start + length] = 1
        positions[row, :length] = torch.arange(start - 1, start - 1 + length)
        completions[row, :length] = torch.tensor(list(completion), dtype=torch.long)
        completion_mask[row, :length] = True
    return PackedBatch(input_ids, attention_mask, positions, completions, completion_mask)

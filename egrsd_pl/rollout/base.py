"""The rollout interface shared by every generation engine (HF ``generate``, vLLM).

An engine turns prompt token ids into sampled completions of the *current* student policy.
Prompts go in as token ids and completions come out as token ids, so the exact sampled ids are
what the student and the teacher later score (never re-tokenised text).

No silent truncation: a completion ends at a stop token or at ``max_new_tokens`` (then it is
``truncated``), nowhere else. Whoever asks for completions checks first that the longest prompt plus
``max_new_tokens`` fits both the model's context (:func:`model_context_length`) and the engine's own
cap (:meth:`RolloutEngine.max_sequence_length`) with :func:`check_sequence_fits`, which fails with
one line naming the flag to change; engines check every request again before generating.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings of one ``generate`` call.

    Attributes:
        temperature: Softmax temperature (training rollouts: 1.1; evaluation: 1.0). 0 means greedy.
        top_p: Nucleus mass.
        top_k: Keep the ``top_k`` most likely tokens; ``-1`` or ``0`` disables it.
        max_new_tokens: Completion cap ``L_max``; a completion that reaches it without a stop token
            is ``truncated``.
        num_rollouts: Completions per prompt.
        seed: Base seed of the sampler; ``None`` leaves the engine's generator as it is.
    """

    temperature: float = 1.1
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 1024
    num_rollouts: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_rollouts < 1:
            raise ValueError(f"num_rollouts must be >= 1, got {self.num_rollouts}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Rollout:
    """One sampled completion.

    Attributes:
        prompt_index: Index of its prompt in the ``generate`` call.
        completion_ids: The sampled token ids, including the stop token when one was produced.
        text: The completion decoded without special tokens (``<think>``/``</think>`` are kept).
        truncated: True when it reached ``max_new_tokens`` without producing a stop token.
        logprobs: ``[length]`` log-probability of each sampled token under the policy that sampled it, as
            the engine reports it (vLLM's default ``raw_logprobs``: the model's distribution before
            temperature, top-p and top-k), or ``None`` where the engine reports none (HF ``generate``).
        policy_version: The optimizer step whose policy sampled it, where the engine says so (servers),
            else ``None``.
    """

    prompt_index: int
    completion_ids: tuple[int, ...]
    text: str
    truncated: bool
    logprobs: tuple[float, ...] | None = None
    policy_version: int | None = None

    @property
    def length(self) -> int:
        return len(self.completion_ids)


class RolloutEngine(abc.ABC):
    """Generates completions of the current policy from prompt token ids.

    Lifecycle: ``setup`` once per process (after the model exists), ``sync_policy`` once per
    optimizer step before the step's first ``generate`` (engines that read the live module, like
    HF ``generate``, need nothing), ``generate`` any number of times, ``close`` at teardown.

    Attributes:
        generates_apart: True for engines whose ``generate`` runs on a snapshot of the policy held
            outside the training process (vLLM servers), so it may run in a background thread while the
            trainer updates the student (``--data.async_steps 1``).
    """

    generates_apart: bool = False

    @property
    def supports_sharded_policy(self) -> bool:
        """Whether the engine works on a policy sharded by ``--trainer.strategy fsdp2`` (an engine that copies
        weights out of the module must gather them, on every rank at once)."""
        return False

    @property
    def generates_with_the_module(self) -> bool:
        """Whether ``generate`` runs the training module's own forward (HF ``generate``). Under
        ``--trainer.strategy fsdp2`` every such forward gathers layers with the other ranks, so every rank must
        then make the same calls; an engine with its own copy of the weights (vLLM) generates alone."""
        return False

    @property
    def generates_collectively(self) -> bool:
        """Whether a ``generate`` call is a collective of several ranks (a vLLM engine spread over a
        tensor-parallel group), so that those ranks must make the same sequence of calls, empty ones included."""
        return False

    @abc.abstractmethod
    def setup(self, model: Any, tokenizer: Any, *, model_path: str, seed: int) -> None:
        """Binds the engine to the policy.

        Args:
            model: The PEFT-wrapped student (adapter ``default`` is the policy).
            tokenizer: Its tokenizer (pad/eos ids, decoding).
            model_path: Local folder of the base weights (for engines that load their own copy).
            seed: Per-rank seed of the sampler.
        """

    def sync_policy(self, model: Any, step: int) -> None:  # noqa: B027 - optional hook
        """Makes the engine sample from ``model``'s current weights; called once per optimizer ``step``."""

    @abc.abstractmethod
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        """Samples ``sampling.num_rollouts`` completions per prompt.

        Returns:
            ``len(prompt_ids) * num_rollouts`` rollouts, prompt-major: all rollouts of prompt 0,
            then prompt 1, ...
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases the engine's resources."""

    def reserve_length(self, tokens: int) -> None:  # noqa: B027 - optional hook
        """Declares, before the first ``generate``, that sequences of ``tokens`` (prompt + completion)
        must fit. Engines that size a cache at start-up (vLLM's ``max_model_len``) size it from the
        largest reservation; an engine already started with a smaller cap raises ``ValueError``."""

    def max_sequence_length(self) -> tuple[int, str] | None:
        """The engine's own cap on prompt + completion tokens and the flag that sets it, or ``None``
        when only the model's context bounds it (or the cap is still to be sized by reservations)."""
        return None


class SequenceTooLongError(ValueError):
    """A prompt plus ``max_new_tokens`` does not fit the model's context or the engine's cap."""


def model_context_length(model: Any) -> int | None:
    """The model's context in tokens, ``config.max_position_embeddings`` (``None`` if its config has none)."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def check_sequence_fits(
    prompt_tokens: int,
    max_new_tokens: int,
    *,
    model_context: int | None,
    engine_limit: tuple[int, str] | None,
    new_tokens_flag: str,
    prompt_name: str,
) -> None:
    """Fails, before anything is generated, when ``prompt_tokens + max_new_tokens`` cannot fit.

    Args:
        prompt_tokens: Length of the longest prompt that will be sent.
        max_new_tokens: The completion cap that will be asked for.
        model_context: The model's context (:func:`model_context_length`); ``None``: unknown.
        engine_limit: ``(cap, flag)`` of the engine (:meth:`RolloutEngine.max_sequence_length`).
        new_tokens_flag: The flag that set ``max_new_tokens`` (named in the error).
        prompt_name: What the prompt is, for the error (``"the longest evaluation prompt"``).

    Raises:
        SequenceTooLongError: One line naming the flag, the lengths and the bound.
    """
    needed = prompt_tokens + max_new_tokens
    ask = f"{new_tokens_flag} {max_new_tokens:,} plus {prompt_name} ({prompt_tokens:,} tokens) = {needed:,} tokens"
    if model_context is not None and needed > model_context:
        raise SequenceTooLongError(
            f"{ask} exceed the model's context (max_position_embeddings {model_context:,}); "
            f"set {new_tokens_flag} to at most {max(model_context - prompt_tokens, 0):,}"
        )
    if engine_limit is not None and needed > engine_limit[0]:
        cap, flag = engine_limit
        raise SequenceTooLongError(
            f"{ask} exceed the rollout engine's cap {flag} {cap:,}; raise it to at least {needed:,} "
            "(or set it to null: sized from what the run needs)"
        )

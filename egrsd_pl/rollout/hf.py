"""Rollouts with Hugging Face ``generate`` on the live student (adapter active)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from egrsd_pl.rollout.base import (
    Rollout,
    RolloutEngine,
    SamplingConfig,
    check_sequence_fits,
    model_context_length,
)
from egrsd_pl.sharding import is_sharded


class HFGenerateEngine(RolloutEngine):
    """Samples from the training module itself with ``model.generate``.

    Always on-policy by construction (it reads the weights being trained), needs no weight sync and
    no extra memory; slower than vLLM. Prompts are left-padded into batches of ``batch_size``.
    Its only length bound is the model's context (``max_position_embeddings``): a request whose
    prompt plus ``max_new_tokens`` exceeds it fails before generating.

    Under ``--trainer.strategy fsdp2`` every forward gathers the sharded layers with the other ranks, so
    generation runs with ``synced_gpus``: a rank whose completions all stopped keeps stepping until every
    rank's have. Every rank must then make the same number of ``generate`` calls (training steps do: each
    rank samples ``batch_size`` prompts).

    Args:
        batch_size: Prompts per ``generate`` call (each expands to ``num_rollouts`` sequences).
    """

    @property
    def supports_sharded_policy(self) -> bool:
        return True

    @property
    def generates_with_the_module(self) -> bool:
        return True

    def __init__(self, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self._model: Any = None
        self._tokenizer: Any = None
        self._seed = 0

    def setup(self, model: Any, tokenizer: Any, *, model_path: str, seed: int) -> None:
        self._model, self._tokenizer, self._seed = model, tokenizer, seed

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        if self._model is None:
            raise RuntimeError("HFGenerateEngine.generate called before setup()")
        if not prompt_ids:
            return []
        check_sequence_fits(
            max(len(p) for p in prompt_ids),
            sampling.max_new_tokens,
            model_context=model_context_length(self._model),
            engine_limit=None,
            new_tokens_flag="max_new_tokens",
            prompt_name="the longest prompt of the call",
        )
        rollouts: list[Rollout] = []
        with _sampling_rng(self._model, sampling.seed):
            for start in range(0, len(prompt_ids), self.batch_size):
                chunk = prompt_ids[start : start + self.batch_size]
                rollouts.extend(self._generate_chunk(chunk, start, sampling))
        return rollouts

    @torch.no_grad()
    def _generate_chunk(
        self, prompts: Sequence[Sequence[int]], offset: int, sampling: SamplingConfig
    ) -> list[Rollout]:
        tokenizer, model = self._tokenizer, self._model
        device = next(model.parameters()).device
        pad_id = tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [P, L] left-padded
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        stop_ids = stop_token_ids(model, tokenizer)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.num_rollouts,
            pad_token_id=pad_id,
            eos_token_id=sorted(stop_ids),
            synced_gpus=is_sharded(model) and torch.distributed.get_world_size() > 1,
        )
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else None,
            )
        was_training = model.training
        model.eval()
        try:
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
            )  # [P * num_rollouts, L + new]
        finally:
            model.train(was_training)
        completions = output[:, width:].tolist()
        rollouts = []
        for row, ids in enumerate(completions):
            cut = next((i + 1 for i, tok in enumerate(ids) if tok in stop_ids), None)
            # Without a stop token a row ran the whole max_new_tokens (generation ends when every row
            # has stopped or the cap is reached), so every one of its ids was sampled.
            if cut is None and len(ids) != sampling.max_new_tokens:
                raise RuntimeError(
                    f"generate ended a completion after {len(ids)} tokens without a stop token, "
                    f"before max_new_tokens {sampling.max_new_tokens}"
                )
            kept = ids[:cut] if cut is not None else ids
            truncated = cut is None
            rollouts.append(
                Rollout(
                    prompt_index=offset + row // sampling.num_rollouts,
                    completion_ids=tuple(kept),
                    text=tokenizer.decode(kept, skip_special_tokens=True),
                    truncated=truncated,
                )
            )
        return rollouts


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end a completion: the generation config's eos ids plus the tokenizer's eos."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@contextlib.contextmanager
def _sampling_rng(model: Any, seed: int | None) -> Iterator[None]:
    """Seeds the global generators for one call and restores them afterwards (training RNG untouched)."""
    if seed is None:
        yield
        return
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield

"""The tiny Qwen3: an ordinary ``Qwen3ForCausalLM`` small enough to train on two CPU cores."""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

from egrsd_pl.testbed.tokenizer import ENDOFTEXT, IM_END


def tiny_qwen3_config(tokenizer: Any, *, hidden_size: int = 128, num_layers: int = 2) -> Qwen3Config:
    """A standard Qwen3 config (vLLM and ``from_pretrained`` load it): 0.47 M parameters by default.

    Smaller than "about 1-5 M" on purpose: with a 601-token vocabulary, 2 layers of
    width 128 learned the synthetic data fastest per CPU second in a sweep (docs/testbed.md);
    2 x 192 (1.0 M) and 3 x 192 (1.4 M) learned more per step but cost 2-3 times more per step.

    Args:
        tokenizer: The testbed tokenizer (vocabulary size and special ids).
        hidden_size: Model width; the MLP is 3x wider, heads are 32 wide (4 query, 2 KV heads at 128).
        num_layers: Decoder layers.
    """
    head_dim = 32
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // head_dim,
        num_key_value_heads=max(1, hidden_size // head_dim // 2),
        head_dim=head_dim,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        dtype="float32",
    )


def build_model(config: Qwen3Config, *, seed: int) -> Qwen3ForCausalLM:
    """A randomly initialised model (seeded) with Qwen3's stop tokens in its generation config."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[config.eos_token_id, config.pad_token_id],  # <|im_end|>, <|endoftext|>
        pad_token_id=config.pad_token_id,
    )
    return model

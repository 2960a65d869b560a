"""``testbed:qwen3-shape``: a random-weight Qwen3 with Qwen3's vocabulary, special ids and chat template.

It exists to walk the code paths of a real Qwen3 run on a CPU -- the 151,936-row output matrix,
the special-token ids (``<|im_end|>`` 151645, ``<think>`` 151667, ...), Qwen3's own chat template
with and without thinking, a 40,960-position context -- not to learn anything: its weights are
random, so its completions are noise and its rewards are 0. ``configs/cpu_rehearsal.yaml`` layers
it over a paper config.

What matches Qwen3 (``Qwen/Qwen3-4B``): the architecture class ``Qwen3ForCausalLM``, the vocabulary
size, the 26 added tokens at ids 151643-151668 with Qwen3's special flags, EOS ``<|im_end|>``, PAD
``<|endoftext|>``, no BOS, the chat template text, ``max_position_embeddings`` 40,960, RoPE θ 1e6,
head dim 128, tied embeddings, Qwen3's generation config. What does not: the byte-level BPE for
ordinary text is trained on a little synthetic text (ids 0 to ~1,000; the ids up to 151642 are
unreachable ``<|qwen3_shape_filler_N|>`` entries), and the backbone is tiny (``hidden_size`` 128,
2 layers, 4 query / 2 KV heads by default) so a training step takes seconds on two cores.

``testbed:qwen3-shape?like=qwen3-4b`` (or ``qwen3-8b``, ``qwen3-14b``, ``qwen3-32b``) builds the backbone at the real model's exact
shape (:data:`QWEN3_SHAPES`: width, depth, heads, KV heads, MLP width, tied or separate head), still
with random weights: what a GPU check needs to measure memory and speed without the hub. The single
options (``hidden_size``, ``num_layers``, ``num_heads``, ``num_kv_heads``, ``intermediate_size``,
``tie_embeddings``) override it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from egrsd_pl.json_files import write_json
from egrsd_pl.prompts import DEFAULT_INSTRUCTION, DEFAULT_TRANSITION, REFERENCE_BEGIN, REFERENCE_END
from egrsd_pl.testbed.build import exclusive_lock, testbed_options
from egrsd_pl.testbed.qwen3_template import (
    QWEN3_ADDED_TOKENS,
    QWEN3_ADDITIONAL_SPECIAL_TOKENS,
    QWEN3_CHAT_TEMPLATE,
    QWEN3_FIRST_ADDED_ID,
    QWEN3_VOCAB_SIZE,
)
from egrsd_pl.testbed.synthetic import synthetic_problems

QWEN3_SHAPE_VERSION = 1  # bump when the tokenizer, the model or its shapes change: it keys the cache
MAX_POSITION_EMBEDDINGS = 40_960  # Qwen3-4B / Qwen3-8B
DEFAULT_HIDDEN_SIZE = 128
DEFAULT_NUM_LAYERS = 2
# The real models' backbones (config.json of Qwen/Qwen3-4B, -8B, -14B and -32B; head dim 128 in all).
QWEN3_SHAPES: dict[str, dict[str, int]] = {
    "qwen3-4b": dict(
        hidden_size=2560,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=9728,
        tie_embeddings=1,
    ),
    "qwen3-8b": dict(
        hidden_size=4096,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=12288,
        tie_embeddings=0,
    ),
    "qwen3-14b": dict(
        hidden_size=5120,
        num_layers=40,
        num_heads=40,
        num_kv_heads=8,
        intermediate_size=17408,
        tie_embeddings=0,
    ),
    "qwen3-32b": dict(
        hidden_size=5120,
        num_layers=64,
        num_heads=64,
        num_kv_heads=8,
        intermediate_size=25600,
        tie_embeddings=0,
    ),
}
HEAD_DIM = 128
_ORDINARY_VOCAB = 1024  # BPE tokens trained on real text; the rest up to 151643 are fillers
_FILLER = "<|qwen3_shape_filler_{}|>"
_MARKER = "qwen3_shape.json"
# Qwen2/Qwen3's pre-tokenisation pattern: words, single digits, punctuation runs, newlines, spaces.
_QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen3_shape_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE whose added tokens sit at Qwen3's ids, with Qwen3's chat template.

    Deterministic: the BPE is trained on fixed synthetic text, then padded with unreachable filler
    entries to exactly 151,643 tokens so that ``<|endoftext|>`` gets id 151643 and the other 25
    added tokens follow in Qwen3's order.
    """
    texts = [
        DEFAULT_INSTRUCTION,
        DEFAULT_TRANSITION,
        REFERENCE_BEGIN,
        REFERENCE_END,
        "system\nuser\nassistant\n",
    ]
    for problem in synthetic_problems(500, seed=0, split="train"):
        texts += [problem.problem, problem.solution]
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = _pre_tokenizer()
    trained.train_from_iterator(
        texts,
        trainer=trainers.BpeTrainer(
            vocab_size=_ORDINARY_VOCAB,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            min_frequency=2,
            show_progress=False,
        ),
    )
    trained_model = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = dict(trained_model["vocab"])
    for filler_id in range(len(vocab), QWEN3_FIRST_ADDED_ID):
        vocab[_FILLER.format(filler_id)] = filler_id
    merges = [
        tuple(merge) if isinstance(merge, list) else tuple(merge.split(" "))
        for merge in trained_model["merges"]
    ]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(
        [AddedToken(text, special=special, normalized=False) for text, special in QWEN3_ADDED_TOKENS]
    )
    # Constructor arguments, not attributes set afterwards: only these are saved.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN3_ADDITIONAL_SPECIAL_TOKENS,
        padding_side="right",
        model_max_length=MAX_POSITION_EMBEDDINGS,
        clean_up_tokenization_spaces=False,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )


def qwen3_shape_config(
    *,
    hidden_size: int = DEFAULT_HIDDEN_SIZE,
    num_layers: int = DEFAULT_NUM_LAYERS,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 0,
    tie_embeddings: bool = True,
) -> Qwen3Config:
    """Qwen3's configuration with the given backbone (attention heads of width 128, as in Qwen3).

    Args:
        hidden_size: Model width (Qwen3-4B: 2,560; 8B: 4,096).
        num_layers: Decoder layers (Qwen3-4B and 8B: 36).
        num_heads: Query heads (Qwen3-4B and 8B: 32).
        num_kv_heads: Key/value heads (Qwen3-4B and 8B: 8); must divide ``num_heads``.
        intermediate_size: MLP width (Qwen3-4B: 9,728; 8B: 12,288); 0 means ``3 * hidden_size``.
        tie_embeddings: Output head tied to the input embedding (Qwen3-4B: yes; 8B: no).
    """
    if min(hidden_size, num_layers, num_heads, num_kv_heads) < 1 or intermediate_size < 0:
        raise ValueError(
            f"testbed:qwen3-shape sizes must be >= 1 (intermediate_size >= 0), got hidden_size {hidden_size}, "
            f"num_layers {num_layers}, num_heads {num_heads}, num_kv_heads {num_kv_heads}, "
            f"intermediate_size {intermediate_size}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"testbed:qwen3-shape num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
    return Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=151643,
        eos_token_id=151645,
        dtype="bfloat16",
    )


def build_qwen3_shape(output_dir: str | os.PathLike[str], *, seed: int = 0, **shape: Any) -> Path:
    """Writes the tokenizer and a seeded random ``Qwen3ForCausalLM`` (bfloat16 on disk) to ``output_dir``.

    Args:
        output_dir: Folder to write.
        seed: Seed of the random weights.
        **shape: Keyword arguments of :func:`qwen3_shape_config`.

    Returns:
        ``output_dir`` with ``config.json``, ``model.safetensors``, ``generation_config.json``
        (Qwen3's: stop ids 151645 and 151643, T 0.6, top-p 0.95, top-k 20), the tokenizer files and
        ``qwen3_shape.json`` (version, seed, shapes, parameter count).
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen3_shape_tokenizer()
    config = qwen3_shape_config(**shape)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model = model.bfloat16()  # Qwen3 ships bfloat16 weights
    model.generation_config = GenerationConfig(
        bos_token_id=151643,
        eos_token_id=[151645, 151643],
        pad_token_id=151643,
        do_sample=True,
        temperature=0.6,
        top_p=0.95,
        top_k=20,
    )
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    report = {
        "version": QWEN3_SHAPE_VERSION,
        "seed": seed,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "tie_embeddings": config.tie_word_embeddings,
        "vocab_size": QWEN3_VOCAB_SIZE,
        "tokenizer_length": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights": "random (for code paths and shapes, not for learning)",
    }
    write_json(output / _MARKER, report)
    return output


def cached_qwen3_shape_dir(
    cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0, **shape: Any
) -> Path:
    """``{cache}/qwen3-shape-v{version}-h{hidden}-l{layers}[-a{heads}-kv{kv}-i{mlp}-untied]-seed{seed}``
    (cache: ``$EGRSD_PL_CACHE`` or ``~/.cache/egrsd_pl``); the bracketed parts only where they differ
    from the defaults, so the default builds keep their folders."""
    config = qwen3_shape_config(**shape)
    root = Path(cache_dir or os.environ.get("EGRSD_PL_CACHE") or Path.home() / ".cache" / "egrsd_pl")
    name = f"qwen3-shape-v{QWEN3_SHAPE_VERSION}-h{config.hidden_size}-l{config.num_hidden_layers}"
    if (config.num_attention_heads, config.num_key_value_heads) != (4, 2):
        name += f"-a{config.num_attention_heads}-kv{config.num_key_value_heads}"
    if config.intermediate_size != 3 * config.hidden_size:
        name += f"-i{config.intermediate_size}"
    if not config.tie_word_embeddings:
        name += "-untied"
    return root / f"{name}-seed{seed}"


def ensure_qwen3_shape(
    cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0, **shape: Any
) -> Path:
    """The cached folder, built on first use (~10 s; minutes at a real model's shape) into a temporary
    sibling and renamed into place under a file lock, so concurrent callers build once and an
    interrupted build leaves no cache."""
    target = cached_qwen3_shape_dir(cache_dir, seed=seed, **shape)
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.with_name(target.name + ".lock")):
        if (target / _MARKER).is_file():
            return target
        if target.exists():
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build_qwen3_shape(staging, seed=seed, **shape)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def qwen3_shape_options(query: str) -> dict[str, Any]:
    """The options of ``testbed:qwen3-shape?...``: ``like=qwen3-4b|qwen3-8b|qwen3-14b|qwen3-32b`` sets every size, the single
    options override it; returns ``seed`` and the keyword arguments of :func:`qwen3_shape_config`."""
    defaults: dict[str, Any] = {
        "like": "",
        "seed": 0,
        "hidden_size": 0,
        "num_layers": 0,
        "num_heads": 0,
        "num_kv_heads": 0,
        "intermediate_size": -1,
        "tie_embeddings": -1,
    }
    options = testbed_options("qwen3-shape", query, defaults)
    like = options.pop("like")
    if like and like not in QWEN3_SHAPES:
        raise ValueError(f"testbed:qwen3-shape like={like!r}: use one of {', '.join(QWEN3_SHAPES)}")
    base: dict[str, int] = dict(
        QWEN3_SHAPES[like]
        if like
        else dict(
            hidden_size=DEFAULT_HIDDEN_SIZE,
            num_layers=DEFAULT_NUM_LAYERS,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=0,
            tie_embeddings=1,
        )
    )
    unset = {"hidden_size": 0, "num_layers": 0, "num_heads": 0, "num_kv_heads": 0}
    for key, value in options.items():
        if key != "seed" and value != unset.get(key, -1):
            base[key] = value
    shape: dict[str, Any] = {**base, "tie_embeddings": bool(base["tie_embeddings"])}
    return {"seed": options["seed"], **shape}


def resolve_qwen3_shape(query: str) -> Path:
    """``testbed:qwen3-shape[?like=qwen3-4b&hidden_size=1024&num_layers=2&seed=0]`` (after ``?``) -> cached folder."""
    return ensure_qwen3_shape(**qwen3_shape_options(query))


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )

"""Loading the backbone the student and teacher share, and checking that its head is a plain projection.

The vocabulary math of :mod:`egrsd_pl.losses.vocabulary` computes ``logits = hidden · Wᵀ`` from the final
hidden states and ``lm_head.weight``, in chunks, instead of calling the model's head. A model whose head
does more than that (scales, soft-caps or biases its logits) would silently get wrong log-probs,
entropies and losses, so :func:`check_plain_head` refuses it before training, naming the config key.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Config keys that change the logits after ``hidden · Wᵀ``, with the value that leaves them unchanged.
LOGIT_TRANSFORM_KEYS: dict[str, float | None] = {
    "logit_scale": 1.0,  # Cohere: logits * logit_scale
    "logits_scaling": 1.0,  # Granite: logits / logits_scaling
    "final_logit_softcapping": None,  # Gemma 2/3: cap * tanh(logits / cap)
    "output_multiplier_scale": 1.0,  # tied-embedding output multipliers
    "lm_head_multiplier": 1.0,  # Falcon-H1
    "mup_width_multiplier": 1.0,  # muP-style heads: logits / width multiplier
}


class ModelPathError(ValueError):
    """``--model.model_name_or_path`` is neither a local folder, a testbed name nor a hub id."""


class UnsupportedHeadError(ValueError):
    """The model's output head is not ``logits = hidden · Wᵀ``."""


def resolve_model_path(name: str) -> str:
    """The local folder of ``--model.model_name_or_path`` ``name``: a folder as it is, ``testbed:...``
    (built on first use) or a hub id's snapshot folder (:func:`hub_snapshot`); anything else is an error.

    Every consumer of the base weights (the student, vLLM, evaluation, the checkpoint's record) reads
    this one folder, so a hub id is resolved, and downloaded if needed, once per process.
    """
    if name.startswith("testbed:"):
        from egrsd_pl.testbed import resolve_model_path as resolve_testbed

        return resolve_testbed(name)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelPathError(f"--model.model_name_or_path {name!r}: folder has no config.json")
        return str(path)
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return hub_snapshot(name)
    raise ModelPathError(
        f"--model.model_name_or_path {name!r}: no such folder, and not a hub id like 'Qwen/Qwen3-4B' "
        "or 'testbed:tiny'"
    )


def hub_snapshot(name: str) -> str:
    """The local snapshot folder of hub id ``name`` in the user's Hugging Face cache, downloaded if missing.

    Uses ``huggingface_hub.snapshot_download`` with the cache it is configured with (``HF_HOME`` /
    ``HF_HUB_CACHE``). With ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) only the cache is read.
    A hub, network or cache failure becomes one :class:`ModelPathError` line (:func:`model_load_error`).
    """
    from huggingface_hub import constants, snapshot_download

    offline = constants.HF_HUB_OFFLINE or any(
        os.environ.get(variable, "").upper() in ("1", "ON", "YES", "TRUE")
        for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    try:
        return str(snapshot_download(name, local_files_only=offline))
    except OSError as error:  # offline and not cached, unknown or gated repository, no network
        raise ModelPathError(model_load_error(name, name, error)) from error


def load_backbone(
    name: str,
    path: str,
    *,
    dtype: Any,
    attn_implementation: str,
    trust_remote_code: bool,
    empty: bool = False,
) -> tuple[Any, Any]:
    """``(tokenizer, model)`` from ``path`` (resolved from ``--model.model_name_or_path`` ``name``).

    With ``empty`` the model is built from its config on the ``meta`` device (no weight is read; its
    generation config is still read from ``path``): the ranks that receive the weights from rank 0 under
    ``--fsdp2.load_from_rank0`` (:func:`egrsd_pl.sharding.load_from_rank0`).

    A hub or file error becomes one :class:`ModelPathError` line naming the flag; a head that is not a
    plain projection raises :class:`UnsupportedHeadError`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if empty:
            model = _empty_model(
                path,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
    except OSError as error:  # hub unreachable, unknown repo, missing files
        raise ModelPathError(model_load_error(name, path, error)) from error
    check_plain_head(model, name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def _empty_model(path: str, *, dtype: Any, attn_implementation: str, trust_remote_code: bool) -> Any:
    """The model of ``path``'s config on the ``meta`` device, as ``from_pretrained`` would build it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if dtype == "auto":  # from_pretrained's "auto": the dtype the config records
        dtype = getattr(config, "dtype", None) or torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
    if Path(path, "generation_config.json").is_file():  # the stop ids come from it
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def model_load_error(name: str, path: str, error: OSError) -> str:
    """One line for ``--model.model_name_or_path name`` (resolved to ``path``) failing with ``error``.

    When the hub cannot be reached (no network, ``HF_HUB_OFFLINE=1``) and the model is not cached,
    transformers says "couldn't connect"; the line then says the run is offline and how to use a
    local folder instead.
    """
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    lowered = text.lower()
    offline = any(
        phrase in lowered
        for phrase in (
            "couldn't connect",
            "offline mode",
            "outgoing traffic has been disabled",  # huggingface_hub: HF_HUB_OFFLINE and not cached
            "check your internet connection",  # huggingface_hub: no network and not cached
        )
    )
    if Path(path).exists() or not offline:
        return f"--model.model_name_or_path {name!r}: {first_line}"
    return (
        f"--model.model_name_or_path {name!r}: the Hugging Face hub is unreachable (offline) and the model "
        f"is not in the local cache. Download it where there is network (hf download {name} --local-dir DIR), "
        "bring DIR here and pass --model.model_name_or_path DIR; or run the offline demo model testbed:tiny"
    )


def check_plain_head(model: Any, name: str) -> None:
    """Raises :class:`UnsupportedHeadError` unless the logits are exactly ``hidden · lm_head.weightᵀ``.

    Checks the config (and its ``text_config``, for multimodal wrappers) for the keys of
    :data:`LOGIT_TRANSFORM_KEYS` set to anything but their neutral value, and the head for a bias.
    """
    configs = [model.config, getattr(model.config, "text_config", None)]
    for config in (c for c in configs if c is not None):
        for key, neutral in LOGIT_TRANSFORM_KEYS.items():
            value = getattr(config, key, None)
            if value is None or (neutral is not None and _is_number(value) and math.isclose(value, neutral)):
                continue
            raise UnsupportedHeadError(
                f"--model.model_name_or_path {name!r}: config key {key!r} = {value!r} transforms the logits "
                "after hidden · Wᵀ, which the chunked vocabulary math does not reproduce (the losses would be "
                "silently wrong); this model is not supported"
            )
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise UnsupportedHeadError(
            f"--model.model_name_or_path {name!r}: the output head has a bias, which the chunked vocabulary "
            "math (logits = hidden · Wᵀ) does not add; this model is not supported"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)

"""The student's policy as plain weights: every LoRA layer merged out of place, for vLLM's ``load_weights``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from egrsd_pl.sharding import full_tensor

POLICY_ADAPTER = "default"


def merged_weights(model: Any, adapter: str = POLICY_ADAPTER) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's weights with ``adapter`` merged in, under the plain HF names.

    Each LoRA-wrapped linear yields ``W + scaling * B @ A`` as a new tensor; the module itself is
    left untouched (an in-place ``merge_adapter``/``unmerge_adapter`` round trip would leave
    rounding error in the frozen base, which is also the teacher). Other parameters and
    persistent buffers are yielded as they are. Lazy: one tensor at a time.

    Under ``--trainer.strategy fsdp2`` the parameters are shards: each one is gathered
    (:func:`egrsd_pl.sharding.full_tensor`, in its stored dtype) right before the tensor it enters is
    yielded, so at most one layer's weight and LoRA factors are whole at a time, never the model; every
    rank must consume the whole iterator, in order (each gather is a collective).

    Args:
        model: A PEFT ``PeftModel`` whose LoRA layers hold ``adapter``.
        adapter: Name of the adapter to merge.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    lora_prefixes = []
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            if module.use_dora.get(adapter, False):
                raise ValueError(f"DoRA adapters cannot be merged for vLLM (layer {name})")
            lora_prefixes.append(name + ".")
            weight = full_tensor(module.base_layer.weight.detach())  # type: ignore[operator]
            yield name + ".weight", weight + delta_weight(module, adapter).to(weight.dtype)
            if module.base_layer.bias is not None:
                yield name + ".bias", full_tensor(module.base_layer.bias.detach())  # type: ignore[operator]
    for name, tensor in base.state_dict().items():
        if any(name.startswith(prefix) for prefix in lora_prefixes):
            continue
        yield name, full_tensor(tensor.detach())


def delta_weight(module: Any, adapter: str) -> torch.Tensor:
    """``scaling · B @ A`` of a LoRA linear (PEFT's ``lora.Linear.get_delta_weight``), from full factors.

    PEFT's own method multiplies the module's parameters as they are, which under FSDP2 are shards;
    here they are gathered first. The arithmetic is PEFT's (float32 for half factors on CPU, the
    ``fan_in_fan_out`` transpose, the adapter's ``scaling``), so the result is the same bits.
    """
    factor_a = full_tensor(module.lora_A[adapter].weight.detach())  # [r, in]
    factor_b = full_tensor(module.lora_B[adapter].weight.detach())  # [out, r]
    dtype = factor_b.dtype
    upcast = factor_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if upcast:
        factor_a, factor_b = factor_a.float(), factor_b.float()
    delta = factor_b @ factor_a  # [out, in]
    if module.fan_in_fan_out:
        delta = delta.T
    delta = delta * module.scaling[adapter]
    return delta.to(dtype) if upcast else delta

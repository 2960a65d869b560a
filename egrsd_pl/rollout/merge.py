"""The student's policy as plain weights: every LoRA layer merged out of place, for vLLM's ``load_weights``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

POLICY_ADAPTER = "default"


def merged_weights(model: Any, adapter: str = POLICY_ADAPTER) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's weights with ``adapter`` merged in, under the plain HF names.

    Each LoRA-wrapped linear yields ``W + scaling * B @ A`` as a new tensor; the module itself is
    left untouched (an in-place ``merge_adapter``/``unmerge_adapter`` round trip would leave
    rounding error in the frozen base, which is also the teacher). Other parameters and
    persistent buffers are yielded as they are. Lazy: one tensor at a time.

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
            weight = module.base_layer.weight.detach()  # type: ignore[operator]
            yield name + ".weight", weight + module.get_delta_weight(adapter).to(weight.dtype)  # type: ignore[attr-defined]
            if module.base_layer.bias is not None:
                yield name + ".bias", module.base_layer.bias.detach()  # type: ignore[operator]
    for name, tensor in base.state_dict().items():
        if any(name.startswith(prefix) for prefix in lora_prefixes):
            continue
        yield name, tensor.detach()

"""Generation engines behind one interface: :class:`HFGenerateEngine`, :class:`VLLMEngine` (colocated) and
:class:`VLLMServerEngine` (vLLM servers on GPUs of their own).

The engines are resolved lazily, so importing this package (or :mod:`egrsd_pl.rollout.base`) imports
neither vLLM nor transformers.
"""

import importlib
from typing import Any

from egrsd_pl.rollout.base import Rollout, RolloutEngine, SamplingConfig

__all__ = [
    "HFGenerateEngine",
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "ServedRollout",
    "VLLMEngine",
    "VLLMServerEngine",
]

_LAZY = {
    "HFGenerateEngine": "egrsd_pl.rollout.hf",
    "ServedRollout": "egrsd_pl.rollout.server",
    "VLLMEngine": "egrsd_pl.rollout.vllm",
    "VLLMServerEngine": "egrsd_pl.rollout.server",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

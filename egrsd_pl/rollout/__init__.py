"""Generation engines behind one interface: :class:`HFGenerateEngine`, :class:`VLLMEngine` (colocated) and
:class:`VLLMServerEngine` (vLLM servers on GPUs of their own).

``VLLMEngine`` is resolved lazily, so importing this package never imports vLLM.
"""

from typing import Any

from egrsd_pl.rollout.base import Rollout, RolloutEngine, SamplingConfig
from egrsd_pl.rollout.hf import HFGenerateEngine
from egrsd_pl.rollout.server import ServedRollout, VLLMServerEngine

__all__ = [
    "HFGenerateEngine",
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "ServedRollout",
    "VLLMEngine",
    "VLLMServerEngine",
]


def __getattr__(name: str) -> Any:
    if name == "VLLMEngine":
        from egrsd_pl.rollout.vllm import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

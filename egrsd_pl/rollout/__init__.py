"""Generation engines behind one interface: :class:`HFGenerateEngine` and :class:`VLLMEngine`."""

from egrsd_pl.rollout.base import Rollout, RolloutEngine, SamplingConfig
from egrsd_pl.rollout.hf import HFGenerateEngine

__all__ = ["HFGenerateEngine", "Rollout", "RolloutEngine", "SamplingConfig"]

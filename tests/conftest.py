"""Shared fixtures: the offline tiny testbed, and skipping of ``gpu`` / ``vllm`` tests without them."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

# Seconds of warm start for the session's tiny model: enough for well-formed completions to
# start appearing, small enough to keep the suite fast. Accuracy is not measured (eval skipped).
TINY_BUDGET_S = 20.0


@functools.cache
def vllm_importable() -> bool:
    """True when ``import vllm`` works here (checked once per session)."""
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_vllm = pytest.mark.skip(reason="needs vLLM (import vllm failed)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "vllm" in item.keywords and not vllm_importable():
            item.add_marker(skip_vllm)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF folder with the testbed tokenizer and a tiny Qwen3 warm-started for ``TINY_BUDGET_S``."""
    from egrsd_pl.testbed import build_testbed

    output = tmp_path_factory.mktemp("testbed")
    return build_testbed(output, budget_s=TINY_BUDGET_S, seed=0, progress=False, eval_problems=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    """The testbed tokenizer, loaded from ``tiny_model_dir`` with ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)

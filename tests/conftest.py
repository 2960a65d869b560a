"""Shared fixtures: the offline tiny testbed, and skipping of ``gpu`` / ``vllm`` tests without them."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch


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
    """A copy of the testbed shipped in the package (what ``testbed:tiny`` is): deterministic weights.

    Copied so that no test can change the package's files (about 2 MB).
    """
    from egrsd_pl.testbed import packaged_testbed_dir

    packaged = packaged_testbed_dir()
    assert packaged is not None, "the package ships no testbed: run python -m egrsd_pl.testbed build"
    return Path(shutil.copytree(packaged, tmp_path_factory.mktemp("testbed") / "tiny"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    """The testbed tokenizer, loaded from ``tiny_model_dir`` with ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)

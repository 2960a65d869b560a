"""A hub id resolves once, to the snapshot folder in the user's Hugging Face cache, used by every consumer.

The cache is a hub-layout copy of the shipped testbed (``models--testbed-org--tiny/snapshots/<hash>/``
with ``refs/main``) in a temporary ``HF_HOME``, read with ``HF_HUB_OFFLINE=1``: no network is needed.
``huggingface_hub`` reads ``HF_HOME`` and ``HF_HUB_OFFLINE`` when it is imported, so in this process
the test also points its constants at the temporary cache; the subprocess runs see only the environment,
as a user's run does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from egrsd_pl.backbone import ModelPathError, resolve_model_path

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(hf_home: Path, model_dir: Path) -> Path:
    """``hf_home/hub`` holding ``testbed-org/tiny`` at ``COMMIT`` as ``snapshot_download`` leaves it; the snapshot."""
    repo = hf_home / "hub" / "models--testbed-org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    snapshot = hub_cache(tmp_path / "hf", tiny_model_dir)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # read at import
    return snapshot


def test_a_cached_hub_id_resolves_to_its_snapshot_folder_offline(offline_cache: Path) -> None:
    folder = resolve_model_path("testbed-org/tiny")
    assert Path(folder) == offline_cache.resolve()
    assert (Path(folder) / "config.json").is_file()


def test_an_uncached_hub_id_offline_is_one_line_naming_the_way_out(offline_cache: Path) -> None:
    with pytest.raises(ModelPathError) as error:
        resolve_model_path("testbed-org/absent")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "--model.model_name_or_path 'testbed-org/absent': the Hugging Face hub is unreachable"
    )
    assert "hf download testbed-org/absent --local-dir DIR" in message


@pytest.mark.vllm
@pytest.mark.slow
def test_fit_with_vllm_on_a_hub_id_uses_the_snapshot_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``configs/tiny_vllm.yaml`` with ``--model.model_name_or_path testbed-org/tiny``: 2 optimizer steps,
    vLLM started on the snapshot folder, and the checkpoint records that folder."""
    snapshot = hub_cache(tmp_path / "hf", tiny_model_dir)
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        str(REPO / "main.py"),
        "fit",
        "--config",
        str(REPO / "configs" / "tiny_vllm.yaml"),
        "--model.model_name_or_path=testbed-org/tiny",
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--data.batch_size=4",
        "--data.max_new_tokens=16",
        "--data.engine.init_args.enforce_eager=true",
        "--evaluation.every_n_steps=0",
        "--evaluation.at_end=false",
        "--checkpoint.every_n_train_steps=2",
        f"--checkpoint.dirpath={tmp_path / 'checkpoints'}",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert Path(checkpoint["base_model_path"]) == snapshot.resolve()
    assert checkpoint["hyper_parameters"]["model_name_or_path"] == "testbed-org/tiny"

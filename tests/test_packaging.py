"""What ``pip install .`` puts into site-packages: the ``egrsd_pl`` namespace and nothing else."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def configured_packages() -> tuple[list[str], dict[str, str]]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return setuptools["packages"], setuptools["package-dir"]


def test_every_package_folder_is_configured():
    packages, package_dir = configured_packages()
    folders = {"egrsd_pl": ROOT / "egrsd_pl", **{name: ROOT / path for name, path in package_dir.items()}}
    expected = set(package_dir)
    for init in (ROOT / "egrsd_pl").rglob("__init__.py"):
        expected.add(".".join(init.parent.relative_to(ROOT).parts))
    expected.update(  # folders of package data (the shipped testbed) are packages too
        ".".join(folder.relative_to(ROOT).parts)
        for folder in (ROOT / "egrsd_pl" / "testbed").iterdir()
        if folder.is_dir() and not (folder / "__init__.py").exists() and folder.name != "__pycache__"
    )
    assert set(packages) == expected
    assert all(folder.is_dir() for folder in folders.values())


@pytest.mark.slow
def test_the_wheel_installs_egrsd_pl_only(tmp_path: Path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    assert "Warning" not in build.stderr  # e.g. setuptools' deprecated license table, unlisted packages
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {
        "egrsd_pl"
    }
    assert "egrsd_pl/callbacks/checkpoint.py" in names and "egrsd_pl/cli.py" in names
    assert "egrsd_pl/testbed/tiny/model.safetensors" in names
    top_level = next(name for name in names if name.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["egrsd_pl"]
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "egrsd = egrsd_pl.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

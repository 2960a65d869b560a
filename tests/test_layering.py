"""Dependencies point one way: ``egrsd_pl.cli`` -> ``egrsd_pl.callbacks`` -> the rest of ``egrsd_pl``, never back.

The repository keeps the callbacks in the top-level ``callbacks/`` folder; they are installed as
``egrsd_pl.callbacks`` (``pyproject.toml``'s ``package-dir``).

Every ``import`` statement is read from the source (those inside functions too), so a lazy import that
dodges a cycle at run time still fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


LAYERS = ("egrsd_pl.cli", "egrsd_pl.callbacks")


def layer(module: str) -> str:
    """``egrsd_pl.cli``, ``egrsd_pl.callbacks`` or the module's top-level name (``egrsd_pl`` for the rest)."""
    return next(
        (name for name in LAYERS if module == name or module.startswith(name + ".")), module.split(".")[0]
    )


def imported_modules(path: Path) -> set[str]:
    """Layers (:func:`layer`) of every module ``path`` imports, wherever the statement sits."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(layer(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(layer(node.module))
    return names


def test_imported_modules_sees_lazy_imports(tmp_path: Path):
    source = tmp_path / "m.py"
    source.write_text(
        "import os.path\n\ndef f():\n    from egrsd_pl.callbacks.checkpoint import x\n    from . import y\n"
    )
    assert imported_modules(source) == {"os", "egrsd_pl.callbacks"}


def package_files(folder: str, *, skip: str | None = None) -> list[Path]:
    return [path for path in sorted((ROOT / folder).rglob("*.py")) if skip is None or path.name != skip]


@pytest.mark.parametrize(
    ("files", "forbidden"),
    [
        (package_files("egrsd_pl", skip="cli.py"), {"egrsd_pl.callbacks", "egrsd_pl.cli"}),
        (package_files("callbacks"), {"egrsd_pl.cli"}),
    ],
    ids=["egrsd_pl", "callbacks"],
)
def test_no_import_points_back_up(files: list[Path], forbidden: set[str]):
    assert files
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & forbidden)
        for path in files
        if imported_modules(path) & forbidden
    }
    assert offenders == {}

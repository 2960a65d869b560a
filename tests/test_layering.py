"""Dependencies point one way: ``egrsd_cli`` -> ``callbacks`` -> ``egrsd_pl``, never back.

Every ``import`` statement is read from the source (those inside functions too), so a lazy import that
dodges a cycle at run time still fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, wherever the statement sits."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imported_modules_sees_lazy_imports(tmp_path: Path):
    source = tmp_path / "m.py"
    source.write_text(
        "import os.path\n\ndef f():\n    from callbacks.checkpoint import x\n    from . import y\n"
    )
    assert imported_modules(source) == {"os", "callbacks"}


@pytest.mark.parametrize(
    ("package", "forbidden"), [("egrsd_pl", {"callbacks", "egrsd_cli"}), ("callbacks", {"egrsd_cli"})]
)
def test_no_import_points_back_up(package: str, forbidden: set[str]):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & forbidden)
        for path in sorted((ROOT / package).rglob("*.py"))
        if imported_modules(path) & forbidden
    }
    assert offenders == {}

"""Every JSON file the package writes is strict JSON: an undefined number is ``null``, never ``NaN``.

Python's :mod:`json` writes ``NaN`` / ``Infinity`` by default, which ``JSON.parse`` (browsers, ``jq``)
rejects. :func:`dumps` maps every non-finite float, at any depth, to ``None`` and then serialises with
``allow_nan=False``, so a value that slipped past the mapping fails loudly instead of writing a file that
only Python can read. Readers of these files take ``null`` where a number was undefined (e.g. the
pivot/fork selectivity without fork tokens, Eff without completion tokens).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (dicts, lists and tuples are walked;
    tuples become lists, as :mod:`json` writes them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    return value


def dumps(value: Any, *, indent: int | None = None, ensure_ascii: bool = True) -> str:
    """Strict JSON text of ``value``; ``ValueError`` if a non-finite number remains (it cannot: see above).

    Args:
        value: Dicts, lists, tuples, strings, numbers, booleans and ``None``.
        indent: As :func:`json.dumps` (``None``: one line, for ``.jsonl`` rows).
        ensure_ascii: ``False`` keeps non-ASCII text as is (token text in ``.jsonl`` rows).
    """
    return json.dumps(finite_or_none(value), indent=indent, ensure_ascii=ensure_ascii, allow_nan=False)


def write_json(path: str | Path, value: Any) -> Path:
    """Writes ``value`` to ``path`` as strict JSON indented by 2 with a final newline; returns the path."""
    path = Path(path)
    path.write_text(dumps(value, indent=2) + "\n", encoding="utf-8")
    return path

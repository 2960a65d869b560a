"""Methods files of ``egrsd compare``: a method is a name plus configuration overrides of ``main.py fit``.

A methods file is YAML with one mapping, ``methods``, from a method's name to its overrides, written as
the dotted keys of the command line (``model.gamma: 0.3`` is ``--model.gamma 0.3``)::

    # egrsd compare --config configs/tiny.yaml --methods configs/compare/paper.yaml --seeds 0 1 2
    methods:
      no_train: {fit: false, label: no-train}
      egrsd: {label: EGRSD, model.objective: egrsd, model.gamma: 0.3}

Two keys are not overrides: ``label`` (the name in the tables and the figure; default: the method's
name) and ``fit`` (``false``: evaluate the base model without training). Every method is checked with
the real command-line parser before anything runs, so an unknown key or an unknown objective fails at
once with one line naming the file, the method and the key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ParseCheck = Callable[[list[str]], "str | None"]
"""``parse_error(args)``: ``None`` when ``args`` parse as ``main.py fit`` arguments, else one line saying why."""

RESERVED_KEYS = ("label", "fit")
"""Keys of a method that are not command-line overrides."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class MethodsError(ValueError):
    """A methods file that cannot be used; the message names the file, the method and the key."""


@dataclass(frozen=True)
class Method:
    """One compared method.

    Attributes:
        name: Folder-safe name (``runs/<name>/seed_<s>``).
        label: Name shown in the tables and the figure.
        fit: Train before evaluating; ``False`` evaluates the base model (the no-train baseline).
        overrides: Dotted command-line keys and their values, in file order.
    """

    name: str
    label: str
    fit: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)

    def args(self) -> list[str]:
        """The overrides as command-line arguments: ``["--model.gamma", "0.3", ...]``."""
        return override_args(self.overrides)


def override_args(overrides: dict[str, Any]) -> list[str]:
    """Dotted keys and YAML values as ``--key value`` pairs; lists and mappings are written as JSON,
    booleans as ``true``/``false``, ``None`` as ``null`` (what jsonargparse reads back)."""
    args: list[str] = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif value is None:
            text = "null"
        elif isinstance(value, (list, dict)):
            text = json.dumps(value)
        else:
            text = str(value)
        args += [f"--{key}", text]
    return args


def read_methods(path: str | Path) -> list[Method]:
    """Reads a methods file (shape only; :func:`check_methods` validates the overrides).

    Raises:
        MethodsError: Missing file, no ``methods`` mapping, a bad name, a non-mapping method, a ``fit``
            that is not a boolean, or a ``label`` used twice.
    """
    path = Path(path)
    if not path.is_file():
        raise MethodsError(f"--methods {path}: no such file")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("methods"), dict) or not data["methods"]:
        raise MethodsError(f"{path}: expected a non-empty mapping `methods: {{name: {{key: value}}}}`")
    unknown = sorted(set(data) - {"methods"})
    if unknown:
        raise MethodsError(f"{path}: unknown top-level key {unknown[0]!r} (only `methods`)")
    methods = []
    for name, spec in data["methods"].items():
        where = f"{path}: method {name!r}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise MethodsError(f"{where}: a name is letters, digits, '_', '.', '-' (it names a folder)")
        spec = {} if spec is None else spec
        if not isinstance(spec, dict):
            raise MethodsError(f"{where}: expected a mapping of overrides, got {type(spec).__name__}")
        fit = spec.get("fit", True)
        if not isinstance(fit, bool):
            raise MethodsError(f"{where}: key 'fit' must be true or false, got {fit!r}")
        overrides = {str(k): v for k, v in spec.items() if k not in RESERVED_KEYS}
        for key in overrides:
            if key.startswith("-") or key in {"config", "ckpt_path", "seed_everything"}:
                raise MethodsError(f"{where}: key {key!r} is set by egrsd compare, not by a method")
        methods.append(Method(name, str(spec.get("label", name)), fit, overrides))
    labels = [m.label for m in methods]
    for label in labels:
        if labels.count(label) > 1:
            raise MethodsError(f"{path}: label {label!r} is used by more than one method")
    return methods


def check_methods(
    path: str | Path, methods: Sequence[Method], base_args: Sequence[str], parse_error: ParseCheck
) -> None:
    """Parses every method's ``fit`` arguments with the real CLI parser (no model, no data).

    Args:
        path: The methods file (for the message).
        methods: Methods read from it.
        base_args: Arguments before the method's overrides (``--config BASE`` and the common overrides).
        parse_error: The CLI's parse check, given by the composition root (:func:`egrsd_pl.cli.parse_error`):
            ``None`` when the arguments parse as ``fit``'s, else the parser's message in one line.

    Raises:
        MethodsError: ``<file>: method <name>: key <key>: <parser's message>`` for the first bad key; a
            bad base (``base_args`` alone do not parse) names no method.
    """
    error = parse_error(list(base_args))
    if error is not None:
        raise MethodsError(f"{' '.join(base_args)}: {error}")
    for method in methods:
        if parse_error([*base_args, *method.args()]) is None:
            continue
        for key, value in method.overrides.items():  # name the first key that fails on its own
            error = parse_error([*base_args, *override_args({key: value})])
            if error is not None:
                raise MethodsError(f"{path}: method {method.name!r}: key {key!r}: {error}")
        error = parse_error([*base_args, *method.args()])
        raise MethodsError(f"{path}: method {method.name!r}: {error}")

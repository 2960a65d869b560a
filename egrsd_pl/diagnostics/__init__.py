"""Mechanism diagnostics of the paper's §5.5 (Fig. 3, 4a, 4b, A3–A5), on any checkpoint and live in training.

- :mod:`~egrsd_pl.diagnostics.mechanism`: the pure math (gates, lock/fork/pivot regimes, entropy deciles).
- :mod:`~egrsd_pl.diagnostics.report`: tables, figures and the token page.
- :mod:`~egrsd_pl.diagnostics.command`: ``egrsd diagnose`` (sample, score behind both prompts, report).
- :mod:`~egrsd_pl.diagnostics.options`: its options, resolved from the run's config.
"""

from __future__ import annotations

from typing import Any


def main(argv: list[str] | None = None, **options: Any) -> int:
    """``egrsd diagnose ...``; see :func:`egrsd_pl.diagnostics.command.main` (``options``: ``parse_run``)."""
    from egrsd_pl.diagnostics.command import main as run

    return run(argv, **options)

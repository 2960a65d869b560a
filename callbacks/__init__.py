"""Lightning callbacks, one per file."""

from callbacks.evaluation import PeriodicEvaluation

__all__ = ["PeriodicEvaluation"]

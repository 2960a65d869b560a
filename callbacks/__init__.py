"""Lightning callbacks, one per file."""

from egrsd_pl.callbacks.evaluation import PeriodicEvaluation

__all__ = ["PeriodicEvaluation"]

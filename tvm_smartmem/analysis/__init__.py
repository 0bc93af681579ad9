"""Analyses of Relax / TIR modules: statistics now; classification and the ECG later."""

from . import stats
from .stats import ModuleStats, collect

__all__ = ["ModuleStats", "collect", "stats"]

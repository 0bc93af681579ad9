"""Analyses of Relax / TIR modules: statistics (`stats`), DNNFusion's operator classes and
SmartMem's quadrants (`classify`), and the extended computational graph (`ecg`)."""

from . import stats
from .stats import ModuleStats, collect

__all__ = ["ModuleStats", "collect", "stats"]

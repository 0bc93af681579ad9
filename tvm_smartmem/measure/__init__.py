"""Runners: one timing protocol for every device.

Protocol: load the module on the device, upload inputs and weights once, run ``warmup`` calls,
then ``repeat`` measurements of ``number`` back-to-back calls each (TVM's ``time_evaluator``, so
device synchronisation is the runtime's, not Python's).  Reported: median, min, max, mean and
std over the repeats, in milliseconds per call.
"""

from .runner import LocalRunner, RunResult, load_runnable

__all__ = ["LocalRunner", "RunResult", "load_runnable"]

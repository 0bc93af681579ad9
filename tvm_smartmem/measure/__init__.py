"""Runners: one timing protocol for every device.

Protocol: load the module on the device, upload inputs and weights once, run ``warmup`` calls,
then ``repeat`` measurements of ``number`` back-to-back calls each (TVM's ``time_evaluator``:
the device is synchronised before and after each measurement by the runtime, not by Python).
Reported: median, min, max, mean and std over the repeats, in milliseconds per call, plus an
optional per-kernel profile (one extra run with the device synchronised around every kernel).
"""

from .runner import (
    KernelTime,
    LocalRunner,
    RPCRunner,
    RunResult,
    get_device,
    load_runnable,
    prepare_weights,
)

__all__ = ["KernelTime", "LocalRunner", "RPCRunner", "RunResult", "get_device", "load_runnable",
           "prepare_weights"]

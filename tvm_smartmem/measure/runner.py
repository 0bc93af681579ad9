"""Local runner and the result record every runner returns."""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from ..errors import DeviceNotFoundError, SmartMemError

DEVICE_KINDS = ("cpu", "cuda", "opencl")


@dataclasses.dataclass
class RunResult:
    """Timings of one module on one device (milliseconds per call)."""

    device: str
    repeat: int
    number: int
    warmup: int
    median_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    std_ms: float
    samples_ms: list[float]
    host: str = dataclasses.field(default_factory=platform.node)

    def summary(self) -> str:
        return (
            f"{self.device}: median {self.median_ms:.4f} ms, min {self.min_ms:.4f} ms, "
            f"max {self.max_ms:.4f} ms  ({self.repeat} x {self.number} runs, "
            f"{self.warmup} warm-up)"
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_samples(
        cls, device: str, samples_s: Sequence[float], number: int, warmup: int
    ) -> RunResult:
        ms = [float(s) * 1e3 for s in samples_s]
        return cls(
            device=device, repeat=len(ms), number=number, warmup=warmup,
            median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms),
            mean_ms=statistics.fmean(ms), std_ms=statistics.pstdev(ms), samples_ms=ms,
        )


def get_device(kind: str, index: int = 0) -> tvm.runtime.Device:
    """A runtime device that exists, or :class:`DeviceNotFoundError` saying why not."""
    if kind not in DEVICE_KINDS:
        raise DeviceNotFoundError(
            f"unknown device '{kind}'; known devices: {', '.join(DEVICE_KINDS)} "
            "(or rpc://host:port/key)"
        )
    dev = tvm.device(kind, index)
    if not dev.exist:
        hint = {
            "cuda": "no CUDA GPU is visible on this machine",
            "opencl": "no OpenCL runtime/platform is available on this machine",
        }.get(kind, "device missing")
        raise DeviceNotFoundError(f"device {kind}:{index} not found: {hint}")
    return dev


def load_runnable(path: str | Path) -> tvm.runtime.Module:
    """Load an exported library, with a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.exists():
        raise SmartMemError(f"compiled module not found: {path}")
    try:
        return tvm.runtime.load_module(str(path))
    except Exception as err:
        from ..frontend import summarize_tvm_error

        raise SmartMemError(f"cannot load {path}: {summarize_tvm_error(err)}") from None


class LocalRunner:
    """Run and time a Relax VM executable on a device of this machine."""

    def __init__(
        self, device: str = "cpu", *, repeat: int = 10, number: int = 5, warmup: int = 3,
        index: int = 0,
    ):
        if repeat < 1 or number < 1 or warmup < 0:
            raise ValueError("repeat and number must be >= 1 and warmup >= 0")
        self.kind = device
        self.dev = get_device(device, index)
        self.repeat, self.number, self.warmup = repeat, number, warmup

    def _vm(self, executable: Any) -> tvm.runtime.vm.VirtualMachine:
        from tvm.runtime.vm import VirtualMachine

        return VirtualMachine(executable, self.dev)

    def _upload(self, arrays: Sequence[np.ndarray]) -> list[tvm.runtime.Tensor]:
        return [tvm.runtime.tensor(np.ascontiguousarray(a), self.dev) for a in arrays]

    def outputs(
        self, executable: Any, inputs: Sequence[np.ndarray], params: Sequence[np.ndarray] = ()
    ) -> list[np.ndarray]:
        """Run ``main`` once and return its outputs as numpy arrays (tuples flattened)."""
        vm = self._vm(executable)
        out = vm["main"](*self._upload(inputs), *self._upload(params))
        return flatten_outputs(out)

    def run(
        self, executable: Any, inputs: Sequence[np.ndarray], params: Sequence[np.ndarray] = ()
    ) -> RunResult:
        """Time ``main`` with the protocol described in :mod:`tvm_smartmem.measure`."""
        vm = self._vm(executable)
        args = self._upload(inputs) + self._upload(params)
        vm.set_input("main", *args)
        for _ in range(self.warmup):
            vm.invoke_stateful("main")
        self.dev.sync()
        timer = vm.time_evaluator("invoke_stateful", self.dev, number=self.number,
                                  repeat=self.repeat)
        res = timer("main")
        return RunResult.from_samples(self.kind, list(res.results), self.number, self.warmup)


def flatten_outputs(out: Any) -> list[np.ndarray]:
    if isinstance(out, tvm.runtime.Tensor):
        return [out.numpy()]
    if isinstance(out, (list, tuple)) or hasattr(out, "__len__"):
        flat: list[np.ndarray] = []
        for o in out:
            flat.extend(flatten_outputs(o))
        return flat
    return [np.asarray(out)]

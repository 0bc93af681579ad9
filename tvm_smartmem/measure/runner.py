"""Runners and the result record they all return.

Both runners follow one protocol (see the package docstring); they differ only in where the
module lives: :class:`LocalRunner` on a device of this machine, :class:`RPCRunner` on a device
behind a ``tvm.rpc`` tracker (a phone running TVM's RPC app, or a loopback server in tests).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from ..errors import DeviceNotFoundError, ShapeMismatchError, SmartMemError

DEVICE_KINDS = ("cpu", "cuda", "opencl")


@dataclasses.dataclass
class KernelTime:
    """Per-kernel profile entry: total and mean time over one profiled run."""

    name: str
    calls: int
    total_us: float

    @property
    def mean_us(self) -> float:
        return self.total_us / max(self.calls, 1)


@dataclasses.dataclass
class RunResult:
    """Timings of one module on one device (milliseconds per call of ``main``)."""

    device: str
    device_name: str
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
    profile: list[KernelTime] | None = None

    def summary(self) -> str:
        text = (
            f"{self.device} ({self.device_name}): median {self.median_ms:.4f} ms, "
            f"min {self.min_ms:.4f} ms, max {self.max_ms:.4f} ms  "
            f"({self.repeat} x {self.number} runs, {self.warmup} warm-up)"
        )
        if self.profile:
            total = sum(k.total_us for k in self.profile)
            rows = [f"  {k.name:60s} {k.calls:4d} x {k.mean_us:10.2f} us "
                    f"({100 * k.total_us / max(total, 1e-9):5.1f}%)"
                    for k in sorted(self.profile, key=lambda k: -k.total_us)]
            text += "\nper-kernel profile (device synchronised around each call):\n"
            text += "\n".join(rows)
        return text

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if self.profile is not None:
            out["profile"] = [dict(dataclasses.asdict(k), mean_us=k.mean_us) for k in self.profile]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_samples(
        cls, device: str, device_name: str, samples_s: Sequence[float], number: int, warmup: int
    ) -> RunResult:
        ms = [float(s) * 1e3 for s in samples_s]
        return cls(
            device=device, device_name=device_name, repeat=len(ms), number=number,
            warmup=warmup, median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms),
            mean_ms=statistics.fmean(ms), std_ms=statistics.pstdev(ms), samples_ms=ms,
        )


def get_device(kind: str, index: int = 0) -> tvm.runtime.Device:
    """A runtime device of this machine that exists, or :class:`DeviceNotFoundError` why not."""
    if kind not in DEVICE_KINDS:
        raise DeviceNotFoundError(
            f"unknown device '{kind}'; known devices: {', '.join(DEVICE_KINDS)} "
            "(or rpc://host:port/key)"
        )
    if kind == "opencl":
        from ..runtime import opencl

        try:
            return opencl.require_device(index)
        except SmartMemError as err:
            raise DeviceNotFoundError(f"device opencl:{index} not found: {err}") from None
    dev = tvm.device(kind, index)
    if not dev.exist:
        hint = "no CUDA GPU is visible on this machine" if kind == "cuda" else "device missing"
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


def flatten_outputs(out: Any) -> list[np.ndarray]:
    if isinstance(out, tvm.runtime.Tensor):
        return [out.numpy()]
    if isinstance(out, (list, tuple)) or hasattr(out, "__len__"):
        flat: list[np.ndarray] = []
        for o in out:
            flat.extend(flatten_outputs(o))
        return flat
    return [np.asarray(out)]


def prepare_weights(vm: Any, weights: Sequence[Any], func: str = "main") -> list:
    """The weights ``func`` takes: the model's own, or -- when the pipeline lifted weight-only
    work into ``<func>_transform_params`` (``transform.lift_weight_transforms``) -- what that
    function returns for them.  Call once per loaded model and reuse the result."""
    name = f"{func}_transform_params"
    if not vm.module.implements_function(name):
        return list(weights)
    expected = vm._get_function_arity(name)
    if len(weights) != expected:  # otherwise a check deep inside the VM says it, tersely
        raise ShapeMismatchError(f"the model takes {expected} weights, got {len(weights)} "
                                 "(pass the weights the frontend returned, in order)")
    # the stateful interface is the one that also works over RPC; the outputs are read one
    # by one (VirtualMachine.get_outputs's recursive closure would keep the VM -- and an RPC
    # session with it -- alive until the next garbage collection)
    vm.set_input(name, *weights)
    vm.invoke_stateful(name)
    return [vm._get_output(name, i) for i in range(vm._get_output_arity(name))]


class _Runner:
    """The shared protocol; subclasses provide ``_open`` (module, device)."""

    kind: str

    def __init__(self, *, repeat: int = 10, number: int = 5, warmup: int = 3):
        if repeat < 1 or number < 1 or warmup < 0:
            raise ValueError("repeat and number must be >= 1 and warmup >= 0")
        self.repeat, self.number, self.warmup = repeat, number, warmup

    def _open(self, executable: Any) -> tuple[Any, tvm.runtime.Device]:
        raise NotImplementedError  # abstract: LocalRunner and RPCRunner implement it

    def _device_name(self, dev: tvm.runtime.Device) -> str:
        try:
            return str(dev.device_name) if self.kind != "cpu" else platform.processor() or "cpu"
        except Exception:  # a device may not report a name (RPC, old drivers): cosmetic only
            return self.kind

    def _vm(self, executable: Any):
        from tvm.runtime.vm import VirtualMachine

        mod, dev = self._open(executable)
        return VirtualMachine(mod, dev), dev

    @staticmethod
    def _upload(arrays: Sequence[np.ndarray], dev) -> list[tvm.runtime.Tensor]:
        return [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]

    def outputs(
        self, executable: Any, inputs: Sequence[np.ndarray], params: Sequence[np.ndarray] = ()
    ) -> list[np.ndarray]:
        """Run ``main`` once and return its outputs as numpy arrays (tuples flattened)."""
        vm, dev = self._vm(executable)
        weights = prepare_weights(vm, self._upload(params, dev))
        out = vm["main"](*self._upload(inputs, dev), *weights)
        return flatten_outputs(out)

    def repeated_outputs(
        self, executable: Any, inputs: Sequence[np.ndarray], params: Sequence[np.ndarray] = (),
        calls: int = 20,
    ) -> tuple[list[np.ndarray], bool]:
        """(outputs of the first of ``calls`` runs of ``main`` on one virtual machine, whether
        every run gave the same bits).  Our kernels are deterministic, so a difference is a
        race -- e.g. between the thread blocks of a kernel that synchronise through memory, as
        a split-K GEMM summing its own partial products does (``FuseSplitKReduction``)."""
        vm, dev = self._vm(executable)
        args = self._upload(inputs, dev) + prepare_weights(vm, self._upload(params, dev))
        first = flatten_outputs(vm["main"](*args))
        same = True
        for _ in range(calls - 1):
            again = flatten_outputs(vm["main"](*args))
            same = same and all(np.array_equal(a, b, equal_nan=True)
                                for a, b in zip(first, again, strict=True))
        return first, same

    def first_divergence(
        self, executable: Any, inputs: Sequence[np.ndarray], params: Sequence[np.ndarray] = (),
        runs: int = 5,
    ) -> dict | None:
        """Where repeated runs of ``main`` first part ways, kernel by kernel: None when ``runs``
        runs give the same bits after every kernel call, else the first call (in program
        order) after which an argument differs from the first run -- its inputs were the same
        bits, so that kernel races (or reads memory nothing wrote).  ``{"call", "kernel",
        "argument", "max_abs_diff", "run"}``."""
        vm, dev = self._vm(executable)
        args = self._upload(inputs, dev) + prepare_weights(vm, self._upload(params, dev))
        reference: list = []
        for run in range(runs):
            record: list = []

            def instrument(func, name, before, ret, *call_args, _record=record):
                name = str(name)
                if before or name.startswith("vm.builtin."):
                    return 0
                dev.sync()
                _record.append((name, [a.numpy().copy() if hasattr(a, "numpy") else None
                                      for a in call_args]))
                return 0

            vm.set_instrument(tvm.runtime.convert(instrument))
            try:
                vm["main"](*args)
                dev.sync()
            finally:
                vm.set_instrument(None)
            if run == 0:
                reference = record
                continue
            for call, ((name, got), (_, want)) in enumerate(zip(record, reference,
                                                                strict=False)):
                for k, (a, b) in enumerate(zip(got, want, strict=False)):
                    if a is None or b is None or np.array_equal(a, b, equal_nan=True):
                        continue
                    diff = np.abs(a.astype("float64") - b.astype("float64"))
                    return {"call": call, "kernel": name, "argument": k, "run": run,
                            "max_abs_diff": float(np.nanmax(diff)) if diff.size else 0.0}
        return None

    def run(
        self, executable: Any, inputs: Sequence[np.ndarray], params: Sequence[np.ndarray] = (),
        *, profile: bool = False,
    ) -> RunResult:
        """Time ``main``: warm-up, then ``repeat`` x ``number`` runs; optionally per kernel."""
        vm, dev = self._vm(executable)
        # load-time weight transforms run once, outside the timed calls (as in deployment)
        args = self._upload(inputs, dev) + prepare_weights(vm, self._upload(params, dev))
        vm.set_input("main", *args)
        for _ in range(self.warmup):
            vm.invoke_stateful("main")
        dev.sync()
        timer = vm.time_evaluator("invoke_stateful", dev, number=self.number,
                                  repeat=self.repeat)
        res = timer("main")
        result = RunResult.from_samples(self.kind, self._device_name(dev), list(res.results),
                                        self.number, self.warmup)
        if profile:
            result.profile = self._profile(vm, dev)
        return result

    def _profile(self, vm, dev) -> list[KernelTime]:
        """Time each kernel call of one run of ``main``, synchronising around every call."""
        totals: dict[str, float] = defaultdict(float)
        calls: dict[str, int] = defaultdict(int)
        start: list[float] = []

        def instrument(func, name, before, ret, *args):
            name = str(name)
            if name.startswith("vm.builtin."):
                return 0
            dev.sync()
            if before:
                start.append(time.perf_counter())
            elif start:
                totals[name] += (time.perf_counter() - start.pop()) * 1e6
                calls[name] += 1
            return 0

        vm.set_instrument(tvm.runtime.convert(instrument))
        try:
            vm.invoke_stateful("main")
            dev.sync()
        finally:
            vm.set_instrument(None)
        return [KernelTime(n, calls[n], totals[n]) for n in totals]


class LocalRunner(_Runner):
    """Run and time a Relax VM executable on a device of this machine (cpu, cuda, opencl)."""

    def __init__(self, device: str = "cpu", *, index: int = 0, **protocol: int):
        super().__init__(**protocol)
        self.kind = device
        self.dev = get_device(device, index)

    def _open(self, executable: Any):
        return executable, self.dev


class RPCRunner(_Runner):
    """Run and time on a device behind a ``tvm.rpc`` tracker.

    ``tracker`` is ``host:port`` of ``python -m tvm.exec.rpc_tracker``; ``key`` the key the
    device's server registered with (``android`` for TVM's Android RPC app by convention).  The
    executable is exported to a library (cross-compiled with ``fcompile`` when the device is not
    this machine's architecture, e.g. ``tvm.contrib.ndk.create_shared``), uploaded and loaded
    remotely; inputs and weights are uploaded once.
    """

    def __init__(
        self, tracker: str, key: str, *, device: str = "cpu", index: int = 0,
        fcompile: Any = None, session_timeout: int = 600, **protocol: int,
    ):
        super().__init__(**protocol)
        from tvm import rpc

        host, _, port = tracker.rpartition(":")
        if not host or not port.isdigit():
            raise SmartMemError(f"tracker must be host:port, got '{tracker}'")
        if device not in DEVICE_KINDS:
            raise DeviceNotFoundError(
                f"unknown device '{device}'; known devices: {', '.join(DEVICE_KINDS)}"
            )
        try:
            tracker_client = rpc.connect_tracker(host, int(port))
            keys = sorted(tracker_client.summary().get("queue_info", {}))
            if key not in keys:  # a request for an absent key would wait forever
                raise DeviceNotFoundError(
                    f"no RPC device '{key}' at tracker {tracker}; registered keys: "
                    f"{', '.join(keys) or 'none'}"
                )
            self.session = tracker_client.request(
                key, priority=1, session_timeout=session_timeout
            )
        except DeviceNotFoundError:
            raise
        except Exception as err:
            from ..frontend import summarize_tvm_error

            raise DeviceNotFoundError(
                f"no RPC device '{key}' at tracker {tracker}: {summarize_tvm_error(err)}"
            ) from None
        self.kind = device
        self.index = index
        self.fcompile = fcompile
        self.dev = self.session.device(device, index)
        if not self.dev.exist:
            raise DeviceNotFoundError(f"the RPC device '{key}' has no {device}:{index}")

    def _open(self, executable: Any):
        if isinstance(executable, (str, Path)):
            path = Path(executable)
            self.session.upload(str(path))
            return self.session.load_module(path.name), self.dev
        with tempfile.TemporaryDirectory() as tmp:
            # a unique name: a server that does not fork loads every upload into one process
            name = f"smartmem_{uuid.uuid4().hex[:12]}.so"
            path = os.path.join(tmp, name)
            if self.fcompile is not None:
                executable.export_library(path, fcompile=self.fcompile)
            else:
                executable.export_library(path)
            self.session.upload(path)
            return self.session.load_module(name), self.dev

    def _profile(self, vm, dev) -> list[KernelTime]:
        raise SmartMemError("per-kernel profiles are only available with LocalRunner")

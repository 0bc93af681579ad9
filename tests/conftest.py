"""Shared helpers: compile a module, run it on the CPU and compare with a reference."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np
import pytest
import tvm

from tvm_smartmem import numerics

LLVM = tvm.target.Target("llvm")

# the suite's expectations are the analytic fusion decisions: a profile database a developer's
# `tvm-smartmem tune` left in the cache must not change them (tests that tune name their own)
os.environ.setdefault("TVM_SMARTMEM_PROFILE_DB", "none")


def run_vm(ex, args: Sequence[np.ndarray], dev=None,
           params: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    """Run ``main`` on ``args`` (inputs) and ``params`` (weights, through the load-time weight
    function when the pipeline made one)."""
    from tvm_smartmem.measure.runner import flatten_outputs, prepare_weights

    dev = dev or tvm.cpu()
    vm = tvm.relax.VirtualMachine(ex, dev)

    def up(arrays):
        return [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]

    return flatten_outputs(vm["main"](*up(args), *prepare_weights(vm, up(params))))


def build_function(params: dict[str, tuple], body, dtype: str = "float32") -> tvm.IRModule:
    """A ``main`` of one dataflow block over tensor parameters ``name -> shape``;
    ``body(vars, emit)`` returns its result (graph passes are tested on such modules)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    vs = {n: relax.Var(n, relax.TensorType(s, dtype)) for n, s in params.items()}
    with bb.function("main", list(vs.values())):
        with bb.dataflow():
            out = bb.emit_output(body(vs, bb.emit))
        bb.emit_func_output(out)
    return bb.get()


def assert_matches(outs: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> float:
    """Every output within the dtype's tolerance of ``numerics``; returns the worst error."""
    assert len(outs) == len(refs), f"{len(outs)} outputs vs {len(refs)} reference outputs"
    ok, worst = numerics.compare(outs, refs)
    assert ok, f"max scale-normalised error {worst:.3e} exceeds tolerance"
    return worst


@pytest.fixture
def cli():
    """Run the CLI in a subprocess, as a user would: returns (returncode, stdout, stderr)."""
    import subprocess

    def _run(*args: str, timeout: int = 600):
        proc = subprocess.run(
            [sys.executable, "-m", "tvm_smartmem.cli", *args],
            capture_output=True, text=True, timeout=timeout,
        )
        return proc.returncode, proc.stdout, proc.stderr

    return _run


@pytest.fixture(scope="module")
def dev():
    """The OpenCL device (PoCL without a GPU).  Skipped only when no OpenCL platform and no
    PoCL is installed; PoCL installed but no device is a failure, not a skip."""
    from tvm_smartmem.runtime import opencl

    if opencl.pocl_library() is None and not opencl.describe().get("devices"):
        pytest.skip("no OpenCL device and PoCL is not installed (pip install 'pyopencl[pocl]')")
    info = opencl.describe()
    assert info["devices"], f"OpenCL runtime found no device: {info['error']}"
    return tvm.opencl(0)

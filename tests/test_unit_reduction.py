"""Reductions over one element: made spatial before the GPU schedule rules, which otherwise
apply the epilogue twice (``tir.unit_reduction``)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import assert_matches, run_vm
from tvm import relax

from tvm_smartmem import targets
from tvm_smartmem.pipeline import smartmem_pipeline
from tvm_smartmem.tir.unit_reduction import spatial_unit_reductions


def _norm_plus_input(norm: str, rows: int = 3):
    """``norm(x) + x`` over a hidden size of one, the norm's reduction a single element."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, rows, 1), "float32"))
    gamma = relax.const(np.array([0.5], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if norm == "rms_norm":
                y = relax.op.nn.rms_norm(x, gamma, axes=[-1])
            elif norm == "layer_norm":
                y = relax.op.nn.layer_norm(x, gamma, relax.const(np.array([0.1], "float32")),
                                           axes=[-1])
            elif norm == "max":
                y = relax.op.max(x, axis=[-1], keepdims=True)
            else:
                y = relax.op.nn.softmax(x, axis=-1)
            out = bb.emit_output(bb.emit(relax.op.add(y, x)))
        bb.emit_func_output(out)
    return bb.get()


def _reference(x: np.ndarray, norm: str) -> np.ndarray:
    x64 = x.astype("float64")
    if norm == "rms_norm":
        y = x64 / np.sqrt(x64 * x64 + 1e-5) * 0.5
    elif norm == "layer_norm":
        y = np.full_like(x64, 0.1)
    elif norm == "max":
        y = x64
    else:
        y = np.ones_like(x64)
    return (y + x64).astype("float32")


@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm", "softmax", "max"])
def test_norms_over_one_channel_match_numpy_on_opencl(dev, norm):
    """RMSNorm came out as garbage and a reduction's epilogue twice before the rewrite."""
    opencl = targets.get("opencl")
    x = np.array([[[1.5], [-2.0], [3.0]]], "float32")
    ex = tvm.compile(_norm_plus_input(norm), opencl, relax_pipeline=smartmem_pipeline(opencl))
    assert_matches(run_vm(ex, [x], dev), [_reference(x, norm)])


def _sum_kernel(k: int):
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def func(a: T.Buffer((4, k), "float32"), out: T.Buffer((4,), "float32")):
        total = T.sblock_alloc_buffer((4,))
        for i, j in T.grid(4, k):
            with T.sblock("total"):
                vi, vj = T.axis.remap("SR", [i, j])
                with T.init():
                    total[vi] = T.float32(0.0)
                total[vi] = total[vi] + a[vi, vj] * T.float32(2.0)
        for i in range(4):
            with T.sblock("out"):
                vi = T.axis.spatial(4, i)
                out[vi] = total[vi] + a[vi, 0]

    return func


def test_only_single_element_reductions_are_rewritten_and_values_are_kept():
    new, count = spatial_unit_reductions(_sum_kernel(1))
    assert count == 1
    assert "T.init" not in new.script() and "T.axis.reduce" not in new.script()
    assert spatial_unit_reductions(_sum_kernel(2))[1] == 0
    a = np.arange(4, dtype="float32").reshape(4, 1) - 1.5
    results = []
    for func in (_sum_kernel(1), new):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                          target="llvm")
        out = tvm.runtime.tensor(np.zeros(4, "float32"))
        lib["main"](tvm.runtime.tensor(a), out)
        results.append(out.numpy())
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_allclose(results[1], a[:, 0] * 3.0)

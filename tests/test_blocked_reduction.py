"""BlockedReductions: long CPU reductions in partial sums (accuracy of the llvm build)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import LLVM, run_vm
from tvm import relax

from tvm_smartmem import numerics
from tvm_smartmem.pipeline import smartmem_pipeline
from tvm_smartmem.tir.blocked_reduction import (
    ATTR,
    MAX_SCRATCH_BYTES,
    MIN_EXTENT,
    _inner_factor,
    block_reductions,
)


def _module(shape, build):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(build(x))
        bb.emit_func_output(y)
    return bb.get()


def _group_norm(shape, groups):
    ones = relax.const(np.ones(shape[1], "float32"))
    zeros = relax.const(np.zeros(shape[1], "float32"))
    return _module(shape, lambda x: relax.op.nn.group_norm(
        x, ones, zeros, num_groups=groups, channel_axis=1, axes=[2, 3], epsilon=1e-6))


def _group_norm_reference(x, groups):
    g = x.astype(np.float64).reshape(x.shape[0], groups, -1)
    y = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)
    return y.reshape(x.shape)


def _blocked(mod) -> int:
    lowered = smartmem_pipeline(LLVM)(mod)
    return sum(int(f.attrs[ATTR]) for _, f in lowered.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and ATTR in f.attrs)


def test_million_element_group_norm_is_accurate_only_when_blocked():
    """A VAE-sized GroupNorm (4 channels x 512 x 512 per group): one running sum misses a
    float64 reference by ~1e-3; partial sums bring it within 1e-5."""
    shape = (1, 8, 512, 512)
    mod = _group_norm(shape, 2)
    x = (np.random.default_rng(0).standard_normal(shape) + 0.5).astype("float32")
    ref = _group_norm_reference(x, 2)
    errors = {}
    for disable in ((), ("BlockedReductions",)):
        ex = tvm.compile(mod, LLVM, relax_pipeline=smartmem_pipeline(LLVM, disable=disable))
        errors[disable] = numerics.max_error(run_vm(ex, [x])[0], ref)
    assert errors[()] < 1e-5 < 1e-4 < errors[("BlockedReductions",)]
    assert _blocked(mod) == 1


@pytest.mark.parametrize("axis", [1, 2])
def test_blocked_sums_and_means_match_numpy(axis):
    """Sum and mean along either axis, reduction extents that are not powers of two."""
    shape = (3, 9000, 3) if axis == 1 else (3, 2, 12288)
    x = np.random.default_rng(1).standard_normal(shape).astype("float32")
    for op, ref in ((relax.op.sum, np.sum), (relax.op.mean, np.mean)):
        mod = _module(shape, lambda v, op=op: op(v, [axis]))
        assert _blocked(mod) == 1
        ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
        out = run_vm(ex, [x])[0]
        expected = ref(x.astype(np.float64), axis=axis)
        assert numerics.max_error(out, expected.astype("float32")) < 1e-5


def test_short_reductions_and_prime_extents_are_left_alone():
    """Below MIN_EXTENT nothing changes; a prime extent has no divisor to block by."""
    short = _module((4, MIN_EXTENT - 1), lambda v: relax.op.sum(v, [1]))
    prime = _module((2, 8209), lambda v: relax.op.sum(v, [1]))
    assert _inner_factor(8209) == 1 and _inner_factor(1 << 20) == 1024
    assert _inner_factor(9000) in (90, 100)
    assert _blocked(short) == 0 and _blocked(prime) == 0
    x = np.random.default_rng(2).standard_normal((2, 8209)).astype("float32")
    ex = tvm.compile(prime, LLVM, relax_pipeline="smartmem")
    assert numerics.max_error(run_vm(ex, [x])[0], x.sum(1)) < 1e-4


def test_scratch_limit_keeps_wide_reductions_unblocked():
    """Partial sums for every output element must fit MAX_SCRATCH_BYTES: a reduction with a
    large spatial extent keeps its single accumulator."""
    def count(rows: int) -> int:
        legal = relax.transform.LegalizeOps()(_module((rows, 8192), lambda v: relax.op.sum(v, [1])))
        func = next(f for _, f in legal.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
        return block_reductions(func)[1]

    inner = _inner_factor(8192)
    fits = MAX_SCRATCH_BYTES // (inner * 4)
    assert (count(fits), count(fits * 2)) == (1, 0)

"""RecogniseRoll: rotations written as concatenated slices become one index map."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tvm
import tvm.sym
from conftest import LLVM, assert_matches, run_vm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tvm import relax, tirx

from tvm_smartmem.analysis.stats import collect
from tvm_smartmem.pipeline import smartmem_pipeline
from tvm_smartmem.transform.recognise_roll import (
    ROLLS_ATTR,
    RecogniseRoll,
    rolled_index,
    rotation_shift,
)


def _ops(mod: tvm.IRModule) -> list[str]:
    """Operators (and call_tir callees) of main, in binding order."""
    out = []
    for b in mod["main"].body.blocks[0].bindings:
        v = b.value
        if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op):
            out.append(v.args[0].name_hint if v.op.name == "relax.call_tir" else v.op.name)
    return out


def _concat_of_slices(shape, axis, pieces, sources=None):
    """main(x[, y]) = concat([src[b:e] along axis for (b, e) in pieces], axis) (+ exp after,
    so that the result is computed by a kernel of ours)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    y = relax.Var("y", relax.TensorType(shape, "float32"))
    params = [x, y] if sources else [x]
    with bb.function("main", params):
        with bb.dataflow():
            parts = []
            for k, (b, e) in enumerate(pieces):
                src = y if sources and sources[k] else x
                parts.append(bb.emit(relax.op.strided_slice(src, [axis], [b], [e])))
            cat = bb.emit(relax.op.concat(parts, axis=axis))
            out = bb.emit_output(relax.op.exp(cat))
        bb.emit_func_output(out)
    return bb.get()


def test_swin_shift_becomes_one_roll_and_keeps_values():
    """concat(x[:, 3:], x[:, :3]) on axis 1 is np.roll(x, -3, 1): one call_tir, no concat."""
    mod = _concat_of_slices((2, 14, 5), 1, [(3, 14), (0, 3)])
    out = RecogniseRoll()(mod)
    assert _ops(out) == ["roll", "relax.exp"]
    assert int(out["main"].attrs[ROLLS_ATTR]) == 1
    data = np.random.default_rng(0).standard_normal((2, 14, 5)).astype("float32")
    ex = tvm.compile(mod, LLVM, relax_pipeline=smartmem_pipeline(LLVM))
    assert_matches(run_vm(ex, [data]), [np.exp(np.roll(data, -3, axis=1))])


@pytest.mark.parametrize("pieces, sources", [
    ([(0, 7), (7, 14)], None),                 # identity order: not a rotation worth a kernel
    ([(3, 14), (0, 2)], None),                 # misses a row
    ([(3, 14), (0, 4)], None),                 # row 3 twice (shape 15 along the axis)
    ([(3, 14), (0, 3)], [False, True]),        # two different tensors
])
def test_what_is_not_a_rotation_stays_a_concatenate(pieces, sources):
    mod = _concat_of_slices((2, 14, 5), 1, pieces, sources)
    out = RecogniseRoll()(mod)
    assert "relax.concat" in _ops(out) and "roll" not in _ops(out)
    assert ROLLS_ATTR not in (out["main"].attrs or {})


def test_strided_slices_are_not_rotations():
    """Patch merging concatenates stride-2 slices: a gather, not a rotation."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 8, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.strided_slice(x, [1], [0], [8], [2]))
            b = bb.emit(relax.op.strided_slice(x, [1], [1], [8], [2]))
            out = bb.emit_output(relax.op.concat([a, b], axis=1))
        bb.emit_func_output(out)
    assert "relax.concat" in _ops(RecogniseRoll()(bb.get()))


def test_rotation_shift():
    assert rotation_shift([(3, 14), (0, 3)], 14) == 3
    assert rotation_shift([(5, 9), (9, 10), (0, 5)], 10) == 5
    assert rotation_shift([(0, 10)], 10) == 0
    assert rotation_shift([(3, 14), (1, 3)], 14) is None
    assert rotation_shift([(3, 10), (0, 3), (3, 4)], 10) is None


def test_rolled_index_survives_the_iterator_map_simplifier():
    """TVM 0.27's iter_map_simplify fuses ``(a // 8 + 6) % 8 * 8 + (a % 8 + 6) % 8`` into
    ``(a + 48) % 64`` (the inner rotation is lost: swin's two-axis roll composed with its window
    map).  The select form must come out of it with the right value at every point."""
    a = tirx.Var("a", "int64")
    b = tirx.Var("b", "int64")
    expr = rolled_index(a // 8, 6, 8) * 256 + rolled_index(a % 8, 6, 8) * 32 + b
    (simplified,) = tvm.sym.iter_map_simplify(
        [expr], {a: tvm.ir.Range(0, 64), b: tvm.ir.Range(0, 32)})
    analyzer = tvm.sym.analyzer.Analyzer()
    for av in range(64):
        for bv in (0, 31):
            ana = tvm.sym.analyzer.Analyzer()
            ana.bind(a, tirx.IntImm("int64", av))
            ana.bind(b, tirx.IntImm("int64", bv))
            got = int(ana.simplify(simplified).value)
            assert got == ((av // 8 + 6) % 8) * 256 + ((av % 8 + 6) % 8) * 32 + bv
    # and the analyzer's bound knows it is non-negative (later divisions of it stay unsigned)
    analyzer.bind(a, tvm.ir.Range(0, 64))
    assert analyzer.const_int_bound(rolled_index(a % 8, 6, 8)).min_value == 0


def test_two_axis_roll_with_window_partition_matches_numpy():
    """Swin's shifted windows in small: roll on H and W, window partition (reshape, transpose,
    reshape), then an element-wise op -- all folded into one kernel that must keep the values
    (it gave wrong results through TVM's flattening before rolls became selects)."""
    h = w = 8
    win = 4
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, h, w, 3), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            r1 = bb.emit(relax.op.concat([bb.emit(relax.op.strided_slice(x, [1], [6], [h])),
                                          bb.emit(relax.op.strided_slice(x, [1], [0], [6]))],
                                         axis=1))
            r2 = bb.emit(relax.op.concat([bb.emit(relax.op.strided_slice(r1, [2], [6], [w])),
                                          bb.emit(relax.op.strided_slice(r1, [2], [0], [6]))],
                                         axis=2))
            p = bb.emit(relax.op.reshape(r2, (1, h // win, win, w // win, win, 3)))
            p = bb.emit(relax.op.permute_dims(p, [0, 1, 3, 2, 4, 5]))
            p = bb.emit(relax.op.reshape(p, (4, win * win, 3)))
            out = bb.emit_output(relax.op.add(p, relax.const(1.0, "float32")))
        bb.emit_func_output(out)
    mod = bb.get()
    lowered = smartmem_pipeline(LLVM)(mod)
    assert collect(lowered).kernels == 1
    data = np.random.default_rng(1).standard_normal((1, h, w, 3)).astype("float32")
    rolled = np.roll(data, (-6, -6), axis=(1, 2))
    expected = rolled.reshape(1, 2, win, 2, win, 3).transpose(0, 1, 3, 2, 4, 5) \
        .reshape(4, win * win, 3) + 1
    ex = tvm.compile(mod, LLVM, relax_pipeline=smartmem_pipeline(LLVM))
    assert_matches(run_vm(ex, [data]), [expected])


@st.composite
def _rotations(draw):
    rank = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(2, 7), min_size=rank, max_size=rank)))
    axis = draw(st.integers(0, rank - 1))
    n = shape[axis]
    shift = draw(st.integers(0, n - 1))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=3)))
    bounds = [0, *cuts, n]
    # cyclic pieces of the axis starting at `shift`: cut the rotated sequence
    pieces = []
    for b, e in itertools.pairwise(bounds):
        lo, hi = (b + shift) % n, (e + shift) % n or n
        if lo < hi:
            pieces.append((lo, hi))
        else:  # wraps: split at the end of the axis
            pieces += [(lo, n), (0, hi)] if hi else [(lo, n)]
    negative = draw(st.booleans())  # write begins as negative offsets, as exporters may
    return shape, axis, shift, pieces, negative


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_rotations())
def test_random_rotations_match_numpy(case):
    """Any cyclic cover of an axis, in 1-4 pieces, becomes one roll (when it moves anything)
    with np.roll's values."""
    shape, axis, shift, pieces, negative = case
    written = [(b - shape[axis] if negative and b else b, e) for b, e in pieces]
    mod = _concat_of_slices(shape, axis, written)
    out = RecogniseRoll()(mod)
    assert ("relax.concat" in _ops(out)) == (shift == 0)
    data = np.random.default_rng(2).standard_normal(shape).astype("float32")
    ex = tvm.compile(mod, LLVM, relax_pipeline=smartmem_pipeline(LLVM))
    assert_matches(run_vm(ex, [data]), [np.exp(np.roll(data, -shift, axis=axis))])

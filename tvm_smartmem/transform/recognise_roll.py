"""RecogniseRoll: a concatenation of slices that rotates an axis becomes one modular index map.

``torch.roll`` has no ONNX operator; exporters write it as slices of one tensor concatenated
back along the sliced axis (Swin's shifted windows: ``concat(x[:, 3:], x[:, :3], axis=1)``).
Folded as it stands, the concatenation is a ``select`` per element whose branches read through
``i - 3`` and ``i + 53``: the branch conditions are lost when the composed window maps are
simplified, which leaves floor divisions of possibly negative values in the kernels (on CUDA
TVM 0.27's lowering of those gave wrong results for swin_hf's stage-3 window reverse), and
every read pays for both branches' index arithmetic.

A rotation is one index map, ``y[..., i, ...] = x[..., (i + s) % n, ...]``: no branch and a
non-negative dividend.  This pass rewrites every ``concat`` whose operands are unit-stride
slices of the same tensor along the concatenation axis, taken cyclically (each begins where the
previous ended, modulo the axis length) and covering the axis exactly once, into a ``call_tir``
of that map.  The result is a pure data-movement kernel, so layout elimination folds it into
its neighbours like any other fixed-layout operator.  The count is recorded as
``smartmem.rolls`` on the function.
"""

from __future__ import annotations

import itertools

import tvm
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

from .math_rewrite import shape_of

ROLLS_ATTR = "smartmem.rolls"


def _int_list(values) -> list[int] | None:
    """Static integers of a ``relax.Tuple`` of integers (how strided_slice takes its
    axes / begin / end / strides), or None when any is symbolic."""
    if not isinstance(values, relax.Tuple):
        return None
    out = []
    for v in values.fields:
        if not isinstance(v, tvm.tirx.IntImm):
            return None
        out.append(int(v.value))
    return out


def _slice_range(call, axis: int, extent: int) -> tuple[relax.Expr, int, int] | None:
    """``(source, begin, end)`` of a unit-stride slice of ``source`` along ``axis`` only."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
            and call.op.name == "relax.strided_slice" and len(call.args) in (4, 5)):
        return None
    source = call.args[0]
    dims = shape_of(source)
    axes, begin, end = (_int_list(a) for a in call.args[1:4])
    strides = _int_list(call.args[4]) if len(call.args) == 5 else [1] * len(axes or [])
    if dims is None or None in (axes, begin, end, strides) or len(axes) != 1:
        return None
    if axes[0] % len(dims) != axis or strides[0] != 1 or dims[axis] != extent:
        return None
    b, e = (v + extent if v < 0 else v for v in (begin[0], end[0]))
    b, e = max(0, min(b, extent)), max(0, min(e, extent))
    return (source, b, e) if e > b else None


def rotation_shift(ranges: list[tuple[int, int]], extent: int) -> int | None:
    """The shift ``s`` such that concatenating ``[x[b:e] for b, e in ranges]`` is
    ``x[(i + s) % extent]``, or None when the ranges are not one cyclic pass over the axis."""
    if not ranges or sum(e - b for b, e in ranges) != extent:
        return None
    for (_, e), (b_next, _) in itertools.pairwise(ranges):
        if b_next != e % extent:
            return None
    return ranges[0][0]


def rolled_index(i, shift: int, extent: int):
    """``(i + shift) % extent`` for an int64 ``0 <= i < extent``, written as a select.

    Not as a ``floormod``: TVM 0.27's iterator-map simplifier (``FlattenBuffer``, and the
    fused-loop indices of GPU schedules) fuses ``(i // 8 + 6) % 8 * 8 + (i % 8 + 6) % 8``
    into ``(i + 48) % 64``, which drops the inner rotation -- swin's window maps composed with
    a two-axis roll are exactly this shape, and gave wrong results on llvm and CUDA.  The
    iterator-map detector does not parse a select, so it leaves the index alone.  The ``max``
    never changes the value (in that branch ``i >= extent - shift``) but lets the arithmetic
    analyzer prove the index non-negative, which keeps later divisions of it unsigned."""
    cut = tvm.tirx.IntImm("int64", extent - shift)
    return tvm.tirx.Select(i < cut, i + tvm.tirx.IntImm("int64", shift),
                           tvm.tirx.max(i - cut, tvm.tirx.IntImm("int64", 0)))


def roll_primfunc(shape: list[int], dtype: str, axis: int, shift: int) -> tvm.tirx.PrimFunc:
    """``y[..., i, ...] = x[..., (i + shift) % n, ...]`` as a TE-built PrimFunc."""
    # int64 extents, like the legalised operators whose index maps this one composes with
    extents = [tvm.tirx.IntImm("int64", d) for d in shape]
    x = te.placeholder(extents, dtype, name="x")

    def body(*idx):
        src = [rolled_index(i, shift, shape[axis]) if d == axis else i
               for d, i in enumerate(idx)]
        return x(*src)

    y = te.compute(extents, body, name="T_roll")
    return te.create_prim_func([x, y])


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.count = 0

    def _fields(self, tup: relax.Expr) -> list | None:
        if isinstance(tup, relax.Var):
            tup = self.lookup_binding(tup)
        return list(tup.fields) if isinstance(tup, relax.Tuple) else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.concat"):
            return call
        out_dims = shape_of(call)
        fields = self._fields(call.args[0])
        if out_dims is None or not fields or call.attrs.axis is None:
            return call
        axis = int(call.attrs.axis) % len(out_dims)
        slices = [_slice_range(self.lookup_binding(f) if isinstance(f, relax.Var) else f,
                               axis, out_dims[axis]) for f in fields]
        if any(s is None for s in slices):
            return call
        sources = {s[0] for s in slices}
        if len(sources) != 1:
            return call
        shift = rotation_shift([(b, e) for _, b, e in slices], out_dims[axis])
        if not shift:  # not a rotation, or the identity
            return call
        source = slices[0][0]
        func = roll_primfunc(out_dims, str(call.ty.dtype), axis, shift)
        gv = self.builder_.add_func(func, "roll")
        self.count += 1
        return relax.call_tir(gv, [source], call.ty)


def RecogniseRoll() -> tvm.transform.Pass:
    """Rewrite rotations written as concatenated slices into one index map (see module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="RecogniseRoll")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        counts = {}
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                before = rewriter.count
                new = rewriter.visit_expr(func)
                counts[gv] = (new, rewriter.count - before)
        out = rewriter.builder_.get()
        for gv, (new, count) in counts.items():
            out[gv] = new.with_attr(ROLLS_ATTR, count) if count else new
        return relax.transform.DeadCodeElimination()(out)

    return _pass

"""SplitToSlices: ``split(x)[i]`` becomes ``strided_slice(x, ...)``.

A split is one kernel with several outputs, each usually read by a different consumer (LeViT's
q / k / v, LLaMA's rotary halves).  Its fields cannot be folded into their consumers separately
as long as they come from one multi-output kernel; as slices they are ordinary single-output
fixed-layout operators that ``EliminateLayoutTransforms`` folds into each consumer's reads.
A split whose tuple is used whole (returned, passed on) is left alone.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


def _static_dims(ty) -> list[int] | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    values = getattr(ty.shape, "values", None)
    if values is None or any(not isinstance(d, tvm.tirx.IntImm) for d in values):
        return None
    return [int(d.value) for d in values]


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)

    def visit_tuple_getitem_(self, op: relax.TupleGetItem) -> relax.Expr:
        op = super().visit_tuple_getitem_(op)
        source = op.tuple_value
        if not isinstance(source, relax.Var):
            return op
        call = self.lookup_binding(source)
        if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
                and call.op.name == "relax.split"):
            return op
        fields = call.ty.fields if isinstance(call.ty, relax.TupleType) else None
        in_dims = _static_dims(call.args[0].ty)
        if fields is None or in_dims is None:
            return op
        axis = int(call.attrs.axis) % len(in_dims)
        sizes = [_static_dims(f) for f in fields]
        if any(s is None for s in sizes):
            return op
        begin = sum(s[axis] for s in sizes[: op.index])
        end = begin + sizes[op.index][axis]
        return relax.op.strided_slice(call.args[0], axes=[axis], begin=[begin], end=[end])


def SplitToSlices() -> tvm.transform.Pass:
    """Rewrite fields of ``relax.split`` into ``relax.strided_slice`` (see module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="SplitToSlices")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        out = mod.clone()
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                out[gv] = rewriter.visit_expr(func)
        return relax.transform.DeadCodeElimination()(out)

    return _pass

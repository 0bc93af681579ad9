"""RecogniseNormalization: ``(x - mean(x)) / sqrt(variance(x) + eps)`` becomes one layer_norm.

ONNX has no GroupNormalization before opset 18, so exporters write a diffusion model's
GroupNorm as ``InstanceNormalization`` over a grouped reshape, and TVM's importer decomposes
that into ``mean``, ``subtract``, ``variance``, ``add``, ``sqrt``, ``divide``.  Legalised, the
two statistics are two reduction kernels (``variance`` even recomputes the mean inside) and
the normalisation a third.  The same expression is exactly ``layer_norm`` over the reduced axes
with unit scale and zero shift -- one operator that TVM legalises as a single kernel computing
both statistics (and dlight schedules as one general reduction), whose element-wise epilogue
(the group affine, SiLU) the fusion planner can then attach.

Matched: ``divide(subtract(x, mean(x, A, keepdims)), sqrt(add(variance(x, A, keepdims), eps)))``
with the same ``x`` and axes ``A`` and a scalar constant ``eps``, static shapes.  Recorded as
``smartmem.normalizations`` on the function.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .math_rewrite import op_of, scalar_value, shape_of

NORMS_ATTR = "smartmem.normalizations"


def _axes(call) -> list[int] | None:
    if call.attrs is None or call.attrs.axis is None or not call.attrs.keepdims:
        return None
    rank = len(shape_of(call.args[0]) or ())
    return sorted(int(a) % rank for a in call.attrs.axis) if rank else None


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.count = 0

    def _bound(self, expr, name: str):
        """The call bound to ``expr`` when it is operator ``name``."""
        if isinstance(expr, relax.Var):
            expr = self.lookup_binding(expr)
        return expr if op_of(expr) == name else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if op_of(call) != "relax.divide":
            return call
        centred = self._bound(call.args[0], "relax.subtract")
        root = self._bound(call.args[1], "relax.sqrt")
        if centred is None or root is None:
            return call
        mean = self._bound(centred.args[1], "relax.mean")
        shifted = self._bound(root.args[0], "relax.add")
        if mean is None or shifted is None:
            return call
        var = self._bound(shifted.args[0], "relax.variance")
        eps = scalar_value(shifted.args[1])
        x = centred.args[0]
        if var is None or eps is None or not (mean.args[0].same_as(x) and var.args[0].same_as(x)):
            return call
        axes = _axes(mean)
        shape, dtype = shape_of(x), str(getattr(x.ty, "dtype", ""))
        if axes is None or axes != _axes(var) or shape is None or dtype not in (
                "float32", "float16"):
            return call
        norm_shape = [shape[a] for a in axes]
        ones = relax.const(np.ones(norm_shape, dtype), dtype)
        zeros = relax.const(np.zeros(norm_shape, dtype), dtype)
        self.count += 1
        return relax.op.nn.layer_norm(x, ones, zeros, axes, epsilon=float(eps))


def RecogniseNormalization() -> tvm.transform.Pass:
    """Rewrite decomposed normalisations into ``layer_norm`` (see module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="RecogniseNormalization")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        out = mod.clone()
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                before = rewriter.count
                new = rewriter.visit_expr(func)
                count = rewriter.count - before
                out[gv] = new.with_attr(NORMS_ATTR, count) if count else new
        return relax.transform.DeadCodeElimination()(out)

    return _pass

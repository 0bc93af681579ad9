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

A second rewrite then recognises the *group* norm around such a layer_norm::

    reshape(x[N, C, *S] -> [N, G, ...]) -> layer_norm(axes 2..) -> [* s] [+ b] -> reshape(-> x)

(``s``, ``b`` per group: InstanceNormalization's own affine) and writes it on the grouped view
``[N, G, C/G, prod(S)]`` as ``instance_norm`` (per-group statistics, ``s`` and ``b`` as its gamma /
beta), reshaped back to ``[N, C, *S]``.  Then the element-wise operators after that reshape
(the GroupNorm's per-channel affine, SiLU) move in front of it, their per-channel operands
reshaped to ``[G, C/G, 1]``: the reshape back to channels is a fixed-layout operator, which
the fusion planner never places after a many-to-many one inside a kernel, so left where it was
it cut the affine + SiLU into a kernel of their own; moved past them it becomes the next
operator's prologue (or a free view) and the whole GroupNorm + SiLU is one kernel.  The grouped
view matters on GPUs too: TVM's ``group_norm`` legalises with reshapes inside the kernel that
dlight's reduction rule does not take (it falls back to a serial schedule, 6x slower on the
H100), while ``instance_norm`` on the grouped view is a plain row reduction.  Recorded as
``smartmem.group_norms``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .math_rewrite import op_of, scalar_value, shape_of
from .partition import Block, bind_like, is_single_block, rebuild_function, substitute

NORMS_ATTR = "smartmem.normalizations"
GROUP_NORMS_ATTR = "smartmem.group_norms"


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


def _uses(func: relax.Function) -> dict:
    """How often each variable is read in ``func``."""
    counts: dict = {}

    def visit(expr):
        if isinstance(expr, relax.Call):
            for arg in expr.args:
                if isinstance(arg, relax.Var):
                    counts[arg] = counts.get(arg, 0) + 1
        elif isinstance(expr, relax.Tuple):
            for field in expr.fields:
                if isinstance(field, relax.Var):
                    counts[field] = counts.get(field, 0) + 1
        elif isinstance(expr, relax.TupleGetItem) and isinstance(expr.tuple_value, relax.Var):
            counts[expr.tuple_value] = counts.get(expr.tuple_value, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def _is_filled(expr, value: float) -> bool:
    return isinstance(expr, tvm.ir.GenericConst) and bool(np.all(expr.value.numpy() == value))


@mutator
class _GroupRewriter(PyExprMutator):
    """``reshape(affine(layer_norm(reshape(x))))`` back to ``x``'s shape -> ``group_norm``."""

    def __init__(self, mod: tvm.IRModule, uses: dict):
        super().__init__(mod)
        self.uses = uses
        self.count = 0

    def _single(self, expr, names: tuple[str, ...]):
        """The call bound to ``expr`` if it is one of ``names`` and read only here."""
        if not isinstance(expr, relax.Var) or self.uses.get(expr, 0) != 1:
            return None
        value = self.lookup_binding(expr)
        return value if op_of(value) in names else None

    def _per_group(self, expr, grouped: tuple[int, ...]) -> bool:
        """Is ``expr`` constant over everything but the group axis of ``grouped``?"""
        shape = shape_of(expr)
        if shape is None or len(shape) > len(grouped) or \
                str(getattr(expr.ty, "dtype", "")) != str(self._dtype):
            return False
        padded = (1,) * (len(grouped) - len(shape)) + tuple(shape)
        return padded[0] == 1 and padded[1] in (1, grouped[1]) and all(d == 1 for d in padded[2:])

    @staticmethod
    def _per_group_vector(expr, groups: int) -> relax.Expr:
        """``expr`` (per group, or one value) as a ``[G]`` vector."""
        flat = relax.op.reshape(expr, [-1])
        if int(np.prod(shape_of(expr) or (1,))) == 1:
            flat = relax.op.broadcast_to(flat, [groups])
        return flat

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if op_of(call) != "relax.reshape":
            return call
        node, scale, shift = call.args[0], None, None
        add = self._single(node, ("relax.add",))
        if add is not None:
            node, shift = add.args
        mul = self._single(node, ("relax.multiply",))
        if mul is not None:
            node, scale = mul.args
        norm = self._single(node, ("relax.nn.layer_norm",))
        if norm is None:
            return call
        grouped_in = norm.args[0]
        split = self._single(grouped_in, ("relax.reshape",))
        if split is None:
            return call
        x = split.args[0]
        shape, grouped = shape_of(x), shape_of(grouped_in)
        if shape is None or grouped is None or shape_of(call) != shape or len(shape) < 3 or \
                len(grouped) < 3 or grouped[0] != shape[0] or shape[1] % grouped[1]:
            return call
        self._dtype = str(getattr(x.ty, "dtype", ""))
        axes = sorted(int(a) % len(grouped) for a in norm.attrs.axes)
        if axes != list(range(2, len(grouped))) or not (
                _is_filled(norm.args[1], 1.0) and _is_filled(norm.args[2], 0.0)):
            return call
        if any(t is not None and not self._per_group(t, grouped) for t in (scale, shift)):
            return call
        groups, channels = grouped[1], shape[1]
        gamma = self._per_group_vector(scale, groups) if scale is not None else \
            relax.const(np.ones(groups, self._dtype), self._dtype)
        beta = self._per_group_vector(shift, groups) if shift is not None else \
            relax.const(np.zeros(groups, self._dtype), self._dtype)
        self.count += 1
        # spatial axes merged: the kernel's threads run along the last axis, which must be
        # long (a 5-D view would leave 16 of 256 threads busy on a 16-wide image row)
        view = (shape[0], groups, channels // groups, int(np.prod(shape[2:])))
        normed = self.builder_.emit(relax.op.nn.instance_norm(
            relax.op.reshape(x, view), gamma, beta, channel_axis=1,
            axes=list(range(2, len(view))), epsilon=float(norm.attrs.epsilon)))
        return relax.op.reshape(normed, shape)


UNARY = frozenset({"relax.sigmoid", "relax.tanh", "relax.nn.relu", "relax.nn.silu",
                   "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.exp", "relax.negative"})
BINARY = frozenset({"relax.add", "relax.subtract", "relax.multiply", "relax.divide",
                    "relax.maximum", "relax.minimum"})


def _grouped_view(binding, block: Block) -> tuple | None:
    """``(G, C/G)`` when ``binding`` reshapes a grouped instance_norm back to channels."""
    value = binding.value
    if op_of(value) != "relax.reshape" or not isinstance(value.args[0], relax.Var) or \
            value.args[0] not in block.index:
        return None
    source = block.bindings[block.index[value.args[0]]].value
    grouped, shape = shape_of(value.args[0]), shape_of(binding.var)
    if op_of(source) != "relax.nn.instance_norm" or grouped is None or shape is None or \
            len(grouped) != 4 or len(shape) < 3 or grouped[0] != shape[0] or \
            grouped[1] * grouped[2] != shape[1] or grouped[3] != int(np.prod(shape[2:])):
        return None
    return grouped[1], grouped[2]


def _grouped_operand(expr, shape: tuple, groups: tuple) -> relax.Expr | None:
    """A per-channel (or single-value) operand of a ``[N, C, *S]`` element-wise op, as the
    matching operand on the ``[N, G, C/G, prod(S)]`` view; None when it varies along other
    axes."""
    own = shape_of(expr)
    if own is None or len(own) > len(shape):
        return None
    padded = (1,) * (len(shape) - len(own)) + tuple(own)
    if padded[0] != 1 or any(d != 1 for d in padded[2:]):
        return None
    if padded[1] == 1:
        return expr
    if padded[1] != shape[1]:
        return None
    return relax.op.reshape(expr, (*groups, 1))


def _sink_reshapes(mod: tvm.IRModule, name: str) -> tvm.IRModule:
    """Move element-wise operators after a grouped norm's reshape back in front of it."""
    func = mod[name]
    if not is_single_block(func):
        return mod
    block = Block.of(func)

    def emit(bb: relax.BlockBuilder, mapping: dict) -> None:
        view: dict = {}  # old var -> (its grouped value, groups)
        for binding in block.bindings:
            value = substitute(binding.value, mapping)
            groups = _grouped_view(binding, block)
            if groups is not None:
                bind_like(bb, binding.var, value, mapping)
                view[binding.var] = (value.args[0], groups)
                continue
            grouped = _grouped_call(binding, mapping, view)
            if grouped is None:
                bind_like(bb, binding.var, value, mapping)
                continue
            new, groups = grouped
            moved = bb.emit(new, name_hint=binding.var.name + "_grouped")
            bind_like(bb, binding.var, relax.op.reshape(moved, shape_of(binding.var)), mapping)
            view[binding.var] = (moved, groups)

    return rebuild_function(mod, name, "sink", emit)


def _grouped_call(binding, mapping: dict, view: dict) -> tuple | None:
    """The element-wise ``binding`` on the grouped view of its operands, with their groups."""
    value, shape = binding.value, shape_of(binding.var)
    op = op_of(value)
    if shape is None or op not in UNARY | BINARY or (op in UNARY and value.attrs is not None
                                                     and op != "relax.nn.gelu"):
        return None
    groups = {view[a][1] for a in value.args if a in view}
    if len(groups) != 1:
        return None
    (group,) = groups
    args = []
    for arg in value.args:
        if arg in view:
            args.append(view[arg][0])
            continue
        operand = _grouped_operand(arg, shape, group)
        if operand is None:
            return None
        args.append(substitute(operand, mapping))
    return relax.Call(value.op, args, value.attrs), group


def RecogniseNormalization() -> tvm.transform.Pass:
    """Rewrite decomposed normalisations into ``layer_norm``, grouped ones around it into
    ``group_norm`` (see module doc)."""

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
        out = relax.transform.DeadCodeElimination()(out)
        final = out.clone()
        for gv, func in out.functions_items():
            if isinstance(func, relax.Function) and func.attrs is not None and \
                    NORMS_ATTR in func.attrs:
                groups = _GroupRewriter(out, _uses(func))
                new = groups.visit_expr(func)
                if groups.count:
                    final[gv] = new.with_attr(GROUP_NORMS_ATTR, groups.count)
                    final = _sink_reshapes(
                        relax.transform.CanonicalizeBindings()(final), gv.name_hint)
        return relax.transform.DeadCodeElimination()(final)

    return _pass

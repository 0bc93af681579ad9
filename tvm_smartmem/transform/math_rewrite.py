"""MathPropertyRewrite: DNNFusion's FLOP-reducing rewrites by associativity, commutativity and
distributivity, applied greedily by FLOPs saved until nothing applies.

Every rule is a small pure function that looks at one binding (and the single-use bindings that
feed it) and either returns a :class:`Rewrite` -- the expression to bind instead and the FLOPs it
saves -- or ``None``.  A rule only fires where the operators involved have the property it relies
on (the flags of ``analysis.classify``) and where the intermediate it removes has no other user,
so it never duplicates work; operators the classifier does not know never take part.

==========================  ===============================================  ================
rule                        rewrite                                          property
==========================  ===============================================  ================
``permute_chain``           ``permute(permute(x, p), q) -> permute(x, p∘q)``  composition
``reshape_chain``           ``reshape(reshape(x)) -> reshape(x)``             composition
``reshape_through_matmul``  ``reshape(flat(x) @ W) -> x @ W``                 matmul batches
``reshape_into_matmul``     ``reshape(x @ W) -> reshape(x) @ W``              matmul batches
``scalar_through_matmul``   ``(a @ b) * s -> (a * s) @ b`` (smaller operand)  matmul linear
``scale_to_producer``       ``layout(t) * s -> layout(t * s)``                data movement
``factor_common``           ``x*a + x*b -> x*(a + b)``; ``x@A + x@B -> x@(A+B)``  distributive
``group_small_operands``    ``(x * c1) * c2 -> x * (c1 * c2)`` (also ``+``)   assoc. + comm.
``exp_product``             ``exp(a) * exp(b) -> exp(a + b)``; ``prod(exp x)  exp homomorphism
                            -> exp(sum x)``
``reciprocal_sqrt``         ``x / sqrt(y) -> x * rsqrt(y)``; ``x / c -> x * (1/c)``  --
``small_power``             ``x ** 2 -> x * x``, ``x ** 3``, ``x ** 0.5 -> sqrt(x)``  --
``double_negation``         ``-(-x) -> x``                                    --
==========================  ===============================================  ================

FLOPs are counted per output element with weights for the expensive operations (division and
square roots 4, exponentials / logarithms / powers 8, matmul 2·M·N·K); data movement counts 1 per
element, so a composed permutation saves a copy.  Where a scalar goes is also decided by the
kernel it lands in (DNNFusion counts FLOPs only; this is our extension): next to a computing
producer it joins that kernel's epilogue for free, next to moved data (a head of a split QKV,
a graph input) it is a kernel of its own, costed as a launch plus a read and a write of every
element (:data:`MEMORY`, :data:`LAUNCH`).  So the attention scale moves to the queries where
they come from their own projection (BERT), and stays on -- or moves to -- the scores where
they come from a fused QKV projection (GPT-2, timm's ViT).

Reassociating changes rounding, never values beyond the fp32 tolerances of
``tvm_smartmem.numerics`` (the tests check it on every rule).

The pass records ``smartmem.rewrites`` (rule -> count) and ``smartmem.flops_removed`` on the
function for ``tvm-smartmem report``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax, tirx

from ..analysis.classify import OPAQUE, MappingType, classify_call
from .partition import (
    Block,
    bind_like,
    for_each_function,
    is_single_block,
    rebuild_function,
    substitute,
    use_counts,
)

REWRITES_ATTR = "smartmem.rewrites"
FLOPS_ATTR = "smartmem.flops_removed"

_COST = {"divide": 4, "sqrt": 4, "rsqrt": 4, "exp": 8, "log": 8, "power": 8}
_RESHAPES = ("relax.reshape", "relax.squeeze", "relax.expand_dims", "relax.flatten")
#: operators that only move data: an elementwise op reading them cannot join their kernel
_MOVES = ("relax.permute_dims", *_RESHAPES, "relax.strided_slice", "relax.split",
          "relax.concat", "relax.take", "relax.layout_transform", "relax.broadcast_to")
#: an fp32 element read or written through memory, in weighted FLOPs (a standalone elementwise
#: kernel reads and writes each element; fused into an epilogue it does neither)
MEMORY = 8
#: a kernel launch, in weighted FLOPs
LAUNCH = 1 << 15


# -- facts about expressions ---------------------------------------------------------------


def shape_of(expr: relax.Expr) -> tuple[int, ...] | None:
    """Static shape of a tensor expression, None when unknown or symbolic."""
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    values = getattr(ty.shape, "values", None)
    if values is None or any(not isinstance(d, tirx.IntImm) for d in values):
        return None
    return tuple(int(d.value) for d in values)


def numel(expr: relax.Expr) -> int | None:
    shape = shape_of(expr)
    return None if shape is None else math.prod(shape)


def dtype_of(expr: relax.Expr) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def scalar_value(expr: relax.Expr) -> float | None:
    """The value of a one-element constant, else None."""
    if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.ty, relax.TensorType):
        data = expr.value.numpy()
        if data.size == 1 and data.dtype.kind == "f":
            return float(data.reshape(()))
    return None


def op_of(expr: relax.Expr) -> str | None:
    return expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) \
        else None


def _broadcast(*shapes: tuple[int, ...] | None) -> tuple[int, ...] | None:
    if any(s is None for s in shapes):
        return None
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        return None


# -- the context rules read ------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """Definitions and use counts of one dataflow block."""

    defs: dict  # Var -> bound value
    uses: dict  # Var -> number of uses (the function's result counts as a use)
    readers: dict = dataclasses.field(default_factory=dict)  # Var -> values reading it
    var_of: dict = dataclasses.field(default_factory=dict)  # bound value -> its Var

    def single(self, expr: relax.Expr, *ops: str) -> relax.Call | None:
        """The call defining ``expr`` when it is one of ``ops``, known to the classifier and
        used only once (so removing it removes work rather than duplicating it)."""
        if not isinstance(expr, relax.DataflowVar) or self.uses.get(expr, 0) != 1:
            return None
        value = self.defs.get(expr)
        if op_of(value) not in ops or classify_call(value) is OPAQUE:
            return None
        return value


    def joins_producer(self, expr: relax.Expr) -> bool:
        """Would an elementwise op that is ``expr``'s only reader join the kernel computing
        ``expr`` (as its epilogue)?  Not when ``expr`` is a parameter, a tuple field, or data
        moved by a layout operator (those fold into their readers, so the elementwise op would
        be a kernel of its own), nor when something else reads ``expr`` too."""
        if not isinstance(expr, relax.DataflowVar) or self.uses.get(expr, 0) != 1:
            return False
        value = self.defs.get(expr)
        if not isinstance(value, relax.Call) or op_of(value) in _MOVES:
            return False
        cls = classify_call(value)
        return cls is not OPAQUE and not cls.quadrant.fixed


@dataclasses.dataclass
class Rewrite:
    rule: str
    saved: float  # estimated work removed (weighted FLOPs, memory traffic and launches)
    expr: relax.Expr  # replaces the binding's value (may nest calls; emitted in order)
    consumed: tuple = ()  # single-use bindings the rewrite makes dead
    flops: float | None = None  # arithmetic removed, when it differs from ``saved``

    @property
    def flops_removed(self) -> float:
        return self.saved if self.flops is None else self.flops


def standalone_kernel(elements: int) -> float:
    """The work of an elementwise kernel of its own: each element read and written, a launch."""
    return 2 * MEMORY * elements + LAUNCH


Rule = Callable[[relax.Call, Context], Rewrite | None]


def _cost(op: str) -> int:
    return _COST.get(op.removeprefix("relax."), 1)


# -- rules ------------------------------------------------------------------------------------


def permute_chain(call: relax.Call, ctx: Context) -> Rewrite | None:
    if op_of(call) != "relax.permute_dims":
        return None
    inner = ctx.single(call.args[0], "relax.permute_dims")
    rank = len(shape_of(call) or ())
    if inner is None or not rank:
        return None

    def axes(c):
        return [int(a) for a in c.attrs.axes] if c.attrs.axes is not None \
            else list(range(rank))[::-1]

    outer_axes, inner_axes = axes(call), axes(inner)
    composed = [inner_axes[a] for a in outer_axes]
    source = inner.args[0]
    expr = source if composed == list(range(rank)) else relax.op.permute_dims(source, composed)
    return Rewrite("permute_chain", numel(call) or 1, expr, (call.args[0],))


def reshape_chain(call: relax.Call, ctx: Context) -> Rewrite | None:
    if op_of(call) not in _RESHAPES:
        return None
    inner = ctx.single(call.args[0], *_RESHAPES)
    out = shape_of(call)
    if inner is None or out is None:
        return None
    source = inner.args[0]
    expr = source if shape_of(source) == out else relax.op.reshape(source, out)
    return Rewrite("reshape_chain", numel(call) or 1, expr, (call.args[0],))


def scalar_through_matmul(call: relax.Call, ctx: Context) -> Rewrite | None:
    """A scalar factor goes to whichever side of a matmul is smallest (the attention scale
    moves from the S x S scores to the S x d queries)."""
    name = op_of(call)
    if name in ("relax.multiply", "relax.divide"):
        # (a @ b) op s  ->  (a op s) @ b  or  a @ (b op s)
        for k in ((0, 1) if name == "relax.multiply" else (0,)):
            mm, s = call.args[k], call.args[1 - k]
            inner = ctx.single(mm, "relax.matmul")
            if inner is None or numel(s) != 1 or not classify_call(inner).distributive:
                continue
            a, b = inner.args
            sizes = [numel(a), numel(b), numel(call)]
            if None in sizes:
                continue
            for side in sorted((0, 1), key=lambda i: sizes[i]):
                if sizes[side] >= sizes[2]:
                    break
                scaled, chain, root = _scale_at_root(inner.args[side], s, call, ctx)
                if not ctx.joins_producer(root):
                    # on the scores the scale is free in the matmul's epilogue; on a tensor
                    # that is moved data (a head of a split QKV) it would be a kernel of its own
                    continue
                args = [scaled, b] if side == 0 else [a, scaled]
                expr = relax.Call(inner.op, args, inner.attrs)
                return Rewrite("scalar_through_matmul",
                               (sizes[2] - sizes[side]) * _cost(name), expr, (mm, *chain))
    if name == "relax.matmul" and classify_call(call).distributive:
        # (a op s) @ b  ->  (a @ b) op s   when a is larger than the result
        for k in (0, 1):
            scaled = ctx.single(call.args[k], "relax.multiply", "relax.divide")
            if scaled is None:
                continue
            op_name = op_of(scaled)
            for j in ((0, 1) if op_name == "relax.multiply" else (0,)):
                x, s = scaled.args[j], scaled.args[1 - j]
                if numel(s) != 1 or None in (numel(x), numel(call)) or \
                        shape_of(x) != shape_of(scaled):
                    continue
                flops = (numel(x) - numel(call)) * _cost(op_name)
                # the scale of moved data is a kernel of its own; after the matmul it joins
                # the epilogue (the q * s and k * s of an exported scaled_dot_product_attention)
                saved = flops if ctx.joins_producer(x) else flops + standalone_kernel(numel(x))
                if saved <= 0:
                    continue
                args = list(call.args)
                args[k] = x
                expr = relax.Call(scaled.op, [relax.Call(call.op, args, call.attrs), s],
                                  scaled.attrs)
                return Rewrite("scalar_through_matmul", saved, expr, (call.args[k],), flops)
    return None


def _scale_at_root(operand: relax.Expr, s: relax.Expr, scale: relax.Call,
                   ctx: Context) -> tuple[relax.Expr, tuple, relax.Expr]:
    """``operand op s``, with the scaling moved above the single-use layout operators that
    produce ``operand`` (an elementwise scalar commutes with any data movement): the queries'
    scale then lands in the Q projection's epilogue instead of becoming a kernel between the
    head split and the attention matmul.  Returns the expression, the bypassed bindings and
    the tensor the scale now applies to."""
    chain: list[relax.Call] = []
    names: list = []
    root = operand
    while (layout := ctx.single(root, "relax.permute_dims", *_RESHAPES)) is not None:
        chain.append(layout)
        names.append(root)
        root = layout.args[0]
    expr = relax.Call(scale.op, [root, s], scale.attrs)
    for layout in reversed(chain):
        expr = relax.Call(layout.op, [expr, *layout.args[1:]], layout.attrs)
    return expr, tuple(names), root


def _reshaped_matmul(call: relax.Call, ctx: Context) -> relax.Call | None:
    """The matmul ``call`` reshapes, when it is read by nothing else."""
    if op_of(call) not in _RESHAPES:
        return None
    return ctx.single(call.args[0], "relax.matmul")


def _epilogue_reader(value: relax.Expr) -> bool:
    """Would ``value`` be an epilogue of the kernel producing what it reads (elementwise,
    possibly broadcasting, computing -- not data movement, not a reduction)?"""
    if not isinstance(value, relax.Call) or op_of(value) in _MOVES:
        return False
    cls = classify_call(value)
    return cls is not OPAQUE and not cls.quadrant.fixed and \
        cls.mapping in (MappingType.ONE_TO_ONE, MappingType.ONE_TO_MANY)


def reshape_into_matmul(call: relax.Call, ctx: Context) -> Rewrite | None:
    """``reshape(x @ W, S) -> reshape(x, S[:-1] + (K,)) @ W`` for a 2-D ``W`` when the reshape
    keeps the last axis (it only merges or splits the leading, batch-like dimensions).  A
    reshape between a matmul and the elementwise ops after it (LeViT's Linear -> flatten ->
    BatchNorm) keeps them out of the matmul's epilogue; before the matmul it folds into the
    matmul's reads.  Same data, one kernel fewer."""
    mm = _reshaped_matmul(call, ctx)
    if mm is None:
        return None
    x, w = mm.args
    xs, ws, out = shape_of(x), shape_of(w), shape_of(call)
    if None in (xs, ws, out) or len(ws) != 2 or len(xs) < 2 or len(out) < 2 or \
            out[-1] != ws[1] or math.prod(out[:-1]) != math.prod(xs[:-1]):
        return None
    if not any(_epilogue_reader(r) for r in ctx.readers.get(ctx.var_of.get(call), [])):
        return None
    flat = relax.op.reshape(x, (*out[:-1], xs[-1]))
    return Rewrite("reshape_into_matmul", standalone_kernel(numel(call)),
                   relax.Call(mm.op, [flat, w], mm.attrs), (call.args[0],), 0)


def scale_to_producer(call: relax.Call, ctx: Context) -> Rewrite | None:
    """``layout(t) * s -> layout(t * s)``: a scalar applied to moved data (the heads of a
    projection) would be a kernel of its own; moved above the layout operators it joins the
    epilogue of the kernel that computes ``t``.  Same FLOPs, one kernel and a round trip
    through memory fewer."""
    name = op_of(call)
    if name not in ("relax.multiply", "relax.divide"):
        return None
    for k in ((0, 1) if name == "relax.multiply" else (0,)):
        x, s = call.args[k], call.args[1 - k]
        if numel(s) != 1 or shape_of(x) is None or shape_of(x) != shape_of(call) or \
                ctx.single(x, "relax.permute_dims", *_RESHAPES) is None:
            continue
        expr, chain, root = _scale_at_root(x, s, call, ctx)
        if not ctx.joins_producer(root):
            continue
        return Rewrite("scale_to_producer", standalone_kernel(numel(x)), expr, chain, 0)
    return None


def reshape_through_matmul(call: relax.Call, ctx: Context) -> Rewrite | None:
    """``reshape(reshape(x, (R, K)) @ W, x.shape[:-1] + (N,)) -> x @ W`` for a 2-D ``W``: a
    matmul broadcasts over leading dimensions, so flattening them around it (how torch's
    Conv1D / addmm export) only moves data -- and the reshape after the matmul would keep the
    bias / residual / activation that follow out of the matmul's epilogue."""
    mm = _reshaped_matmul(call, ctx)
    if mm is None:
        return None
    a, w = mm.args
    flat = ctx.single(a, *_RESHAPES)
    if flat is None:
        return None
    x = flat.args[0]
    xs, fs, ws, out = shape_of(x), shape_of(a), shape_of(w), shape_of(call)
    if None in (xs, fs, ws, out) or len(ws) != 2 or len(fs) != 2 or len(xs) < 2:
        return None
    if xs[-1] != fs[1] or math.prod(xs[:-1]) != fs[0] or out != (*xs[:-1], ws[1]):
        return None
    moved = numel(a) + numel(call)
    return Rewrite("reshape_through_matmul", moved, relax.Call(mm.op, [x, w], mm.attrs),
                   (call.args[0], a))


def factor_common(call: relax.Call, ctx: Context) -> Rewrite | None:
    """Distributivity: a common factor of two products is applied once."""
    name = op_of(call)
    if name not in ("relax.add", "relax.subtract"):
        return None
    p = ctx.single(call.args[0], "relax.multiply", "relax.matmul")
    q = ctx.single(call.args[1], "relax.multiply", "relax.matmul")
    if p is None or q is None or op_of(p) != op_of(q) or not classify_call(p).distributive:
        return None
    out = shape_of(call)
    if op_of(p) == "relax.multiply":
        for i in (0, 1):
            for j in (0, 1):
                x, a, b = p.args[i], p.args[1 - i], q.args[1 - j]
                if not x.same_as(q.args[j]):
                    continue
                inner = _broadcast(shape_of(a), shape_of(b))
                if inner is None or _broadcast(shape_of(x), inner) != out:
                    continue
                expr = relax.op.multiply(x, relax.Call(call.op, [a, b], call.attrs))
                saved = numel(p) + numel(q) - math.prod(inner)  # two products -> one
                return Rewrite("factor_common", saved, expr, (call.args[0], call.args[1]))
        return None
    # matmul: x@A + x@B -> x@(A+B);  X@A + Y@A -> (X+Y)@A  (operands of equal shapes)
    for shared in (0, 1):
        other = 1 - shared
        if p.args[shared].same_as(q.args[shared]) and \
                shape_of(p.args[other]) is not None and \
                shape_of(p.args[other]) == shape_of(q.args[other]) and \
                shape_of(p) == shape_of(q) == out:
            summed = relax.Call(call.op, [p.args[other], q.args[other]], call.attrs)
            args = [None, None]
            args[shared], args[other] = p.args[shared], summed
            k = (shape_of(p.args[0]) or (1,))[-1]
            saved = 2 * math.prod(out) * k - math.prod(shape_of(p.args[other]))
            return Rewrite("factor_common", saved, relax.Call(p.op, args, p.attrs),
                           (call.args[0], call.args[1]))
    return None


def group_small_operands(call: relax.Call, ctx: Context) -> Rewrite | None:
    """Associativity + commutativity: combine the two small operands of a chain first."""
    name = op_of(call)
    if name not in ("relax.add", "relax.multiply"):
        return None
    cls = classify_call(call)
    if not (cls.associative and cls.commutative):
        return None
    for k in (0, 1):
        inner = ctx.single(call.args[k], name)
        c2 = call.args[1 - k]
        if inner is None:
            continue
        for j in (0, 1):
            x, c1 = inner.args[j], inner.args[1 - j]
            sizes = (numel(x), numel(c1), numel(c2), numel(call))
            if None in sizes or sizes[1] >= sizes[0] or sizes[2] >= sizes[3]:
                continue
            small = _broadcast(shape_of(c1), shape_of(c2))
            if small is None or _broadcast(shape_of(x), small) != shape_of(call) or \
                    dtype_of(c1) != dtype_of(c2):
                continue
            expr = relax.Call(call.op, [x, relax.Call(call.op, [c1, c2], call.attrs)],
                              call.attrs)
            return Rewrite("group_small_operands", numel(inner) - math.prod(small), expr,
                           (call.args[k],))
    return None


def exp_product(call: relax.Call, ctx: Context) -> Rewrite | None:
    name = op_of(call)
    if name in ("relax.multiply", "relax.divide"):
        a, b = (ctx.single(x, "relax.exp") for x in call.args)
        if a is None or b is None or None in (numel(a), numel(b), numel(call)):
            return None
        combine = relax.op.add if name == "relax.multiply" else relax.op.subtract
        saved = 8 * (numel(a) + numel(b) - numel(call))
        if saved <= 0:
            return None
        return Rewrite("exp_product", saved, relax.op.exp(combine(a.args[0], b.args[0])),
                       tuple(call.args))
    if name == "relax.prod":
        inner = ctx.single(call.args[0], "relax.exp")
        if inner is None or None in (numel(inner), numel(call)):
            return None
        summed = relax.op.sum(inner.args[0], call.attrs.axis, call.attrs.keepdims)
        return Rewrite("exp_product", 8 * (numel(inner) - numel(call)), relax.op.exp(summed),
                       (call.args[0],))
    return None


def reciprocal_sqrt(call: relax.Call, ctx: Context) -> Rewrite | None:
    if op_of(call) != "relax.divide" or not (dtype_of(call) or "").startswith("float"):
        return None
    x, y = call.args
    root = ctx.single(y, "relax.sqrt")
    if root is not None and shape_of(call) is not None:
        rsqrt = relax.op.rsqrt(root.args[0])
        if scalar_value(x) == 1.0 and shape_of(root) == shape_of(call):  # 1 / sqrt(y)
            return Rewrite("reciprocal_sqrt", 4 * numel(call), rsqrt, (y,))
        return Rewrite("reciprocal_sqrt", 3 * numel(call), relax.op.multiply(x, rsqrt), (y,))
    c = scalar_value(y)
    if c is not None and c != 0.0 and math.isfinite(1.0 / c) and numel(call):
        inverse = relax.const(np.array(1.0 / c, dtype=dtype_of(y)).reshape(shape_of(y)))
        return Rewrite("reciprocal_sqrt", 3 * numel(call), relax.op.multiply(x, inverse))
    return None


def small_power(call: relax.Call, ctx: Context) -> Rewrite | None:
    if op_of(call) != "relax.power" or not numel(call):
        return None
    x, e = call.args
    c = scalar_value(e)
    if c is None or shape_of(x) != shape_of(call) or dtype_of(x) != dtype_of(call):
        return None
    if c == 1.0:
        expr, after = x, 0
    elif c == 2.0:
        expr, after = relax.op.multiply(x, x), 1
    elif c == 3.0:
        expr, after = relax.op.multiply(relax.op.multiply(x, x), x), 2
    elif c == 0.5:
        expr, after = relax.op.sqrt(x), 4
    else:
        return None
    return Rewrite("small_power", (8 - after) * numel(call), expr)


def double_negation(call: relax.Call, ctx: Context) -> Rewrite | None:
    if op_of(call) != "relax.negative":
        return None
    inner = ctx.single(call.args[0], "relax.negative")
    if inner is None:
        return None
    return Rewrite("double_negation", 2 * (numel(call) or 1), inner.args[0], (call.args[0],))


RULES: tuple[Rule, ...] = (permute_chain, reshape_chain, reshape_through_matmul,
                           reshape_into_matmul, scalar_through_matmul, scale_to_producer,
                           factor_common, group_small_operands, exp_product, reciprocal_sqrt,
                           small_power, double_negation)


# -- driver -----------------------------------------------------------------------------------


def _context(func: relax.Function, block: Block) -> Context:
    defs = {b.var: b.value for b in block.bindings}
    readers: dict = {}
    for b in block.bindings:
        for v in relax.analysis.free_vars(b.value):
            readers.setdefault(v, []).append(b.value)
    return Context(defs, use_counts(func), readers, {b.value: b.var for b in block.bindings})


def candidates(func: relax.Function, rules: tuple[Rule, ...] = RULES) -> list[tuple]:
    """(binding var, rewrite) for every rule that fires, best saving first."""
    if not is_single_block(func):
        return []  # e.g. every binding rewritten away: nothing left to rewrite
    block = Block.of(func)
    ctx = _context(func, block)
    found = []
    for b in block.bindings:
        if not isinstance(b.value, relax.Call) or classify_call(b.value) is OPAQUE:
            continue
        for rule in rules:
            rewrite = rule(b.value, ctx)
            if rewrite is not None and rewrite.saved > 0:
                found.append((b.var, rewrite))
                break
    return sorted(found, key=lambda vr: -vr[1].saved)


def _emit_nested(bb: relax.BlockBuilder, expr: relax.Expr, mapping: dict) -> relax.Expr:
    """A rewrite's expression with its variables renamed through ``mapping`` and its inner
    calls emitted as bindings of their own (A-normal form); the outermost call is returned."""
    if isinstance(expr, relax.Var):
        return mapping.get(expr, expr)
    if not isinstance(expr, relax.Call):
        return expr
    args = [bb.emit(_emit_nested(bb, a, mapping)) if isinstance(a, relax.Call)
            else _emit_nested(bb, a, mapping) for a in expr.args]
    return relax.Call(expr.op, args, expr.attrs, expr.ty_args)


def _apply(mod: tvm.IRModule, func_name: str, chosen: dict) -> tvm.IRModule:
    block = Block.of(mod[func_name])

    def emit(bb: relax.BlockBuilder, mapping: dict) -> None:
        for b in block.bindings:
            rewrite = chosen.get(b.var)
            value = _emit_nested(bb, rewrite.expr, mapping) if rewrite \
                else substitute(b.value, mapping)
            if isinstance(b.var, relax.DataflowVar) and isinstance(value, relax.Var):
                mapping[b.var] = value  # an identity: uses read the source
                continue
            bind_like(bb, b.var, value, mapping)

    return rebuild_function(mod, func_name, "rewrite", emit)


def rewrite_function(mod: tvm.IRModule, func_name: str = "main", max_rounds: int = 32,
                     rules: tuple[Rule, ...] = RULES) -> tvm.IRModule:
    """Greedy fixed point: each round applies the non-overlapping rewrites best saving first."""
    if not is_single_block(mod[func_name]):
        return mod  # not a single dataflow block: nothing we understand
    counts: dict[str, int] = {}
    saved = 0.0
    for _ in range(max_rounds):
        found = candidates(mod[func_name], rules)
        if not found:
            break
        chosen: dict = {}
        touched: set = set()
        for var, rewrite in found:
            parts = {var, *rewrite.consumed}
            if parts & touched:
                continue
            touched |= parts
            chosen[var] = rewrite
            counts[rewrite.rule] = counts.get(rewrite.rule, 0) + 1
            saved += rewrite.flops_removed
        mod = relax.transform.DeadCodeElimination()(_apply(mod, func_name, chosen))
    if counts:  # identities left ``y = x`` bindings; DCE drops what the rewrites made dead
        mod = relax.transform.CanonicalizeBindings()(mod)
        mod = relax.transform.DeadCodeElimination()(mod)
    previous, flops_before = rewrites_of(mod[func_name])  # a second run adds to the first
    for k, v in previous.items():
        counts[k] = counts.get(k, 0) + v
    saved += flops_before
    mod[func_name] = mod[func_name].with_attr(REWRITES_ATTR, counts) \
        .with_attr(FLOPS_ATTR, tvm.tirx.IntImm("int64", int(saved)))
    return mod


def MathPropertyRewrite(func_name: str | None = None) -> tvm.transform.Pass:
    """FLOP-reducing algebraic rewrites to a fixed point (see the module docstring), in every
    graph function (or ``func_name`` alone)."""

    @tvm.transform.module_pass(opt_level=0, name="MathPropertyRewrite")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return for_each_function(mod, func_name, rewrite_function)

    return _pass


def rewrites_of(func: relax.Function) -> tuple[dict[str, int], int]:
    """(rule -> count, FLOPs removed) recorded by the pass, empty when it did not run."""
    if not func.attrs or REWRITES_ATTR not in func.attrs:
        return {}, 0
    counts = {str(k): int(v) for k, v in func.attrs[REWRITES_ATTR].items()}
    return counts, int(func.attrs[FLOPS_ATTR]) if FLOPS_ATTR in func.attrs else 0

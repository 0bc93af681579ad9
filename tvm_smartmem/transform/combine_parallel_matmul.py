"""CombineParallelMatmuls: matmuls that share their input and multiply it by weights become one.

DNNFusion fuses vertically (producer into consumer); the projections of attention -- query, key
and value of BERT, CLIP and the UNet's cross attention, LLaMA's q / k / v and gate / up -- are
*horizontal* siblings: ``x @ Wq``, ``x @ Wk``, ``x @ Wv`` read the same ``x`` and nothing
connects them, so no vertical plan merges them and each stays a GEMM kernel of its own (with its
bias and scale epilogue).  Side by side they are one GEMM with the weights concatenated along
N, which is one kernel instead of three and a wider, better-utilised GEMM::

    q = (x @ Wq + bq) * s        y = x @ concat(Wq * s, Wk, Wv) + concat(bq * s, bk, bv)
    k =  x @ Wk + bk       ->    q = y[..., :Nq]   k = y[..., Nq:Nq+Nk]   v = y[..., Nq+Nk:]
    v =  x @ Wv + bv

The slices are pure index maps that ``EliminateLayoutTransforms`` folds into each consumer.

The concatenation must not cost a copy per inference, so a branch is combined only when its
weight, bias and scale are *weights*: derived from the function's parameters beyond
``num_input`` (the model weights, see ``frontend``) or from constants.  ``LiftWeightTransforms``
then moves ``concat`` / ``* s`` into the load-time function, and the inference runs one GEMM.
A scalar-constant scale after a branch (BERT's ``1/sqrt(d)`` on the queries, where
``MathPropertyRewrite`` puts it) is folded into that branch's weight and bias -- by linearity,
free once lifted.  Branches differing in dtype, reduction size or weight rank never combine; a
branch output that is a function output, or read by more than the next step of the chain, keeps
that step out of the combined epilogue.

Records ``smartmem.combined_matmuls`` (the number of GEMMs removed) on the function.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax

from .math_rewrite import op_of, scalar_value, shape_of
from .partition import (
    Block,
    bind_like,
    for_each_function,
    function_attrs,
    is_single_block,
    rebuild_function,
    substitute,
)

COMBINED_ATTR = "smartmem.combined_matmuls"


def weight_vars(func: relax.Function, block: Block) -> set:
    """Variables computed from the weights alone: the parameters after ``num_input`` and every
    binding whose free variables are all such (constants are weights too).  Without
    ``num_input`` every parameter is a runtime input and only constant-derived values count."""
    attrs = func.attrs or {}
    weights: set = set()
    if "num_input" in attrs:
        weights.update(func.params[int(attrs["num_input"]):])
    for b in block.bindings:
        if isinstance(b.value, relax.Call) and \
                all(v in weights for v in relax.analysis.free_vars(b.value)):
            weights.add(b.var)
    return weights


def _is_weight(expr, weights: set) -> bool:
    if isinstance(expr, tvm.ir.GenericConst):
        return True
    return isinstance(expr, relax.Var) and expr in weights


@dataclasses.dataclass
class Branch:
    """One ``x @ W [+ b] [* s]`` chain; ``members`` are its binding indices, ``out`` the var its
    users read."""

    x: relax.Var
    weight: relax.Expr
    n: int
    bias: relax.Expr | None
    scale: tvm.ir.GenericConst | None
    members: list[int]
    out: relax.Var


def _single_next(block: Block, i: int) -> int | None:
    """The only user of binding ``i``, when it has exactly one and is no function output."""
    users = block.users[i]
    if len(users) != 1 or block.bindings[i].var in block.output_vars:
        return None
    return next(iter(users))


def _other(call: relax.Call, var: relax.Var):
    a, b = call.args
    return b if a.same_as(var) else a if b.same_as(var) else None


def find_branch(block: Block, i: int, weights: set) -> Branch | None:
    """The combinable chain starting at binding ``i`` (a matmul by a 2-D weight), or None."""
    b = block.bindings[i]
    if op_of(b.value) != "relax.matmul":
        return None
    x, w = b.value.args
    xd, wd = shape_of(x), shape_of(w)
    if not isinstance(x, relax.Var) or x in weights or not _is_weight(w, weights) \
            or xd is None or wd is None or len(wd) != 2 or len(xd) < 2:
        return None
    n = wd[1]
    members, out, bias, scale = [i], b.var, None, None
    nxt = _single_next(block, i)
    if nxt is not None and op_of(block.bindings[nxt].value) == "relax.add":
        other = _other(block.bindings[nxt].value, out)
        od = shape_of(other) if other is not None else None
        if other is not None and _is_weight(other, weights) and od is not None \
                and od[-1:] == (n,) and all(d == 1 for d in od[:-1]) \
                and len(od) <= len(xd):
            bias, out = other, block.bindings[nxt].var
            members.append(nxt)
            nxt = _single_next(block, nxt)
    if nxt is not None and op_of(block.bindings[nxt].value) == "relax.multiply":
        other = _other(block.bindings[nxt].value, out)
        if other is not None and scalar_value(other) is not None and \
                other.ty.dtype == b.var.ty.dtype:
            scale, out = other, block.bindings[nxt].var
            members.append(nxt)
    return Branch(x, w, n, bias, scale, members, out)


def _key(block: Block, br: Branch) -> tuple:
    call = block.bindings[br.members[0]].value
    return (br.x, shape_of(br.weight)[0], br.weight.ty.dtype, str(call.attrs.out_dtype))


def find_groups(func: relax.Function) -> list[list[Branch]]:
    """Groups of two or more branches reading the same input with the same K and dtype."""
    block = Block.of(func)
    weights = weight_vars(func, block)
    groups: dict[tuple, list[Branch]] = {}
    for i in range(len(block.bindings)):
        br = find_branch(block, i, weights)
        if br is not None:
            groups.setdefault(_key(block, br), []).append(br)
    return [g for g in groups.values() if len(g) >= 2]


def _combined(bb: relax.BlockBuilder, group: list[Branch], block: Block, mapping: dict):
    """Emit the combined GEMM and epilogue; map every branch's output to its slice."""
    def m(e):
        return substitute(e, mapping)

    ws, bs = [], []
    dtype = str(group[0].weight.ty.dtype)
    for br in group:
        w = m(br.weight)
        if br.scale is not None:
            w = bb.emit(relax.op.multiply(w, br.scale))
        ws.append(w)
        if any(g.bias is not None for g in group):
            if br.bias is None:
                b = relax.const(np.zeros([br.n], dtype=dtype), dtype)
            else:
                b = m(br.bias)
                if len(shape_of(br.bias)) != 1:
                    b = bb.emit(relax.op.reshape(b, [br.n]))
                if br.scale is not None:
                    b = bb.emit(relax.op.multiply(b, br.scale))
            bs.append(b)
    first = block.bindings[group[0].members[0]].value
    weight = bb.emit(relax.op.concat(ws, axis=1))
    y = bb.emit(relax.op.matmul(m(group[0].x), weight, out_dtype=first.attrs.out_dtype))
    if bs:
        y = bb.emit(relax.op.add(y, bb.emit(relax.op.concat(bs, axis=0))))
    axis = len(shape_of(group[0].x)) - 1
    begin = 0
    for br in group:
        value = relax.op.strided_slice(y, axes=[axis], begin=[begin], end=[begin + br.n])
        bind_like(bb, br.out, value, mapping)
        begin += br.n


def combine_function(mod: tvm.IRModule, func_name: str = "main") -> tvm.IRModule:
    """Combine every group of ``func_name`` (see the module docstring)."""
    func = mod[func_name]
    if not is_single_block(func):
        return mod
    groups = find_groups(func)
    if not groups:
        return mod
    block = Block.of(func)
    weights = weight_vars(func, block)
    start = {g[0].members[0]: g for g in groups}
    skipped = {i for g in groups for br in g for i in br.members}
    # weight-only bindings go first: a later branch's weight (a transposed parameter) must
    # exist where the combined GEMM is emitted, at the first branch's place
    order = [i for i, b in enumerate(block.bindings) if b.var in weights] + \
        [i for i, b in enumerate(block.bindings) if b.var not in weights]
    attrs = function_attrs(func)
    removed = sum(len(g) - 1 for g in groups)
    attrs[COMBINED_ATTR] = tvm.tirx.IntImm("int64", removed + _combined_before(func))

    def emit(bb: relax.BlockBuilder, mapping: dict) -> None:
        for i in order:
            if i in start:
                _combined(bb, start[i], block, mapping)
            if i not in skipped:
                b = block.bindings[i]
                bind_like(bb, b.var, substitute(b.value, mapping), mapping)

    return rebuild_function(mod, func_name, "combine", emit, attrs)


def _combined_before(func: relax.Function) -> int:
    return int(func.attrs[COMBINED_ATTR]) if func.attrs and COMBINED_ATTR in func.attrs else 0


def combined_of(func: relax.Function) -> int:
    """How many GEMMs the pass removed from ``func`` (0 when it did not run)."""
    return _combined_before(func)


def CombineParallelMatmuls(func_name: str | None = None) -> tvm.transform.Pass:
    """Horizontal fusion of sibling projections by weights (see the module docstring), in
    every graph function (or ``func_name`` alone)."""

    @tvm.transform.module_pass(opt_level=0, name="CombineParallelMatmuls")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return for_each_function(mod, func_name, lambda m, name: relax.transform.
                                 DeadCodeElimination()(combine_function(m, name)))

    return _pass

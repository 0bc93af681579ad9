"""SinkLayoutThroughElementwise: element-wise work moves above the data movement it reads.

LeViT applies a hardswish to each attention's output after merging the heads::

    o = softmax(q @ k^T) @ v                       [1, h, n, d]
    m = reshape(permute_dims(o, [0, 2, 1, 3]), [1, n, h * d])
    y = m * clip(m + 3, 0, 6) / 6                  element-wise on m and scalars only
    z = y @ w

``EliminateLayoutTransforms`` folds the head merge into whatever reads ``m``, so the hardswish
reads ``o`` through an index map -- but it cannot join the attention kernel (the planner keeps a
layout map out of a many-to-many kernel's epilogue, where the schedule rules would no longer see
an element-wise epilogue), and it cannot join the projection (a computing prologue inlined into a
GEMM operand is recomputed per reuse).  So it is a kernel of its own, reading and writing the
whole tensor.  Element-wise operators commute with data movement, ``f(L(o)) = L(f(o))``, so::

    y' = o * clip(o + 3, 0, 6) / 6                 joins the attention kernel's epilogue
    y  = reshape(permute_dims(y', [0, 2, 1, 3]), [1, n, h * d])   folds into the GEMM's reads

One kernel and a round trip through memory fewer, values bit-identical (the same operations on
the same elements).  This is one of DNNFusion's graph rewrites by mathematical property --
commutativity of one-to-one operators with reorganise / shuffle operators -- taken where it
removes a kernel.

The rewrite applies to a chain ``L_k(..L_1(t))`` of bijective layout operators
(``permute_dims``, ``reshape``, ``squeeze``, ``expand_dims``, ``flatten``), each read only by
the next, whose source ``t`` is computed by a kernel that takes an epilogue (not a parameter,
not moved data, read by nothing else), and whose result is read only by a region of one-to-one
operators over it and scalars (no other tensor operand: a residual add would need the inverse
map on its other operand).  The region's results that are read elsewhere get the layout chain
(once each); the operators classified opaque never take part.  Records ``smartmem.sunk_layouts``
(regions moved) on the function.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..analysis.classify import OPAQUE, MappingType, classify_call
from .math_rewrite import numel, op_of, shape_of
from .partition import (
    Block,
    bind_like,
    for_each_function,
    is_single_block,
    rebuild_function,
    substitute,
)

SUNK_ATTR = "smartmem.sunk_layouts"
#: data movement that is a bijection of the elements (no element dropped or repeated)
BIJECTIVE = ("relax.permute_dims", "relax.reshape", "relax.squeeze", "relax.expand_dims",
             "relax.flatten")


def _computes(value) -> bool:
    """Does ``value`` run in a kernel that can take an element-wise epilogue?"""
    if not isinstance(value, relax.Call) or op_of(value) is None or \
            op_of(value) in BIJECTIVE:
        return False
    cls = classify_call(value)
    return cls is not OPAQUE and not cls.quadrant.fixed


def _elementwise(value) -> bool:
    """One-to-one, or one-to-many only by broadcasting a scalar (``x + 3``): the region rules
    (every tensor operand shaped like the result, the others one element) make the rest sure."""
    if not isinstance(value, relax.Call) or op_of(value) is None or op_of(value) in BIJECTIVE:
        return False
    cls = classify_call(value)
    return cls is not OPAQUE and cls.mapping in (MappingType.ONE_TO_ONE,
                                                 MappingType.ONE_TO_MANY)


def _chain(block: Block, end: int) -> list[int] | None:
    """Binding indices ``[L_1, .., L_k]`` of the layout chain ending at ``end``, each read only
    by the next, starting at a binding that computes; None when there is no such chain."""
    chain = [end]
    while True:
        value = block.bindings[chain[0]].value
        src = value.args[0]
        if src not in block.index:
            return None  # a parameter: nothing computes it here
        i = block.index[src]
        if block.users[i] != {chain[0]} or src in block.output_vars:
            return None
        if op_of(block.bindings[i].value) in BIJECTIVE:
            chain.insert(0, i)
            continue
        return chain if _computes(block.bindings[i].value) else None


def _scalar_for(a: relax.Expr, ndim: int) -> bool:
    """A one-element operand that broadcasts against a tensor of ``ndim`` dimensions without
    adding any (so the region keeps its source's shape)."""
    shape = shape_of(a)
    return shape is not None and numel(a) == 1 and len(shape) <= ndim


def _region(block: Block, end: int, ndim: int) -> set[int] | None:
    """The one-to-one bindings over ``end``'s result and scalars, closed: every reader of
    ``end`` is in it and every operand of its members is ``end``, a member or a scalar that
    also broadcasts against the chain's ``ndim``-dimensional source."""
    shape = shape_of(block.bindings[end].var)
    if shape is None:
        return None
    seen: set[int] = set()
    todo = list(block.users[end])
    while todo:  # everything element-wise reachable, of the same shape
        i = todo.pop()
        if i in seen:
            continue
        b = block.bindings[i]
        if not _elementwise(b.value) or shape_of(b.var) != shape:
            continue
        seen.add(i)
        todo.extend(block.users[i])
    changed = True
    while changed:  # drop members with another tensor operand (and what then depends on them)
        changed = False
        for i in sorted(seen):
            operands = [a for a in block.bindings[i].value.args  # tensors, not attributes
                        if isinstance(getattr(a, "ty", None), relax.TensorType)]
            for a in operands:
                j = block.index.get(a)
                if j == end or j in seen or _scalar_for(a, ndim):
                    continue
                seen.discard(i)
                changed = True
                break
    if not seen or not block.users[end] <= seen or \
            block.bindings[end].var in block.output_vars:
        return None
    return seen


def _plan(block: Block) -> list[tuple[list[int], set[int]]]:
    """(layout chain, element-wise region) pairs that sink, not overlapping."""
    plans = []
    used: set[int] = set()
    for end, b in enumerate(block.bindings):
        if op_of(b.value) not in BIJECTIVE or any(
                op_of(block.bindings[u].value) in BIJECTIVE for u in block.users[end]):
            continue  # only from the last operator of a chain
        chain = _chain(block, end)
        source = shape_of(block.bindings[chain[0]].value.args[0]) if chain else None
        region = _region(block, end, len(source)) if source is not None else None
        if region is None or (used & (set(chain) | region)):
            continue
        used |= set(chain) | region
        plans.append((chain, region))
    return plans


def _relayout(value: relax.Expr, chain: list) -> relax.Expr:
    """``chain``'s layout calls applied in order to ``value`` (their other arguments kept)."""
    for call in chain:
        value = relax.Call(call.op, [value, *call.args[1:]], call.attrs, call.ty_args)
    return value


def sink_function(mod: tvm.IRModule, func_name: str = "main") -> tvm.IRModule:
    if not is_single_block(mod[func_name]):
        return mod
    block = Block.of(mod[func_name])
    plans = _plan(block)
    if not plans:
        return mod
    chain_of = {}  # region member -> (its chain's layout calls, its region)
    source = {}  # chain end -> the var the chain starts from
    for chain, region in plans:
        calls = [block.bindings[i].value for i in chain]
        source[chain[-1]] = calls[0].args[0]
        for i in region:
            chain_of[i] = (calls, region)

    def emit(bb: relax.BlockBuilder, mapping: dict) -> None:
        moved: dict = {}  # region member's var -> its value in the source layout
        for i, b in enumerate(block.bindings):
            if i in source:  # the chain's end: readers take the source instead
                moved[b.var] = substitute(source[i], mapping)
                continue
            if i not in chain_of:
                bind_like(bb, b.var, substitute(b.value, mapping), mapping)
                continue
            calls, region = chain_of[i]
            value = substitute(substitute(b.value, moved), mapping)
            moved[b.var] = bb.emit(value, name_hint=f"{b.var.name}_sunk")
            if b.var in block.output_vars or any(u not in region for u in block.users[i]):
                bind_like(bb, b.var, _relayout(moved[b.var], calls), mapping)

    sunk = rebuild_function(mod, func_name, "sink", emit)
    sunk = relax.transform.DeadCodeElimination()(sunk)
    func = sunk[func_name]
    before = int(func.attrs[SUNK_ATTR]) if func.attrs and SUNK_ATTR in func.attrs else 0
    sunk[func_name] = func.with_attr(SUNK_ATTR, tvm.tirx.IntImm("int64", before + len(plans)))
    return sunk


def SinkLayoutThroughElementwise(func_name: str | None = None) -> tvm.transform.Pass:
    """Move element-wise regions above the layout chains they read (see the module doc), in
    every graph function (or ``func_name`` alone)."""

    @tvm.transform.module_pass(opt_level=0, name="SinkLayoutThroughElementwise")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return for_each_function(mod, func_name, sink_function)

    return _pass

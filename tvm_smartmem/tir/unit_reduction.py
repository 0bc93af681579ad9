"""Reductions over a single element become spatial blocks before the schedule rules see them.

A block that reduces over loops of extent one (a matmul with a contraction of one, a
layernorm / RMSNorm / softmax over a hidden size of one, a global pool over a 1x1 map) keeps its
``init`` and its ``buf = buf + rhs`` update.  dlight's helpers drop unit iterators when they
classify blocks, call it spatial, and ``reverse_compute_inline`` the element-wise epilogue into
it -- into the ``init`` *and* the update, so the epilogue is applied twice: ``(x @ w) + x`` came
out as ``x * w + 2x``, an RMSNorm over one channel as garbage, on every GPU target, TVM's own
pipeline included (``Fallback``, ``GeneralReduction``).

A reduction of one term is that term combined with the identity, so here the update becomes a
plain store ``buf = init_value (+) rhs`` and the reduce iterators (extent one) spatial ones;
the values are exactly those of the reduction.  Blocks whose update is not
``buf = buf (+) rhs`` with ``rhs`` free of the block's own outputs are left as they are.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import ir, s_tir, tirx

#: Combiners ``buf = buf (+) rhs`` that this rewrite understands (commutative: either side).
_COMBINERS = (tirx.Add, tirx.Mul, tirx.Max, tirx.Min)


def _stores(stmt) -> list | None:
    if isinstance(stmt, tirx.BufferStore):
        return [stmt]
    if isinstance(stmt, tirx.SeqStmt) and all(isinstance(s, tirx.BufferStore) for s in stmt):
        return list(stmt)
    return None


def _is_unit_reduction(block) -> bool:
    reduce = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    return block.init is not None and bool(reduce) and all(
        isinstance(iv.dom.extent, tirx.IntImm) and int(iv.dom.extent) == 1 for iv in reduce)


def _same_access(load, store) -> bool:
    return isinstance(load, ir.TensorLoad) and load.source.same_as(store.buffer) and \
        tvm_ffi.structural_equal(list(load.indices), list(store.indices))


def _reads_any(expr, buffers: list) -> bool:
    loads: list = []
    tvm_ffi.structural_walk(expr, (ir.TensorLoad, loads.append))
    return any(ld.source.same_as(b) for ld in loads for b in buffers)


def _single_term(block) -> s_tir.SBlock | None:
    """The spatial block computing what ``block`` (a unit reduction) computes, or None."""
    updates, inits = _stores(block.body), _stores(block.init)
    if not updates or not inits or len(updates) != len(inits):
        return None
    written = [s.buffer for s in updates]
    body = []
    for update, init in zip(updates, inits, strict=True):
        value = update.value
        if not init.buffer.same_as(update.buffer) or \
                not tvm_ffi.structural_equal(list(init.indices), list(update.indices)) or \
                not isinstance(value, _COMBINERS):
            return None
        if _same_access(value.a, update):
            rhs = value.b
        elif _same_access(value.b, update):
            rhs = value.a
        else:
            return None
        if _reads_any(rhs, written) or _reads_any(init.value, written):
            return None
        body.append(tirx.BufferStore(update.buffer, type(value)(init.value, rhs),
                                     list(update.indices)))
    iter_vars = [tirx.IterVar(iv.dom, iv.var, tirx.IterVar.DataPar)
                 if iv.iter_type == tirx.IterVar.CommReduce else iv for iv in block.iter_vars]
    reads = [r for r in block.reads if not any(r.source.same_as(b) for b in written)]
    return s_tir.SBlock(iter_vars, reads, list(block.writes), block.name_hint,
                        body[0] if len(body) == 1 else tirx.SeqStmt(body), None,
                        list(block.alloc_buffers), list(block.match_buffers),
                        dict(block.annotations))


def spatial_unit_reductions(func: tirx.PrimFunc) -> tuple[tirx.PrimFunc, int]:
    """(``func`` with its unit reductions written as spatial blocks, how many were)."""
    try:
        sch = s_tir.Schedule(tvm.IRModule({"main": func}))
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # not block-structured (already scheduled or lowered): nothing to do
        return func, 0
    count = 0
    for rv in blocks:
        block = sch.get(rv)
        if not _is_unit_reduction(block):
            continue
        new = _single_term(block)
        if new is None:
            continue
        sch.state.replace(sch.get_sref(rv), new, {block: new})
        count += 1
    return (sch.mod["main"], count) if count else (func, 0)

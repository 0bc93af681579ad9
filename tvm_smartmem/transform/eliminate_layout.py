"""EliminateLayoutTransforms: SmartMem's edge table applied to every layout-fixed operator.

SmartMem (Table 5) decides, for each producer -> consumer edge, by the two operators' quadrants:

==============  ========  ========  ===============  ===============
first \\ second  ILD-Var   ILI-Var   ILD-Fixed        ILI-Fixed
==============  ========  ========  ===============  ===============
ILD-Var         keep      try fuse  eliminate 2nd    eliminate 2nd
ILI-Var         try fuse  try fuse  eliminate 2nd    eliminate 2nd
ILD-Fixed       elim 1st  elim 1st  eliminate both   eliminate both
ILI-Fixed       elim 1st  elim 1st  eliminate both   eliminate both
==============  ========  ========  ===============  ===============

A fixed-layout operator (reshape, permute_dims, layout_transform, squeeze / expand_dims, flatten,
depth/space, and slices / gathers that are pure index maps) is *eliminated* by folding it into
its neighbour: into the consumer, which then reads through the operator's index map, or into the
producer, which then writes through it.  Chains of fixed operators fold together (their maps
compose).  A tensor with several consumers gets one copy of the fixed operator per consumer, so
each consumer reads through its own map.

This pass runs on legalised Relax (``call_tir`` bindings) and *decides*; it records the decision
as the function attribute ``smartmem.layout_plan`` (binding name -> ``consumer`` /
``producer`` / ``keep``).  ``FusePlan`` makes each decision a fusion group, ``FuseTIR`` merges the
kernels, and ``tir.InlineDataMovement`` then turns the fixed operator into index arithmetic in
its neighbour's loads or stores ("index comprehension"); ``tir.SimplifyIndices`` cleans the
``//`` and ``%`` chains that leaves.  Opaque operators, graph inputs and graph outputs are never
folded into.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from ..analysis.classify import MappingType
from ..analysis.ecg import ECG, Node, build_ecg
from .partition import Block, substitute

PLAN_ATTR = "smartmem.layout_plan"
CONSUMER, PRODUCER, KEEP = "consumer", "producer", "keep"


def is_fixed(node: Node) -> bool:
    """A fixed-layout operator that only moves data (so it can become an index map)."""
    return node.quadrant.fixed and node.mapping != MappingType.OPAQUE and \
        node.op not in ("Tuple", "TupleGetItem")


def _foldable(node: Node) -> bool:
    """Can a fixed operator be folded into this neighbour (a kernel we compile ourselves)?"""
    return not node.cls.opaque and isinstance(node.value, relax.Call) and \
        node.op not in ("Tuple", "TupleGetItem")


def writes_through_complete_block(node: Node, mod: tvm.IRModule) -> bool:
    """True when the producer's output is written by a non-reduction block, so a consumer-side
    index map can be pushed into its stores (TIR ``reverse_compute_inline`` needs that)."""
    value = node.value
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op) or \
            value.op.name != "relax.call_tir":
        return False
    func = mod[value.args[0]]
    if not isinstance(func, tirx.PrimFunc):
        return False
    import tvm_ffi
    from tvm import s_tir

    blocks: list = []
    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, blocks.append))
    blocks = [b for b in blocks if b.name_hint != "root"]
    if not blocks:
        return False
    last = blocks[-1]
    return all(int(iv.iter_type) == 0 for iv in last.iter_vars)  # 0: data-parallel


def duplicate_per_consumer(mod: tvm.IRModule, func_name: str = "main") -> tvm.IRModule:
    """Give every consumer its own copy of the chain of fixed operators it reads.

    One pass over the block: a fixed operator is not emitted where it stands; each foldable
    consumer re-emits (right before itself) the whole chain of fixed operators feeding it, and
    the original chain is emitted once, on demand, only for graph outputs and consumers nothing
    can be folded into.  Copies cost nothing once folded: they become index arithmetic.
    """
    func = mod[func_name]
    ecg = build_ecg(func, mod)
    fixed = {n.var: n for n in ecg if is_fixed(n)}
    if not fixed or not any(
        len(n.succs) + n.is_output > 1 for n in fixed.values()
    ):
        return mod
    block = Block.of(func)
    bb = relax.BlockBuilder(mod.clone())
    tmp = f"{func_name}__smartmem_dup"
    attrs = {str(k): v for k, v in func.attrs.items()} if func.attrs else {}
    mapping: dict = {}
    originals: dict = {}
    counter = [0]

    def materialise(var, memo: dict, fresh: bool):
        """Emit the fixed chain ending at ``var``; ``memo`` dedups within one consumer."""
        if var in memo:
            return memo[var]
        node = fixed[var]
        local = dict(mapping)
        for arg in relax.analysis.free_vars(node.value):
            if arg in fixed:
                local[arg] = materialise(arg, memo, fresh)
        if fresh:
            counter[0] += 1
            new = bb.emit(substitute(node.value, local), name_hint=f"{var.name}_c{counter[0]}")
        else:
            new = _emit(bb, var, substitute(node.value, local))
        memo[var] = new
        return new

    with bb.function(tmp, list(func.params), attrs=attrs):
        with bb.dataflow():
            for i, b in enumerate(block.bindings):
                if b.var in fixed:
                    continue  # emitted on demand, per consumer or once for the others
                node = ecg.nodes[i]
                local = dict(mapping)
                per_consumer: dict = {}
                for arg in relax.analysis.free_vars(b.value):
                    if arg in fixed:
                        local[arg] = materialise(arg, per_consumer, True) if _foldable(node) \
                            else materialise(arg, originals, False)
                mapping[b.var] = _emit(bb, b.var, substitute(b.value, local))
            result = func.body.body
            for v in relax.analysis.free_vars(result):
                if v in fixed:
                    mapping[v] = materialise(v, originals, False)
            result = substitute(result, mapping)
            gv = bb.emit_output(result) if not isinstance(result, relax.Var) else result
        bb.emit_func_output(gv)
    built = bb.get()
    functions = {}
    for gvar, f in built.functions_items():
        if gvar.name_hint == tmp:
            functions[tvm.ir.GlobalVar(func_name)] = f.with_attr("global_symbol", func_name) \
                if "global_symbol" in attrs else f.without_attr("global_symbol")
        elif gvar.name_hint != func_name:
            functions[gvar] = f
    return tvm.IRModule(functions, attrs=mod.attrs)


def _emit(bb, old_var, value):
    if isinstance(old_var, relax.DataflowVar):
        return bb.emit(value, name_hint=old_var.name)
    return bb.emit_output(value, name_hint=old_var.name)


def plan(ecg: ECG, mod: tvm.IRModule) -> dict[str, str]:
    """The per-operator decision of the edge table (see the module docstring)."""
    decisions: dict[str, str] = {}
    for node in ecg:
        if not is_fixed(node):
            continue
        consumers = [ecg.nodes[s] for s in node.succs]
        producers = [ecg.nodes[p] for p in node.preds]
        only_consumer = consumers[0] if len(consumers) == 1 and not node.is_output else None
        if only_consumer is not None and _foldable(only_consumer):
            # Fixed -> Var: eliminate 1st; Fixed -> Fixed: eliminate both (chain folds on)
            decisions[node.var.name] = CONSUMER
        elif (len(producers) == 1 and _foldable(producers[0])
              and len(producers[0].succs) == 1 and not producers[0].is_output
              and (is_fixed(producers[0]) or writes_through_complete_block(producers[0], mod))):
            # Var -> Fixed: eliminate 2nd (the producer writes through the map)
            decisions[node.var.name] = PRODUCER
        else:
            decisions[node.var.name] = KEEP
    return decisions


def EliminateLayoutTransforms(func_name: str = "main") -> tvm.transform.Pass:
    """Decide, for every layout-fixed operator, which neighbour absorbs it (see module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="EliminateLayoutTransforms")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if func_name not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        func = mod[func_name]
        if len(func.body.blocks) != 1 or not isinstance(func.body.blocks[0],
                                                        relax.DataflowBlock):
            return mod  # not a single dataflow block: nothing we understand
        mod = duplicate_per_consumer(mod, func_name)
        func = mod[func_name]
        decisions = plan(build_ecg(func, mod), mod)
        out = mod.clone()
        out[func_name] = func.with_attr(PLAN_ATTR, decisions)
        return out

    return _pass


def layout_plan(func: relax.Function) -> dict[str, str]:
    if not func.attrs or PLAN_ATTR not in func.attrs:
        return {}
    return {str(k): str(v) for k, v in func.attrs[PLAN_ATTR].items()}

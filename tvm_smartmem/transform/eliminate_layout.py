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

Where the table says "eliminate" but the result would defeat the schedule rules, the operator
stays (``keep``): nothing folds into a many-to-many *producer* (a matmul writing through a
permutation is no longer a matmul to dlight), and an operator that selects per element
(concatenate; swin's roll, see ``RecogniseRoll``) does not fold forwards into a many-to-many
consumer (every operand read becomes a select).  Kept reshape chains become zero-copy
``R.reshape`` views.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, tirx

from ..analysis.classify import MappingType
from ..analysis.ecg import ECG, Node, build_ecg
from .partition import Block, for_each_function, is_single_block, replace_function, substitute

PLAN_ATTR = "smartmem.layout_plan"
CONSUMER, PRODUCER, KEEP = "consumer", "producer", "keep"


def is_fixed(node: Node) -> bool:
    """A fixed-layout operator that only moves data (so it can become an index map)."""
    return node.quadrant.fixed and node.mapping != MappingType.OPAQUE and \
        node.op not in ("Tuple", "TupleGetItem")


#: an index computation up to this many elements is recomputed by each of its readers
RECOMPUTE_ELEMENTS = 1 << 16


def is_index_computation(node: Node) -> bool:
    """A small element-wise (or broadcasting) operator on integers or booleans -- a gather's
    index normalisation such as ``where(ids < 0, ids + V, ids)`` -- that each reader
    recomputes instead of reading.

    Materialised, such a tensor ties every later gather of the same ids to the kernel that
    computed it (LLaMA's embedding: the gather could not fold into the first RMSNorm, which
    re-gathers it, because the ids' ``less`` / ``add`` were outputs read by the residual
    additions).  Recomputed, it costs a compare and an add per read of a few hundred ids,
    while the kernel that only wrote them disappears.  Floating-point element-wise operators
    are never recomputed here: they are real work and fusion decides about them."""
    if node.mapping not in (MappingType.ONE_TO_ONE, MappingType.ONE_TO_MANY) or \
            node.dtype is None or node.shape is None or \
            node.n_outputs != 1 or node.is_output or not _foldable(node):
        return False
    if not (node.dtype.startswith("int") or node.dtype.startswith("uint") or
            node.dtype == "bool"):
        return False
    return all(isinstance(d, int) for d in node.shape) and \
        math.prod(node.shape) <= RECOMPUTE_ELEMENTS


def _copied_per_reader(node: Node) -> bool:
    """Operators each reader gets a copy of: fixed ones (folded, they are index arithmetic)
    and small index computations (see ``is_index_computation``)."""
    return is_fixed(node) or is_index_computation(node)


def _foldable(node: Node) -> bool:
    """Can a fixed operator be folded into this neighbour (a kernel we compile ourselves)?"""
    return not node.cls.opaque and isinstance(node.value, relax.Call) and \
        node.op not in ("Tuple", "TupleGetItem")


def _selects_in_indices(func) -> bool:
    """Does a PrimFunc read through an index that is a select (a rotation, see RecogniseRoll)?"""
    import tvm_ffi

    loads: list = []
    tvm_ffi.structural_walk(func.body, (tvm.ir.TensorLoad, loads.append))
    selects: list = []
    for load in loads:
        for index in load.indices:
            tvm_ffi.structural_walk(index, (tirx.Select, selects.append))
    return bool(selects)


def selects_per_element(node: Node, mod: tvm.IRModule) -> bool:
    """A data-movement operator that picks per element: one reading two or more tensors
    (concatenate, stack), or one reading through a select (a rotation).  Folded into a consumer
    it puts a select into every read, which is fine for an element-wise kernel and fatal for a
    matmul (the schedule rules no longer see a matmul: on the H100 swin's QKV projection with
    the roll folded in ran 6x slower)."""
    value = node.value
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op) or \
            value.op.name != "relax.call_tir" or not isinstance(value.args[1], relax.Tuple):
        return False
    out_dtype = getattr(value.ty, "dtype", None)
    sources = {a for a in value.args[1].fields  # data operands, not a gather's indices
               if not isinstance(a, tvm.ir.GenericConst)
               and getattr(a.ty, "dtype", None) == out_dtype}
    if len(sources) >= 2:
        return True
    func = mod[value.args[0]]
    return isinstance(func, tirx.PrimFunc) and _selects_in_indices(func)


def _reaches_many_to_many(ecg: ECG, node: Node, mod: tvm.IRModule) -> bool:
    """Would ``node`` folded forwards end up in a many-to-many kernel?  The search goes through
    the fixed operators after it and stops at the ones that select per element (those stay
    kernels of their own, so the chain ends in them)."""
    seen: set[int] = set()
    stack = list(node.succs)
    while stack:
        s = stack.pop()
        if s in seen:
            continue
        seen.add(s)
        succ = ecg.nodes[s]
        if is_fixed(succ):
            if not selects_per_element(succ, mod):
                stack.extend(succ.succs)
        elif succ.mapping == MappingType.MANY_TO_MANY and "conv" not in succ.op:
            # a convolution takes a concatenation over its input channels: the select depends
            # only on the reduction's channel, one uniform branch per channel step
            return True
    return False


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
    from ..analysis.classify import prim_blocks

    blocks = prim_blocks(func)
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
    fixed = {n.var: n for n in ecg if _copied_per_reader(n)}
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
                for arg in relax.analysis.free_vars(b.value):
                    if arg in fixed:
                        # one chain per operand, not per consumer: two operands of a matmul
                        # must not share a prefix, or after folding the matmul would read one
                        # buffer twice (see partition's split of shared inputs)
                        local[arg] = materialise(arg, {}, True) if _foldable(node) \
                            else materialise(arg, originals, False)
                mapping[b.var] = _emit(bb, b.var, substitute(b.value, local))
            result = func.body.body
            for v in relax.analysis.free_vars(result):
                if v in fixed:
                    mapping[v] = materialise(v, originals, False)
            result = substitute(result, mapping)
            gv = bb.emit_output(result) if not isinstance(result, relax.Var) else result
        bb.emit_func_output(gv)
    return replace_function(bb.get(), tmp, func_name, attrs, mod)


def _emit(bb, old_var, value):
    if isinstance(old_var, relax.DataflowVar):
        return bb.emit(value, name_hint=old_var.name)
    return bb.emit_output(value, name_hint=old_var.name)


def _view_for_convolution(node: Node, producers: list[Node], consumers: list[Node]) -> bool:
    """A reshape of a materialised tensor read only by convolutions stays a zero-copy view.

    Folded, it is index arithmetic (``c // g``, ``c % g``, ``h * w + x``) in every operand
    load of the convolution's inner loop; as a view the convolution reads plain NCHW.  A GPU
    convolution (dlight has no rule of its own for it) measured 21% slower reading a
    GroupNorm's grouped output through the fold on the H100 (``fused_reshape1_fold_conv2d2``,
    VAE decoder, 8.3 vs 6.8 ms over five calls)."""
    return node.mapping == MappingType.REORGANIZE and len(producers) == 1 and \
        not is_fixed(producers[0]) and bool(consumers) and not node.is_output and \
        all("conv" in c.op for c in consumers)


def plan(ecg: ECG, mod: tvm.IRModule) -> dict[str, str]:
    """The per-operator decision of the edge table (see the module docstring)."""
    decisions: dict[str, str] = {}
    for node in ecg:
        if is_index_computation(node) and not is_fixed(node):
            # recomputed by its one reader (duplicate_per_consumer gave each reader a copy)
            consumers = [ecg.nodes[s] for s in node.succs]
            decisions[node.var.name] = CONSUMER if consumers and \
                all(map(_foldable, consumers)) and \
                (len(consumers) == 1 or all(map(_copied_per_reader, consumers))) else KEEP
            continue
        if not is_fixed(node):
            continue
        consumers = [ecg.nodes[s] for s in node.succs]
        producers = [ecg.nodes[p] for p in node.preds]
        if _view_for_convolution(node, producers, consumers):
            decisions[node.var.name] = KEEP
            continue
        into_consumers = consumers and not node.is_output and all(map(_foldable, consumers)) \
            and (len(consumers) == 1 or all(map(_copied_per_reader, consumers))) \
            and not (selects_per_element(node, mod) and _reaches_many_to_many(ecg, node, mod))
        if into_consumers:
            # Fixed -> Var: eliminate 1st; Fixed -> Fixed: eliminate both (the chain folds on;
            # a fixed operator read by several fixed operators of the same chain goes with them)
            decisions[node.var.name] = CONSUMER
        elif (len(producers) == 1 and _foldable(producers[0])
              and producers[0].mapping != MappingType.MANY_TO_MANY
              and len(producers[0].succs) == 1 and not producers[0].is_output
              and (is_fixed(producers[0]) or writes_through_complete_block(producers[0], mod))
              and decisions.get(producers[0].var.name) != CONSUMER):
            # Var -> Fixed: eliminate 2nd (the producer writes through the map) -- never into a
            # many-to-many producer: a matmul / conv / softmax writing through a permutation is
            # a kernel the schedule rules no longer recognise; and never into a fixed producer
            # that itself folds into us (the chain would have no kernel left to absorb it)
            decisions[node.var.name] = PRODUCER
        else:
            decisions[node.var.name] = KEEP
    return decisions


FOLD_ANNOTATION = "smartmem.fold"


def _tag_for_folding(mod: tvm.IRModule, func_name: str, names: set[str],
                     views: dict | None = None) -> tvm.IRModule:
    """Point the folded bindings at copies of their PrimFuncs whose blocks carry
    ``smartmem.fold``: after FuseTIR, ``InlineDataMovement`` inlines exactly those blocks (and
    leaves a conv's own padding block, say, to the schedule rules).  Bindings in ``views``
    (name -> source variable: pure reorganisations that stay, with the chain of reshapes
    feeding them) become ``R.reshape`` views of the source."""
    from tvm import s_tir

    func = mod[func_name]
    tagged: dict[str, tvm.ir.GlobalVar] = {}
    bb = relax.BlockBuilder(mod.clone())

    def tag(callee: tvm.ir.GlobalVar) -> tvm.ir.GlobalVar:
        if callee.name_hint not in tagged:
            sch = s_tir.Schedule(tvm.IRModule({"main": mod[callee]}))
            for block in sch.get_child_blocks(sch.get_sblock("root")):
                sch.annotate(block, FOLD_ANNOTATION, 1)
            tagged[callee.name_hint] = bb.add_func(sch.mod["main"],
                                                   f"{callee.name_hint}_fold")
        return tagged[callee.name_hint]

    block = Block.of(func)
    mapping: dict = {}
    views = views or {}
    tmp = f"{func_name}__smartmem_tag"
    attrs = {str(k): v for k, v in func.attrs.items()} if func.attrs else {}
    with bb.function(tmp, list(func.params), attrs=attrs):
        with bb.dataflow():
            for b in block.bindings:
                value = substitute(b.value, mapping)
                is_call_tir = isinstance(value, relax.Call) and \
                    isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.call_tir"
                if b.var.name in names and is_call_tir:
                    value = relax.Call(value.op, [tag(value.args[0]), *value.args[1:]],
                                       value.attrs, value.ty_args)
                elif b.var.name in views and is_call_tir:
                    # reshapes nothing can absorb: one zero-copy view of the chain's source
                    # instead of copy kernels (the chain's other members become dead)
                    source = views[b.var.name]
                    value = relax.op.reshape(mapping.get(source, source), b.var.ty.shape)
                mapping[b.var] = _emit(bb, b.var, value)
            result = substitute(func.body.body, mapping)
            gv = bb.emit_output(result) if not isinstance(result, relax.Var) else result
        bb.emit_func_output(gv)
    return replace_function(bb.get(), tmp, func_name, attrs, mod)


def _reshape_views(ecg: ECG, decisions: dict[str, str]) -> dict[str, tuple]:
    """Kept pure reorganisations (reshape family) and the reshapes glued into them:
    name -> (source variable, names of the chain members it replaces)."""
    views: dict[str, tuple] = {}
    for n in ecg:
        if decisions.get(n.var.name) != KEEP or n.mapping != MappingType.REORGANIZE or \
                len(n.preds) != 1 or n.shape is None:
            continue
        chain, node = [], ecg.nodes[n.preds[0]]
        while (is_fixed(node) and node.mapping == MappingType.REORGANIZE
               and decisions.get(node.var.name) == CONSUMER and len(node.succs) == 1
               and len(node.preds) == 1):
            chain.append(node.var.name)
            node = ecg.nodes[node.preds[0]]
        source_node = ecg.nodes[(chain and ecg.by_name(chain[-1]).preds[0]) or n.preds[0]]
        if decisions.get(source_node.var.name) == CONSUMER:
            continue  # a transpose folding into this reshape: the kept kernel absorbs it
        views[n.var.name] = (source_node.var, chain)
    return views


def unique_names(mod: tvm.IRModule, func_name: str = "main") -> tvm.IRModule:
    """Give every binding of ``func_name`` a distinct name.

    Decisions travel as attributes keyed by binding name, so names must identify bindings;
    Relax allows two variables to share a name (passes such as DecomposeOpsForInference create
    such pairs), so duplicates get a numeric suffix here."""
    func = mod[func_name]
    block = Block.of(func)
    names = [b.var.name for b in block.bindings]
    if len(set(names)) == len(names):
        return mod
    taken = set(names) | {p.name for p in func.params}
    seen: set[str] = set()
    bb = relax.BlockBuilder(mod.clone())
    tmp = f"{func_name}__smartmem_names"
    attrs = {str(k): v for k, v in func.attrs.items()} if func.attrs else {}
    mapping: dict = {}
    with bb.function(tmp, list(func.params), attrs=attrs):
        with bb.dataflow():
            for b in block.bindings:
                name = b.var.name
                if name in seen:
                    k = 1
                    while f"{name}_{k}" in taken:
                        k += 1
                    name = f"{name}_{k}"
                    taken.add(name)
                seen.add(name)
                value = substitute(b.value, mapping)
                mapping[b.var] = bb.emit(value, name_hint=name) if isinstance(
                    b.var, relax.DataflowVar) else bb.emit_output(value, name_hint=name)
            result = substitute(func.body.body, mapping)
            gv = bb.emit_output(result) if not isinstance(result, relax.Var) else result
        bb.emit_func_output(gv)
    return replace_function(bb.get(), tmp, func_name, attrs, mod)


def EliminateLayoutTransforms(func_name: str | None = None) -> tvm.transform.Pass:
    """Decide, for every layout-fixed operator, which neighbour absorbs it (see module doc),
    in every graph function (or ``func_name`` alone)."""

    @tvm.transform.module_pass(opt_level=0, name="EliminateLayoutTransforms")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return for_each_function(mod, func_name, eliminate_function)

    return _pass


def eliminate_function(mod: tvm.IRModule, func_name: str) -> tvm.IRModule:
    """``mod`` with ``func_name``'s layout-fixed operators planned and tagged for folding."""
    func = mod[func_name]
    if not is_single_block(func):
        return mod  # not a single dataflow block: nothing we understand
    mod = duplicate_per_consumer(unique_names(mod, func_name), func_name)
    func = mod[func_name]
    decisions = plan(build_ecg(func, mod), mod)
    ecg = build_ecg(func, mod)
    views = _reshape_views(ecg, decisions)
    for members in views.values():
        for name in members[1]:  # reshapes glued into a view are not folded anywhere
            decisions[name] = KEEP
    folded = {name for name, d in decisions.items() if d in (CONSUMER, PRODUCER)}
    sources = {name: src for name, (src, _) in views.items()}
    out = _tag_for_folding(mod, func_name, folded, sources) if folded or views \
        else mod.clone()
    if views:
        out = relax.transform.DeadCodeElimination()(out)
    out[func_name] = out[func_name].with_attr(PLAN_ATTR, decisions)
    return out


def layout_plan(func: relax.Function) -> dict[str, str]:
    if not func.attrs or PLAN_ATTR not in func.attrs:
        return {}
    return {str(k): str(v) for k, v in func.attrs[PLAN_ATTR].items()}

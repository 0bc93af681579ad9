"""Materialise a fusion partition: groups of ``call_tir`` bindings -> ``Primitive`` functions.

TVM's ``FuseOps`` decides *and* materialises its groups in one C++ pass.  Our planners (the
DNNFusion planner, layout elimination) decide groups by their own rules; this module turns such
a decision into exactly what ``FuseOps`` would have produced -- one private Relax function per
group, marked ``Primitive``, called from ``main`` -- so that TVM's ``FuseTIR`` lowers every group
into one PrimFunc, unchanged.

Works on a legalised function whose body is one dataflow block of ``call_tir`` bindings (plus
tuples, ``TupleGetItem`` and the odd ``R.reshape``), which is what ``LegalizeOps`` gives for
imported models.  Groups must be *convex* (no path leaves a group and comes back); a group's
outputs are its members used outside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


@mutator
class _Substitute(PyExprMutator):
    """Replace variables by other expressions (everything else is rebuilt as is)."""

    def __init__(self, mapping: dict):
        super().__init__()
        self.mapping = mapping

    def visit_var_(self, op):
        return self.mapping.get(op, op)

    def visit_generic_const_(self, op):
        return next((v for k, v in self.mapping.items() if k.same_as(op)), op)

    def visit_dataflow_var_(self, op):
        return self.mapping.get(op, op)


def substitute(expr: relax.Expr, mapping: dict) -> relax.Expr:
    return _Substitute(mapping).visit_expr(expr) if mapping else expr


#: the load-time weight function ``LiftWeightTransforms`` writes for a function (runs once)
TRANSFORM_SUFFIX = "_transform_params"


def graph_functions(mod: tvm.IRModule, func_name: str | None = None) -> list[str]:
    """The Relax functions a graph pass rewrites, in module order.

    ``func_name`` alone when given (and present).  Otherwise every Relax function of the
    module -- ``main``, but also an LLM's ``prefill`` / ``decode`` or any entry point a user
    builds -- except fused kernels (``Primitive``), composites for an external codegen
    (``Composite`` / ``Codegen``) and the load-time weight functions (``*_transform_params``),
    which run once and are lowered as TVM lowers them.  The names are taken before the pass
    runs: the functions a pass adds (fused kernels) are not visited again."""
    names = [gv.name_hint for gv in mod.get_global_vars()]
    if func_name is not None:
        return [func_name] if func_name in names else []
    skip = ("Primitive", "Composite", "Codegen")
    return [gv.name_hint for gv, f in mod.functions_items()
            if isinstance(f, relax.Function)
            and not (f.attrs and any(k in f.attrs for k in skip))
            and not gv.name_hint.endswith(TRANSFORM_SUFFIX)]


def for_each_function(mod: tvm.IRModule, func_name: str | None,
                      rewrite: Callable[[tvm.IRModule, str], tvm.IRModule]) -> tvm.IRModule:
    """``rewrite(mod, name)`` applied to each of :func:`graph_functions` in turn."""
    for name in graph_functions(mod, func_name):
        mod = rewrite(mod, name)
    return mod


def use_counts(func: relax.Function) -> dict:
    """variable -> how many bindings of ``func`` (and its result) read it: "read only once"
    is the condition of most rewrites and fusions that remove a tensor."""
    counts: dict = {}
    values = [b.value for block in func.body.blocks for b in block.bindings]
    for value in [*values, func.body.body]:
        for v in relax.analysis.free_vars(value):
            counts[v] = counts.get(v, 0) + 1
    return counts


def is_single_block(func: relax.Function) -> bool:
    """Whether ``func``'s body is one dataflow block: the only shape the graph passes analyse.
    Anything else (no block at all after a rewrite removed every binding, control flow) is
    left as it is rather than guessed at."""
    blocks = func.body.blocks
    return len(blocks) == 1 and isinstance(blocks[0], relax.DataflowBlock)


@dataclasses.dataclass
class Block:
    """The bindings of a function's single dataflow block, with use-def information."""

    func: relax.Function
    bindings: list
    index: dict  # var -> binding index
    deps: list[set[int]]  # binding index -> indices of bindings it reads
    users: list[set[int]]  # binding index -> indices of bindings reading it
    output_vars: set  # vars used after the dataflow block (the function's result)

    @classmethod
    def of(cls, func: relax.Function) -> Block:
        if not is_single_block(func):
            raise ValueError("expected a function body made of one dataflow block")
        bindings = list(func.body.blocks[0].bindings)
        index = {b.var: i for i, b in enumerate(bindings)}
        deps = [
            {index[v] for v in relax.analysis.free_vars(b.value) if v in index}
            for b in bindings
        ]
        users: list[set[int]] = [set() for _ in bindings]
        for i, ds in enumerate(deps):
            for d in ds:
                users[d].add(i)
        outs = {v for v in relax.analysis.free_vars(func.body.body) if v in index}
        return cls(func, bindings, index, deps, users, outs)


def check_convex(block: Block, group: set[int]) -> None:
    """Raise ValueError when a path leaves ``group`` and re-enters it (fusing would cycle)."""
    frontier = [u for m in group for u in block.users[m] if u not in group]
    seen: set[int] = set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in group:
            raise ValueError("fusion group is not convex: a path leaves it and comes back")
        frontier.extend(block.users[n])


def _topo_order(block: Block, node_of: list[int], n_nodes: int) -> list[int]:
    """Nodes (groups / single bindings) in a dependency order close to the original one."""
    import heapq

    first = [len(block.bindings)] * n_nodes
    for i, n in enumerate(node_of):
        first[n] = min(first[n], i)
    preds: list[set[int]] = [set() for _ in range(n_nodes)]
    for i, ds in enumerate(block.deps):
        for d in ds:
            if node_of[d] != node_of[i]:
                preds[node_of[i]].add(node_of[d])
    succs: list[set[int]] = [set() for _ in range(n_nodes)]
    for n, ps in enumerate(preds):
        for p in ps:
            succs[p].add(n)
    indeg = [len(p) for p in preds]
    ready = [(first[n], n) for n in range(n_nodes) if indeg[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, n = heapq.heappop(ready)
        order.append(n)
        for s in succs[n]:
            indeg[s] -= 1
            if indeg[s] == 0:
                heapq.heappush(ready, (first[s], s))
    if len(order) != n_nodes:
        raise ValueError("fusion groups form a cycle")
    return order


def fuse_groups(
    mod: tvm.IRModule,
    groups: Sequence[Sequence[relax.Var]],
    *,
    func_name: str = "main",
    name_prefix: str = "fused",
    attrs: dict | None = None,
    split_shared_inputs: Sequence[bool] | None = None,
) -> tvm.IRModule:
    """Return ``mod`` with each group of bindings (given by their vars) of ``func_name``
    replaced by a call to a new ``Primitive`` function.  Groups of one binding are left as is.

    ``attrs`` are added to every new function (e.g. which planner made it and why).
    ``split_shared_inputs[g]`` gives group ``g`` one parameter per member reading a shared
    input (see ``_emit_group``).
    """
    func = mod[func_name]
    block = Block.of(func)
    node_of = list(range(len(block.bindings)))
    members: dict[int, list[int]] = {}
    split: dict[int, bool] = {}
    next_node = len(block.bindings)
    for g, group in enumerate(groups):
        idx = sorted({block.index[v] for v in group})
        if len(idx) < 2:
            continue
        if any(node_of[i] >= len(block.bindings) for i in idx):
            raise ValueError("a binding belongs to two fusion groups")
        check_convex(block, set(idx))
        for i in idx:
            node_of[i] = next_node
        members[next_node] = idx
        split[next_node] = bool(split_shared_inputs[g]) if split_shared_inputs else False
        next_node += 1
    if not members:
        return mod
    # compact node ids
    ids = {n: k for k, n in enumerate(sorted(set(node_of)))}
    node_of = [ids[n] for n in node_of]
    members = {ids[n]: m for n, m in members.items()}
    split = {ids[n]: v for n, v in split.items()}
    order = _topo_order(block, node_of, len(ids))

    def emit(bb: relax.BlockBuilder, mapping: dict) -> None:
        for n in order:
            if n not in members:
                i = next(i for i, k in enumerate(node_of) if k == n)
                _emit_binding(bb, block.bindings[i], block, mapping)
            else:
                _emit_group(bb, block, members[n], mapping, name_prefix, attrs or {}, split[n])

    return rebuild_function(mod, func_name, "partitioned", emit)


def function_attrs(func: relax.Function) -> dict:
    return {str(k): v for k, v in func.attrs.items()} if func.attrs else {}


def rebuild_function(mod: tvm.IRModule, func_name: str, tag: str,
                     emit: Callable[[relax.BlockBuilder, dict], None],
                     attrs: dict | None = None) -> tvm.IRModule:
    """``mod`` with ``func_name``'s single dataflow block re-emitted by ``emit(bb, mapping)``.

    ``emit`` binds the new bindings and fills ``mapping`` (old var -> new var); the function's
    result is read through it.  Same parameters; ``attrs`` replace the function's attributes
    when given.  The passes that rewrite ``main`` (rewriting, horizontal fusion, layout
    selection, partitioning) differ only in ``emit``."""
    func = mod[func_name]
    attrs = function_attrs(func) if attrs is None else attrs
    bb = relax.BlockBuilder(mod.clone())
    mapping: dict = {}
    tmp = f"{func_name}__smartmem_{tag}"
    with bb.function(tmp, list(func.params), attrs=attrs):
        with bb.dataflow():
            emit(bb, mapping)
            result = substitute(func.body.body, mapping)
            gv = bb.emit_output(result) if not isinstance(result, relax.Var) else result
        bb.emit_func_output(gv)
    return replace_function(bb.get(), tmp, func_name, attrs, mod)


def replace_function(built: tvm.IRModule, tmp: str, func_name: str, attrs: dict,
                     mod: tvm.IRModule) -> tvm.IRModule:
    """``built`` with the function ``tmp`` renamed to ``func_name``, replacing the old one.

    Passes rebuild a function under a temporary name (BlockBuilder will not reuse a taken
    one); nothing calls it by GlobalVar, so it simply takes the original's place.  It stays
    public (``global_symbol``) only when the original was."""
    functions = {}
    for gvar, f in built.functions_items():
        if gvar.name_hint == tmp:
            functions[tvm.ir.GlobalVar(func_name)] = f.with_attr("global_symbol", func_name) \
                if "global_symbol" in attrs else f.without_attr("global_symbol")
        elif gvar.name_hint != func_name:
            functions[gvar] = f
    return tvm.IRModule(functions, attrs=mod.attrs)


def _emit_binding(bb, binding, block: Block, mapping: dict) -> None:
    bind_like(bb, binding.var, substitute(binding.value, mapping), mapping)


def _emit_group(bb, block: Block, idx: list[int], mapping: dict, prefix: str,
                attrs: dict, split_shared: bool = False) -> None:
    group = set(idx)
    member_vars = {block.bindings[i].var for i in idx}
    inputs: list = []
    for i in idx:
        for v in relax.analysis.free_vars(block.bindings[i].value):
            if v not in member_vars and v not in inputs:
                inputs.append(v)
    # A tensor read by several members becomes one parameter per reader when asked: a matmul
    # whose two operands are slices of one tensor (GPT-2's fused q/k/v) then reads two buffers,
    # which is what the schedule rules expect of a matmul.  The buffers alias, read-only.
    per_reader: dict = {}
    if split_shared:
        readers: dict = {}
        for i in idx:
            for v in relax.analysis.free_vars(block.bindings[i].value):
                if v in inputs:
                    readers.setdefault(v, []).append(i)
        for v, rs in readers.items():
            if len(rs) > 1:
                for k, i in enumerate(rs[1:], 1):
                    alias = relax.Var(f"{v.name}_alias{k}", v.ty)
                    per_reader[(i, v)] = alias
                    inputs.append(alias)
    # tensor constants become arguments: FuseTIR accepts no constants inside a group
    constants: list = []
    for i in idx:
        relax.analysis.post_order_visit(
            block.bindings[i].value,
            lambda e: constants.append(e)
            if isinstance(e, tvm.ir.GenericConst) and isinstance(e.ty, relax.TensorType)
            and not any(e.same_as(c) for c in constants) else None,
        )
    inputs += constants
    outputs = [i for i in idx
               if any(u not in group for u in block.users[i])
               or block.bindings[i].var in block.output_vars]
    params = [relax.Var(v.name if isinstance(v, relax.Var) else f"const{k}", v.ty)
              for k, v in enumerate(inputs)]
    local = dict(zip(inputs, params, strict=True))
    aliases = {alias: v for (_, v), alias in per_reader.items()}
    name = _group_name(block, idx, prefix)
    inner = relax.BlockBuilder()
    with inner.function(name, params, attrs={"Primitive": True, **attrs}, private=True):
        with inner.dataflow():
            for i in idx:
                b = block.bindings[i]
                scope = dict(local)
                for (reader, v), alias in per_reader.items():
                    if reader == i:
                        scope[v] = local[alias]
                local[b.var] = inner.emit(substitute(b.value, scope), name_hint=b.var.name)
            results = [local[block.bindings[i].var] for i in outputs]
            ret = results[0] if len(results) == 1 else relax.Tuple(results)
            gv = inner.emit_output(ret)
        inner.emit_func_output(gv)
    fused = inner.get()[name]
    callee = bb.add_func(fused, name)
    args = [mapping.get(aliases.get(v, v), aliases.get(v, v)) if isinstance(v, relax.Var)
            else v for v in inputs]
    call = relax.Call(callee, args)
    if len(outputs) == 1:
        bind_like(bb, block.bindings[outputs[0]].var, call, mapping)
    else:
        tup = bb.emit(call, name_hint=f"{name}_out")
        for k, i in enumerate(outputs):
            bind_like(bb, block.bindings[i].var, relax.TupleGetItem(tup, k), mapping)


def bind_like(bb, old_var, value, mapping: dict) -> None:
    """Bind ``value`` under ``old_var``'s name and kind (dataflow-local or block output) and
    record the new variable in ``mapping``."""
    if isinstance(old_var, relax.DataflowVar):
        mapping[old_var] = bb.emit(value, name_hint=old_var.name)
    else:
        mapping[old_var] = bb.emit_output(value, name_hint=old_var.name)


def _group_name(block: Block, idx: list[int], prefix: str) -> str:
    parts = []
    for i in idx:
        v = block.bindings[i].value
        if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and \
                v.op.name == "relax.call_tir":
            parts.append(v.args[0].name_hint)
    return "_".join([prefix, *parts])[:120] or prefix

"""Extended Computational Graph (DNNFusion section 3): the dataflow graph of one function with,
per node, its mapping type, layout quadrant, algebraic properties, output shape and size.

Built from a function at any stage -- high-level Relax calls or legalised ``call_tir`` bindings
-- so the graph passes (rewriting, layout elimination, fusion planning) share one view of it.
Nodes are the bindings of the function's dataflow block; tuples and other non-call bindings are
nodes too (mapping type opaque), so edges are never lost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import tvm
from tvm import relax, tirx

from .classify import OPAQUE, MappingType, OpClass, Quadrant, classes_of, classify_binding, op_name

#: Class of ``TupleGetItem`` bindings: a field of a multi-output kernel, free to fuse with it.
TUPLE_FIELD = OpClass(MappingType.ONE_TO_ONE, Quadrant.ILI_VAR)


@dataclasses.dataclass
class Node:
    """One binding of the function."""

    index: int
    var: relax.Var
    value: relax.Expr
    op: str  # relax op name, PrimFunc name for call_tir, or the expression kind
    cls: OpClass
    shape: tuple | None
    dtype: str | None
    preds: list[int] = dataclasses.field(default_factory=list)
    succs: list[int] = dataclasses.field(default_factory=list)
    is_output: bool = False  # used after the dataflow block

    @property
    def mapping(self) -> MappingType:
        return self.cls.mapping

    @property
    def quadrant(self) -> Quadrant:
        return self.cls.quadrant

    @property
    def n_outputs(self) -> int:
        """Tensors this node produces (a multi-output kernel returns a tuple)."""
        ty = getattr(self.value, "ty", None)
        return len(ty.fields) if isinstance(ty, relax.TupleType) else 1

    @property
    def nbytes(self) -> int | None:
        """Size of the intermediate result (IRS) this node writes; None when symbolic."""
        if self.shape is None or self.dtype is None or \
                any(not isinstance(d, int) for d in self.shape):
            return None
        n = 1
        for d in self.shape:
            n *= d
        return n * max(tvm.runtime.DataType(self.dtype).bits // 8, 1)


@dataclasses.dataclass
class ECG:
    """The graph: nodes in binding order, with producer / consumer edges."""

    func: relax.Function
    nodes: list[Node]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def by_name(self, name: str) -> Node:
        return next(n for n in self.nodes if n.var.name == name)

    def edges(self) -> Iterator[tuple[Node, Node]]:
        for n in self.nodes:
            for s in n.succs:
                yield n, self.nodes[s]


def _out_type(value) -> tuple[tuple | None, str | None]:
    ty = getattr(value, "ty", None)
    if isinstance(ty, relax.TensorType) and ty.shape is not None and \
            getattr(ty.shape, "values", None) is not None:
        shape = tuple(int(d) if isinstance(d, tirx.IntImm) else str(d) for d in ty.shape.values)
        return shape, str(ty.dtype)
    return None, None


def _op_label(value) -> str:
    name = op_name(value)
    if name in ("relax.call_tir", "relax.call_tir_inplace"):
        return value.args[0].name_hint
    if name is not None:
        return name
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar):
        return value.op.name_hint
    return type(value).__name__


def build_ecg(func: relax.Function, mod: tvm.IRModule) -> ECG:
    """The ECG of ``func`` (whose body must be one dataflow block)."""
    blocks = func.body.blocks
    if len(blocks) != 1:
        raise ValueError("the ECG needs a function body made of one dataflow block")
    recorded = classes_of(func)
    bindings = list(blocks[0].bindings)
    index = {b.var: i for i, b in enumerate(bindings)}
    nodes = []
    for i, b in enumerate(bindings):
        value = b.value
        cls = recorded.get(b.var.name) if op_name(value) not in (
            "relax.call_tir", "relax.call_tir_inplace") else None
        if cls is None:
            if isinstance(value, relax.Call):
                cls = classify_binding(value, mod)
            elif isinstance(value, relax.TupleGetItem):
                cls = TUPLE_FIELD  # glue: fuses with the multi-output kernel it reads
            else:
                cls = OPAQUE
        shape, dtype = _out_type(value)
        node = Node(i, b.var, value, _op_label(value), cls, shape, dtype)
        node.preds = sorted({index[v] for v in relax.analysis.free_vars(value) if v in index})
        nodes.append(node)
    for n in nodes:
        for p in n.preds:
            nodes[p].succs.append(n.index)
    for v in relax.analysis.free_vars(func.body.body):
        if v in index:
            nodes[index[v]].is_output = True
    return ECG(func, nodes)

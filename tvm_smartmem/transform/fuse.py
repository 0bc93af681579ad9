"""FusePlan: DNNFusion's fusion planner (PLDI'21, Listing 1) for legalised Relax.

Seeds are one-to-one operators, taken in order of smallest intermediate result; each block grows
to its successors, then to its predecessors, as long as the mapping-type fusion table allows:

==============  ===========  ===========  =========  ===========  ===========
first \\ second  OtO          OtM          MtM        Reorg        Shuffle
==============  ===========  ===========  =========  ===========  ===========
OtO             OtO green    OtM green    MtM green  Reorg green  Shuf green
OtM             OtM green    OtM yellow   red        OtM yellow   OtM yellow
MtM             MtM green    MtM yellow   red        MtM yellow   MtM yellow
Reorg           Reorg green  OtM yellow   MtM yel.   Reorg green  Reorg green
Shuffle         Shuf green   OtM yellow   MtM yel.   Reorg green  Shuf green
==============  ===========  ===========  =========  ===========  ===========

Green fuses, red never does, yellow asks the cost layer (``tvm_smartmem.cost``: measured
latencies from the profile database, else the xgboost model trained on it, else an analytic
estimate) and records where the answer came from.  Every addition must keep the block legal:
convex (no path leaves the block and comes back), at most one output when the block holds a
many-to-many operator (the schedule rules expect that) -- except a normalisation that also
stores its prologue, such as a pre-LN residual stream (``Planner._row_side_outputs``, scheduled
by ``tir.row_reduction``) -- and within the target's kernel-argument limit.

Layout decisions of ``EliminateLayoutTransforms`` are honoured first: a fixed-layout operator
marked ``consumer`` / ``producer`` is glued to that neighbour before planning, so the planner
sees (and extends) the glued unit -- this is how injective producers end up inside matmul /
conv / softmax / layernorm kernels and injective consumers inside their producers' epilogues,
which TVM's ``FuseOps`` never does.  Opaque operators stay alone.

Attention is glued the same way: a scores matmul, the element-wise ops on the scores, the
softmax and the matmul with ``V`` (:func:`attention_chains`) form one unit that counts as a
single many-to-many operator, because one schedule rule (``tir.attention.FusedAttention``)
computes all of it in one kernel; it is only formed where that rule's size limits hold.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax

from ..analysis.classify import MappingType as M
from ..analysis.classify import prim_blocks
from ..analysis.ecg import ECG, Node, build_ecg
from .eliminate_layout import CONSUMER, PRODUCER, layout_plan
from .partition import for_each_function, fuse_groups, is_single_block

G, Y, R = "green", "yellow", "red"

TABLE: dict[tuple[M, M], tuple[M | None, str]] = {
    (M.ONE_TO_ONE, M.ONE_TO_ONE): (M.ONE_TO_ONE, G),
    (M.ONE_TO_ONE, M.ONE_TO_MANY): (M.ONE_TO_MANY, G),
    (M.ONE_TO_ONE, M.MANY_TO_MANY): (M.MANY_TO_MANY, G),
    (M.ONE_TO_ONE, M.REORGANIZE): (M.REORGANIZE, G),
    (M.ONE_TO_ONE, M.SHUFFLE): (M.SHUFFLE, G),
    (M.ONE_TO_MANY, M.ONE_TO_ONE): (M.ONE_TO_MANY, G),
    (M.ONE_TO_MANY, M.ONE_TO_MANY): (M.ONE_TO_MANY, Y),
    (M.ONE_TO_MANY, M.MANY_TO_MANY): (None, R),
    (M.ONE_TO_MANY, M.REORGANIZE): (M.ONE_TO_MANY, Y),
    (M.ONE_TO_MANY, M.SHUFFLE): (M.ONE_TO_MANY, Y),
    (M.MANY_TO_MANY, M.ONE_TO_ONE): (M.MANY_TO_MANY, G),
    (M.MANY_TO_MANY, M.ONE_TO_MANY): (M.MANY_TO_MANY, Y),
    (M.MANY_TO_MANY, M.MANY_TO_MANY): (None, R),
    (M.MANY_TO_MANY, M.REORGANIZE): (M.MANY_TO_MANY, Y),
    (M.MANY_TO_MANY, M.SHUFFLE): (M.MANY_TO_MANY, Y),
    (M.REORGANIZE, M.ONE_TO_ONE): (M.REORGANIZE, G),
    (M.REORGANIZE, M.ONE_TO_MANY): (M.ONE_TO_MANY, Y),
    (M.REORGANIZE, M.MANY_TO_MANY): (M.MANY_TO_MANY, Y),
    (M.REORGANIZE, M.REORGANIZE): (M.REORGANIZE, G),
    (M.REORGANIZE, M.SHUFFLE): (M.REORGANIZE, G),
    (M.SHUFFLE, M.ONE_TO_ONE): (M.SHUFFLE, G),
    (M.SHUFFLE, M.ONE_TO_MANY): (M.ONE_TO_MANY, Y),
    (M.SHUFFLE, M.MANY_TO_MANY): (M.MANY_TO_MANY, Y),
    (M.SHUFFLE, M.REORGANIZE): (M.REORGANIZE, G),
    (M.SHUFFLE, M.SHUFFLE): (M.SHUFFLE, G),
}

DECISIONS_ATTR = "smartmem.fusion_decisions"
PLANNER_ATTR = "smartmem.planner"


def relation(first: M, second: M) -> tuple[M | None, str]:
    """Fused type and colour of a producer (``first``) -> consumer (``second``) pair."""
    if M.OPAQUE in (first, second):
        return None, R
    return TABLE[(first, second)]


@dataclasses.dataclass
class Unit:
    """Atoms of planning: one node, or nodes glued by layout elimination."""

    members: set[int]
    mapping: M
    mtm: int  # many-to-many operators inside (a glued attention counts as one)

    @property
    def opaque(self) -> bool:
        return self.mapping == M.OPAQUE


@dataclasses.dataclass
class Decision:
    producer: str
    consumer: str
    fuse: bool
    source: str  # "measured" | "model" | "analytic" | "table" | "layout"

    def __str__(self) -> str:
        return f"{self.producer}->{self.consumer}: {'fuse' if self.fuse else 'split'} " \
               f"({self.source})"


def _fusable(node: Node) -> bool:
    # an ``R.reshape`` left by layout elimination is a zero-copy view, never part of a kernel
    if isinstance(node.value, relax.Call) and isinstance(node.value.op, tvm.ir.Op) and \
            node.value.op.name == "relax.reshape":
        return False
    return isinstance(node.value, (relax.Call, relax.TupleGetItem)) and not node.cls.opaque


def _call_tir_func(node: Node, mod: tvm.IRModule | None):
    value = node.value
    if mod is None or not isinstance(value, relax.Call) or \
            not isinstance(value.op, tvm.ir.Op) or value.op.name != "relax.call_tir":
        return None
    return mod[value.args[0]]


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _is_reduction(block) -> bool:
    return any(iv.iter_type == tvm.tirx.IterVar.CommReduce for iv in block.iter_vars)


def _reduction_blocks(func) -> list:
    """``func``'s blocks that reduce, in program order."""
    return [b for b in prim_blocks(func) if _is_reduction(b)]


def _softmax_over_last(func, shape: tuple) -> bool:
    """Is ``func`` (a legalised softmax) normalising the last axis of ``shape``?  Its row
    statistics then have the shape without that axis."""
    stats = _reduction_blocks(func)
    if len(stats) != 2 or any([int(d) for d in b.writes[0].source.shape] != list(shape[:-1])
                              for b in stats):
        return False
    # reduced over the last axis: the row maximum's reduction variable indexes the input's
    # last axis (a square score matrix has the same statistics shape either way)
    first = stats[0]
    reduce = [iv.var for iv in first.iter_vars if iv.iter_type == tvm.tirx.IterVar.CommReduce]
    reads = [r for r in first.reads if r.source.same_as(func.params[0])]
    return len(reduce) == 1 and len(reads) == 1 and reads[0].region[-1].min.same_as(reduce[0])


def _unit_free(shape) -> list:
    return [d for d in shape if d != 1]


def _on_scores(node: Node, scores: tuple, mod: tvm.IRModule | None) -> bool:
    """An operator between the scores matmul and the softmax that the attention kernel can
    inline: element-wise (a mask / bias may broadcast: OtM) or a reshape that only adds or
    drops unit axes (Swin's window mask is added on a 5-D view), with no reduction."""
    if not _static(node.shape) or _unit_free(node.shape) != _unit_free(scores):
        return False
    if node.mapping == M.REORGANIZE:
        if not any(k in node.op for k in ("reshape", "squeeze", "expand_dims")):
            return False
    elif node.mapping not in (M.ONE_TO_ONE, M.ONE_TO_MANY):
        return False
    func = _call_tir_func(node, mod)
    if func is None:
        return False
    return not any(iv.iter_type != tvm.tirx.IterVar.DataPar for b in prim_blocks(func)
                   for iv in b.iter_vars)


def attention_chains(ecg: ECG, mod: tvm.IRModule | None, target=None) -> list[list[int]]:
    """Node chains ``matmul -> element-wise* -> softmax(last axis) -> matmul`` (the softmax
    result being the second matmul's left operand) with static shapes that
    ``FusedAttention`` can schedule and with few enough keys for one kernel to pay off
    (``attention_pays``); each intermediate is read only by the next node."""
    from ..tir.attention import attention_fits, attention_pays, shared_budget

    chains = []
    for qk in ecg:
        if not qk.op.startswith("matmul") or not _static(qk.shape) or len(qk.shape) < 3:
            continue
        path, cur = [qk.index], qk
        while len(cur.succs) == 1 and not cur.is_output:
            nxt = ecg.nodes[cur.succs[0]]
            if nxt.op.startswith("softmax") or not _on_scores(nxt, qk.shape, mod):
                break
            path.append(nxt.index)
            cur = nxt
        if len(cur.succs) != 1 or cur.is_output:
            continue
        sm = ecg.nodes[cur.succs[0]]
        func = _call_tir_func(sm, mod)
        if not sm.op.startswith("softmax") or sm.shape != qk.shape or func is None or \
                not _softmax_over_last(func, sm.shape) or len(sm.succs) != 1 or \
                sm.is_output:
            continue
        pv = ecg.nodes[sm.succs[0]]
        operands = pv.value.args[1].fields if _call_tir_func(pv, mod) is not None else []
        if not pv.op.startswith("matmul") or not operands or \
                not operands[0].same_as(sm.var) or not _static(pv.shape) or \
                pv.shape[:-1] != qk.shape[:-1] or pv.dtype != qk.dtype:
            continue
        itemsize = max(tvm.runtime.DataType(qk.dtype).bits // 8, 1)
        if attention_fits(qk.shape[-1], pv.shape[-1], itemsize, shared_budget(target)) and \
                attention_pays(qk.shape[-1], target):
            chains.append([*path, sm.index, pv.index])
    return chains


NORM_OPS = ("layer_norm", "rms_norm")


def _normalises_last(func, shape: tuple) -> bool:
    """Is ``func`` (a legalised layernorm / RMSNorm) reducing only the last axis of ``shape``?
    Each of its reductions then writes one value per row and runs over that axis -- the
    per-row statistics ``NormalisedMatmul`` computes for a row tile."""
    stats = _reduction_blocks(func)
    for block in stats:
        reduce = [iv for iv in block.iter_vars if iv.iter_type == tvm.tirx.IterVar.CommReduce]
        if len(block.writes) != 1 or \
                [int(d) for d in block.writes[0].source.shape] != list(shape[:-1]) or \
                len(reduce) != 1 or not isinstance(reduce[0].dom.extent, tvm.tirx.IntImm) or \
                int(reduce[0].dom.extent) != shape[-1]:
            return False
    return bool(stats)


def norm_matmul_chains(ecg: ECG, mod: tvm.IRModule | None, target=None,
                       max_row: int | None = None) -> list[list[int]]:
    """Pairs ``layernorm / RMSNorm (last axis) -> matmul`` where the normalised tensor is read
    by nothing but the matmul's left operand (a pre-LN projection), with static shapes and rows
    that ``NormalisedMatmul`` can split over its lanes and tile (``norm_prologue_fits``) and,
    with ``max_row``, at most that wide: one kernel each."""
    from ..tir.norm_matmul import norm_prologue_fits

    chains = []
    for norm in ecg:
        if not any(norm.op.startswith(op) for op in NORM_OPS) or not _static(norm.shape) or \
                len(norm.succs) != 1 or norm.is_output or len(norm.shape) < 2 or \
                (max_row is not None and int(norm.shape[-1]) > max_row):
            continue
        func = _call_tir_func(norm, mod)
        if func is None or not _normalises_last(func, norm.shape):
            continue
        mm = ecg.nodes[norm.succs[0]]
        operands = mm.value.args[1].fields if _call_tir_func(mm, mod) is not None else []
        if not mm.op.startswith("matmul") or len(operands) < 2 or \
                not operands[0].same_as(norm.var) or \
                any(o.same_as(norm.var) for o in operands[1:]) or not _static(mm.shape) or \
                not norm_prologue_fits(norm.shape, target, columns=mm.shape[-1]):
            continue
        chains.append([norm.index, mm.index])
    return chains


def build_units(ecg: ECG, decisions: dict[str, str],
                chains: list[list[int]] = ()) -> tuple[list[Unit], list[int]]:
    """Glue layout-eliminated operators to their chosen neighbours, and the nodes of each
    attention chain to each other (union-find)."""
    parent = list(range(len(ecg)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for node in ecg:
        if isinstance(node.value, relax.TupleGetItem) and len(node.preds) == 1 and \
                _fusable(ecg.nodes[node.preds[0]]):
            # a multi-output kernel and the fields read from it belong together: the group then
            # exposes fields, never the tuple next to one of its own fields
            parent[find(node.index)] = find(node.preds[0])
    for node in ecg:
        choice = decisions.get(node.var.name)
        if choice == CONSUMER:
            for s in node.succs:
                parent[find(node.index)] = find(s)
        elif choice == PRODUCER and len(node.preds) == 1:
            parent[find(node.index)] = find(node.preds[0])
    for chain in chains:
        for i in chain[1:]:
            parent[find(i)] = find(chain[0])
    attention = {find(chain[0]) for chain in chains}
    groups: dict[int, set[int]] = {}
    for node in ecg:
        groups.setdefault(find(node.index), set()).add(node.index)
    units, unit_of = [], [0] * len(ecg)
    for members in sorted(groups.values(), key=min):
        nodes = [ecg.nodes[i] for i in members]
        if any(not _fusable(n) for n in nodes):
            mapping = M.OPAQUE
        else:
            mapping = max((n.mapping for n in nodes), default=M.OPAQUE)
        mtm = 1 if find(min(members)) in attention else \
            sum(n.mapping == M.MANY_TO_MANY for n in nodes)
        units.append(Unit(members, mapping, mtm))
        for i in members:
            unit_of[i] = len(units) - 1
    return units, unit_of


class Planner:
    """Listing 1 of DNNFusion over units of an ECG."""

    def __init__(self, ecg: ECG, units: list[Unit], unit_of: list[int], cost, target,
                 max_args: int = 64, max_units: int = 48, mod: tvm.IRModule | None = None,
                 side_outputs: bool = False):
        self.ecg, self.units, self.unit_of = ecg, units, unit_of
        self.side_outputs = side_outputs
        self.mod = mod
        self.cost, self.target = cost, target
        self.max_args, self.max_units = max_args, max_units
        self.succ = [set() for _ in units]
        self.pred = [set() for _ in units]
        for a, b in ecg.edges():
            ua, ub = unit_of[a.index], unit_of[b.index]
            if ua != ub:
                self.succ[ua].add(ub)
                self.pred[ub].add(ua)
        self.block_of = [-1] * len(units)
        self.decisions: list[Decision] = []

    # -- legality ------------------------------------------------------------------------------
    def _members(self, block: set[int]) -> set[int]:
        return set().union(*(self.units[u].members for u in block))

    def _convex(self, block: set[int]) -> bool:
        frontier = [s for u in block for s in self.succ[u] if s not in block]
        seen: set[int] = set()
        while frontier:
            u = frontier.pop()
            if u in seen:
                continue
            seen.add(u)
            if u in block:
                return False
            frontier.extend(self.succ[u])
        return True

    def _outputs(self, block: set[int]) -> int:
        """Tensors the block would write for others (a tuple counts each field)."""
        members = self._members(block)
        return sum(
            self.ecg.nodes[i].n_outputs for i in members
            if self.ecg.nodes[i].is_output or any(s not in members for s in self.ecg.nodes[i].succs)
        )

    def _inputs(self, block: set[int]) -> int:
        members = self._members(block)
        inputs = set()
        for i in members:
            for v in relax.analysis.free_vars(self.ecg.nodes[i].value):
                if not any(self.ecg.nodes[m].var.same_as(v) for m in members):
                    inputs.add(v)
        return len(inputs)

    def _layout_after_mtm(self, block: set[int]) -> bool:
        """Does a fixed-layout operator read a many-to-many result inside the block?  Then the
        kernel's epilogue would not be elementwise in the matmul / conv / softmax output, and
        the schedule rules no longer recognise it (a layout map belongs in the *next* kernel's
        reads)."""
        members = self._members(block)
        nodes = self.ecg.nodes
        frontier = [s for i in members if nodes[i].mapping == M.MANY_TO_MANY
                    for s in nodes[i].succs if s in members]
        seen: set[int] = set()
        while frontier:
            i = frontier.pop()
            if i in seen:
                continue
            seen.add(i)
            if nodes[i].quadrant.fixed and nodes[i].mapping != M.OPAQUE and \
                    not self._adds_unit_dims(nodes[i]):
                return True
            frontier.extend(s for s in nodes[i].succs if s in members)
        return False

    def _adds_unit_dims(self, node: Node) -> bool:
        """A reshape that only inserts or drops extent-1 axes: the epilogue still reads the
        many-to-many result at its own indices (``[m, n] -> [1, m, n]``)."""
        if node.mapping != M.REORGANIZE or len(node.preds) != 1 or node.shape is None:
            return False
        source = self.ecg.nodes[node.preds[0]].shape
        if source is None:
            return False
        return [d for d in source if d != 1] == [d for d in node.shape if d != 1]

    def legal(self, block: set[int]) -> bool:
        if len(block) > self.max_units or not self._convex(block):
            return False
        if self._layout_after_mtm(block):
            return False
        if sum(self.units[u].mtm for u in block) > 1:
            return False
        if any(self.units[u].mtm for u in block) and self._outputs(block) > 1 and \
                not self._row_side_outputs(block):
            return False
        return self._inputs(block) + self._outputs(block) <= self.max_args

    def _row_side_outputs(self, block: set[int]) -> bool:
        """May the block write, besides its result, tensors of its normalisation's prologue?

        A pre-LN transformer adds each sublayer's output to the residual stream and normalises
        the sum; the sum is read again by the next residual add, so a kernel that normalises it
        must also write it.  ``tir.row_reduction.RowReductionWithSideOutputs`` schedules exactly
        that: a row normalisation (reuse at most ``REUSE_LIMIT``) whose result and stored
        prologue values are shaped like the rows it normalises, with the stored rows fitting in
        shared memory on GPU targets.  A reduction that shrinks its rows (a global pool, an SE
        block's squeeze) never stores its prologue: the prologue belongs in its producer's
        epilogue, where it costs no extra pass over the tensor.  Anything else with several
        outputs stays illegal (the matmul / conv rules expect one)."""
        if not self.side_outputs:
            return False
        nodes = self.ecg.nodes
        members = self._members(block)
        mtm = [i for i in members if nodes[i].mapping == M.MANY_TO_MANY]
        if len(mtm) != 1 or self._reuse(mtm[0]) > REUSE_LIMIT:
            return False
        norm = nodes[mtm[0]]
        prologue: set[int] = set()
        stack = [p for p in norm.preds if p in members]
        while stack:
            i = stack.pop()
            if i not in prologue:
                prologue.add(i)
                stack.extend(p for p in nodes[i].preds if p in members)
        outputs = [i for i in members if nodes[i].is_output
                   or any(s not in members for s in nodes[i].succs)]
        side = [i for i in outputs if i in prologue]
        results = [i for i in outputs if i not in prologue]
        if len(results) != 1 or not side or len(side) > MAX_SIDE_OUTPUTS:
            return False
        rows = nodes[results[0]].shape
        if not _static(rows) or any(nodes[i].n_outputs != 1 or nodes[i].shape != rows
                                    or nodes[i].dtype != norm.dtype for i in side):
            return False
        return self._side_rows_fit(mtm[0], len(side))

    def _side_rows_fit(self, norm: int, count: int) -> bool:
        """Do ``count`` stored rows of the normalisation fit in the shared memory the rule
        caches them in (GPU targets; other targets do not schedule the kernel)?"""
        if self.target is None or self.target.kind.name not in ("cuda", "opencl"):
            return True
        from ..tir.attention import shared_budget

        func = _call_tir_func(self.ecg.nodes[norm], self.mod)
        blocks = _reduction_blocks(func) if func else []
        if not blocks:
            return False
        row = 1
        for iv in blocks[0].iter_vars:
            if iv.iter_type == tvm.tirx.IterVar.CommReduce:
                if not isinstance(iv.dom.extent, tvm.tirx.IntImm):
                    return False
                row *= int(iv.dom.extent)
        itemsize = max(tvm.runtime.DataType(self.ecg.nodes[norm].dtype).bits // 8, 1)
        return count * row * itemsize <= shared_budget(self.target) // 2

    def _prologue_compute(self, producers: set[int], consumers: set[int]) -> bool:
        """Producers that compute (not only move data) flowing into a many-to-many consumer
        that reads each of its input elements many times (a matmul / conv operand: the
        inlined prologue would be recomputed per reuse).  A reduction that reads each element
        a few times (mean, RMSNorm / layernorm statistics, softmax) recomputes a cheap
        prologue at most that often, which costs less than a kernel and a round trip."""
        if self._consumer_reuse(consumers, default=0) <= REUSE_LIMIT:
            return False
        return any(not self.ecg.nodes[i].quadrant.fixed
                   for u in producers for i in self.units[u].members)

    def _broadcast_into_row_reduction(self, first: M, second: M, consumers: set[int]) -> bool:
        """One-to-many into many-to-many is red in DNNFusion's table because the consumer it
        was written for (Expand -> Conv) reads every element of its operand many times, each
        read recomputing the expansion.  A normalisation (layernorm, RMSNorm, softmax) reads
        each element a few times (its reuse is at most ``REUSE_LIMIT``), so a broadcast
        producer -- a bias add, a split-K partial sum with its bias -- costs it a few cheap
        recomputations, less than a kernel and a round trip: green there, red elsewhere."""
        if (first, second) != (M.ONE_TO_MANY, M.MANY_TO_MANY):
            return False
        return self._consumer_reuse(consumers, default=float("inf")) <= REUSE_LIMIT

    def _consumer_reuse(self, consumers: set[int], default: float) -> float:
        """The highest reuse among the many-to-many nodes of ``consumers`` (``default``: none)."""
        return max((self._reuse(i) for u in consumers for i in self.units[u].members
                    if self.ecg.nodes[i].mapping == M.MANY_TO_MANY), default=default)

    def _reuse(self, i: int) -> float:
        """How often the kernel of node ``i`` reads each element of its inputs, at most
        (iterations of its reduction blocks over input size; unknown: treated as large)."""
        func = _call_tir_func(self.ecg.nodes[i], self.mod)
        return float("inf") if func is None else operand_reuse(func)

    # -- growth --------------------------------------------------------------------------------
    def _label(self, u: int) -> str:
        return "+".join(self.ecg.nodes[i].op for i in sorted(self.units[u].members))

    def _try_add(self, block: set[int], kind: M, cand: int, forward: bool) -> M | None:
        unit = self.units[cand]
        if unit.opaque or self.block_of[cand] != -1 or cand in block:
            return None
        first, second = (kind, unit.mapping) if forward else (unit.mapping, kind)
        fused, colour = relation(first, second)
        producers, consumers = (block, {cand}) if forward else ({cand}, block)
        if colour == R and self._broadcast_into_row_reduction(first, second, consumers):
            fused, colour = M.MANY_TO_MANY, G
        if colour == R:
            return None
        trial = block | {cand}
        if not self.legal(trial):
            return None
        if colour == G and self._prologue_compute(producers, consumers):
            # TVM inlines a prologue into the many-to-many consumer's reads, which recomputes
            # it for every reuse (N times per element of a matmul operand); DNNFusion's own
            # code generator computes it once.  So here it is a yellow cell, not a green one.
            colour = Y
        if colour == Y:
            verdict = self.cost.should_fuse(self, block, cand, forward, self.target)
            src, dst = (self._label(next(iter(block))), self._label(cand)) if forward else \
                (self._label(cand), self._label(next(iter(block))))
            self.decisions.append(Decision(src, dst, verdict.fuse, verdict.source))
            if not verdict.fuse:
                return None
        return fused

    def _grow(self, block: set[int], kind: M, start: int) -> M:
        """Listing 1's growth, with one change of order: predecessors are tried first.

        Listing 1 grows successors first.  Once a normalisation takes computing prologues (its
        reuse is a few reads per element), that order makes a residual add join the layernorm
        after it and leave the GEMM before it: two kernels either way, but the GEMM then writes
        its raw product and the layernorm reads it and the residual, instead of the GEMM's
        epilogue folding the residual in.  An element-wise op joining its producer's epilogue
        saves that producer's write, so the producer side goes first; a split-K partial sum,
        which cannot join its batched product, still reaches the layernorm after it."""
        kind = self._grow_side(block, kind, sorted(block, reverse=True), forward=False)
        kind = self._grow_side(block, kind, sorted(block, reverse=True), forward=True)
        return self._grow_side(block, kind, sorted(block, reverse=True), forward=False)

    def _grow_side(self, block: set[int], kind: M, stack: list[int], forward: bool) -> M:
        """Add, recursively, the successors (``forward``) or predecessors that fuse."""
        while stack:
            u = stack.pop()
            for v in sorted(self.succ[u] if forward else self.pred[u]):
                fused = self._try_add(block, kind, v, forward=forward)
                if fused is not None:
                    block.add(v)
                    kind = fused
                    stack.append(v)
        return kind

    def run(self) -> list[set[int]]:
        blocks: list[set[int]] = []

        def size(u: int) -> int:
            sizes = [self.ecg.nodes[i].nbytes or 0 for i in self.units[u].members]
            return max(sizes, default=0)

        seeds = sorted((u for u, unit in enumerate(self.units)
                        if unit.mapping == M.ONE_TO_ONE), key=lambda u: (size(u), u))
        for seed in seeds:
            if self.block_of[seed] != -1:
                continue
            block = {seed}
            self._grow(block, self.units[seed].mapping, seed)
            for u in block:
                self.block_of[u] = len(blocks)
            blocks.append(block)
        for u, unit in enumerate(self.units):  # unseeded units: MtM, OtM, layout, opaque
            if self.block_of[u] == -1 and not unit.opaque:
                block = {u}
                self._grow(block, unit.mapping, u)
                for v in block:
                    self.block_of[v] = len(blocks)
                blocks.append(block)
        return [self._members(b) for b in blocks]


REUSE_LIMIT = 4
#: Prologue tensors a normalisation kernel may store besides its result (``_row_side_outputs``).
MAX_SIDE_OUTPUTS = 2


def operand_reuse(func) -> float:
    """Iterations of ``func``'s reduction blocks per element of its largest-read input (its
    parameters, not the buffers it computes): 1 for a row reduction, ``n`` for a matmul operand
    (``m * n * k`` iterations over ``m * k``)."""
    from tvm import tirx

    if not isinstance(func, tirx.PrimFunc):
        return float("inf")
    sizes = {}
    for p in func.params:
        dims = [int(d.value) if isinstance(d, tirx.IntImm) else None
                for d in getattr(p, "shape", [])]
        sizes[p.name] = None if None in dims else max(1, int(np.prod(dims))) if dims else 1
    worst = 0.0
    for block in prim_blocks(func):
        if not _is_reduction(block):
            continue
        extents = [iv.dom.extent for iv in block.iter_vars]
        if any(not isinstance(e, tirx.IntImm) for e in extents):
            return float("inf")
        iterations = float(np.prod([int(e.value) for e in extents]))
        for region in block.reads:
            # only the kernel's inputs take an inlined prologue; a buffer the kernel computes
            # itself (layernorm's row mean, broadcast over the row) is read from its own
            # result however often, and counting it made every normalisation look like a matmul
            if region.source.name not in sizes:
                continue
            size = sizes[region.source.name]
            if size is None:  # a dynamic input: what this block reads of it
                size = max(1, int(np.prod([int(r.extent.value) if isinstance(
                    r.extent, tirx.IntImm) else 1 for r in region.region])))
            worst = max(worst, iterations / size)
    return worst


def make_planner(func: relax.Function, mod: tvm.IRModule, cost, target,
                 attention: bool | None = None, side_outputs: bool | None = None,
                 norm_prologue: bool | None = None) -> Planner:
    """The planner for a legalised, layout-planned function (``FusePlan`` and ``tune`` share
    it, so tuning profiles exactly the candidates the pass will ask about).  ``attention``:
    glue attention chains (default: on GPU targets, where ``FusedAttention`` schedules them).
    ``side_outputs``: let a normalisation kernel also store its prologue (default: on, except
    on texture targets, whose rules write one image per kernel).  ``norm_prologue``: glue a
    layernorm to the GEMM that alone reads it (default: ``TVM_SMARTMEM_NORM_PROLOGUE``, else
    the target kind's default -- ``short`` on CUDA, off elsewhere; GPU buffer targets only,
    where ``NormalisedMatmul`` schedules the pair)."""
    from ..tir.norm_matmul import glued_row_limit

    max_row = glued_row_limit(target=target) if norm_prologue is None else None
    if norm_prologue is None:
        norm_prologue = max_row is not None
    if attention is None:
        attention = target is not None and target.kind.name != "llvm"
    if side_outputs is None:
        side_outputs = target is None or "texture" not in target.keys
    ecg = build_ecg(func, mod)
    chains = attention_chains(ecg, mod, target) if attention else []
    if norm_prologue:
        glued = {i for chain in chains for i in chain}
        chains += [c for c in norm_matmul_chains(ecg, mod, target, max_row)
                   if not glued & set(c)]
    units, unit_of = build_units(ecg, layout_plan(func), chains)
    max_args = int(target.attrs.get("max_function_args", 128)) // 2 if target is not None and \
        "max_function_args" in target.attrs else 64
    return Planner(ecg, units, unit_of, cost, target, max_args=max_args, mod=mod,
                   side_outputs=side_outputs)


def FusePlan(
    target: tvm.target.Target | None = None, profile_db=None, func_name: str | None = None,
    attention: bool | None = None, side_outputs: bool | None = None,
    norm_prologue: bool | None = None,
) -> tvm.transform.Pass:
    """DNNFusion's planner; replaces ``FuseOps`` in the smartmem pipeline (``FuseTIR`` follows).

    ``profile_db`` is a :class:`tvm_smartmem.cost.ProfileDB` (or a path to one) consulted for
    yellow decisions; without it the decisions come from the cost model / analytic estimate.
    Every graph function is planned (or ``func_name`` alone); the decisions are recorded on
    each as ``smartmem.fusion_decisions``.  Attentions are
    glued into one kernel on GPU targets unless ``attention=False`` (for schedules without the
    ``FusedAttention`` rule); ``attention=True`` forces it.  A normalisation may store its
    prologue besides its result (pre-LN residual streams) unless ``side_outputs=False`` (for
    schedules without ``RowReductionWithSideOutputs``; default: not on texture targets).
    ``norm_prologue`` glues a layernorm to the GEMM that alone reads it (``NormalisedMatmul``;
    default ``TVM_SMARTMEM_NORM_PROLOGUE``, off).
    """
    from ..cost import CostLayer

    @tvm.transform.module_pass(opt_level=0, name="FusePlan")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        tgt = target or tvm.target.Target.current(allow_none=True)
        cost = CostLayer.of(profile_db)
        return for_each_function(
            mod, func_name, lambda m, name: plan_function(m, name, cost, tgt, attention,
                                                          side_outputs, norm_prologue))

    return _pass


def _fuse_ops_on(mod: tvm.IRModule, func_name: str) -> tvm.IRModule:
    """TVM's ``FuseOps`` on ``func_name`` alone: FuseOps rewrites every function of a module,
    and the other graph functions are (or will be) fused by the planner."""
    others = {gv.name_hint for gv, f in mod.functions_items()
              if isinstance(f, relax.Function) and gv.name_hint != func_name
              and not (f.attrs and "Primitive" in f.attrs)}
    sub = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint not in others},
                       attrs=mod.attrs)
    out = relax.transform.FuseOps()(sub)
    for gv, f in mod.functions_items():
        if gv.name_hint in others:
            out[gv] = f
    return out


def plan_function(mod: tvm.IRModule, func_name: str, cost, target, attention,
                  side_outputs: bool | None = None,
                  norm_prologue: bool | None = None) -> tvm.IRModule:
    """``mod`` with ``func_name``'s bindings fused by DNNFusion's planner (``FusePlan``)."""
    func = mod[func_name]
    if not is_single_block(func):
        return _fuse_ops_on(mod, func_name)  # control flow: leave it to TVM
    planner = make_planner(func, mod, cost, target, attention, side_outputs, norm_prologue)
    ecg = planner.ecg
    blocks = [g for g in planner.run() if len(g) > 1]
    groups = [[ecg.nodes[i].var for i in sorted(g)] for g in blocks]
    has_mtm = [any(ecg.nodes[i].mapping == M.MANY_TO_MANY for i in g) for g in blocks]
    out = fuse_groups(mod, groups, func_name=func_name,
                      attrs={PLANNER_ATTR: "dnnfusion"}, split_shared_inputs=has_mtm)
    out[func_name] = out[func_name].with_attr(
        DECISIONS_ATTR, [str(d) for d in planner.decisions]
    )
    return out

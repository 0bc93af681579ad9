"""FuseSplitKReduction: a split-K GEMM and the kernel that sums its partial products become one.

``SplitKMatmul`` splits a GEMM with too few output tiles along its reduction: a batched GEMM
writes ``S`` partial products ``p[s, m, n]`` and a second, element-wise kernel sums them with
whatever followed the GEMM (bias, GELU, ...)::

    p = gemm(x, w)                    # S x more thread blocks, each S x shorter
    y = epilogue(p[0] + ... + p[S-1]) # one more launch, and p read back from memory

That second launch is what keeps the split transformers above SmartMem's kernel budget (DeiT-S:
four of its eleven kernels a layer).  Here the two are fused the way split-K GEMM libraries
do it ("serial split-K"): each thread block writes its partial tile as before, then counts
itself in a per-tile counter (one atomic add after a global memory fence); the block that
arrives last -- it knows, the count says ``S - 1`` -- reads the ``S`` partial tiles back (from
the L2 cache, written moments ago), sums them in the order ``0 .. S-1`` the separate kernel
used, applies the epilogue, writes ``y`` and resets the counter to zero for the next launch.
So the result is bit-identical to the two-kernel form, with one launch less.

The epilogue is the second kernel's own block, re-indexed to the tile: the last block walks
its tile's outputs row-major over all its threads (consecutive threads on consecutive columns,
so the partial products are read and the outputs written coalesced -- replaying the GEMM's
write-back mapping, threads along rows, was measured 6-16% slower than the separate kernel),
guarded by the output's extent.  Multi-axis outputs whose rows fold several iterators
(``[2, 40, n]`` read as ``p[s, 40 * b + i, n]``) are unfolded.  The counters are a
zero-initialised ``int32`` constant of one element per output tile, passed to the kernel (it
leaves them zero again).

Only the simple, common shape is taken; anything else keeps its two kernels (correct, one
launch more):

* the GEMM kernel writes its only output ``p[S, M, N]`` from one write-back block nested in
  the kernel's ``threadIdx`` loops (virtual threads of extent one), as ``TunedMatmul`` /
  dlight's ``Matmul`` schedule it, with exactly ``S`` thread blocks per output tile;
* ``p`` has no other reader, and the reader is one element-wise block (no reduction, no
  buffers of its own) that reads ``p[k, a, b]`` for every ``k`` in ``0 .. S-1`` at one
  ``(a, b)`` -- row-major fusions of its iterators, the others of extent one -- and touches
  no image;
* on OpenCL (when asked for), rows and tile columns are whole 128-byte cache lines.

Two launches of the fused kernel never overlap (one stream), which is what lets them share
their counters; a concurrent second inference on another stream would need its own module.
Which targets: the hand-over between thread blocks needs a *device-wide* release fence
before the count.  CUDA has one (``__threadfence``), so there the pass can run.  OpenCL C 1.2
does not: ``mem_fence(CLK_GLOBAL_MEM_FENCE)`` orders a work-item's accesses as seen by its own
work-group only (NVIDIA documents it so), and no launch order or fence makes another
work-group's stores visible -- so on OpenCL targets the pairs stay two kernels unless
explicitly asked for.

Whether it pays: on the H100 it does now, with the last block's loads batched.  Summing one
output per thread per step, the fused GEMMs were 2-5% slower end to end than GEMM + separate
sum kernel (``benchmarks/results/gpu_h100_splitk_reduction_f30fbda.md``: BERT-base 1.883 vs
1.823 ms) -- each thread of the one finishing block waited an L2 round trip per output (the
fused kernel keeps the GEMM's 56 registers, so occupancy is not the cost:
``kernel_resources_h100_splitk_fused.md``).  Loading the partial products of
:data:`TAIL_BATCH` = 4 outputs before summing any (same order, same bits) overlaps those round
trips: side by side on the H100 (``gpu_h100_pending_4a365a0.md``) BERT-base, DeiT-S, GPT-2,
Swin-T and MobileViT-S run at 0.995-1.007x of the separate sums (one output a step: 0.94-0.99x;
16: 0.98-1.005x) with 8-30 kernels fewer each (geomean over the transformer zoo 0.58x -> 0.49x
of TVM's kernels).  So it is on by default on CUDA; ``TVM_SMARTMEM_SPLIT_K_TAIL_BATCH=N``
changes the batch and ``TVM_SMARTMEM_SPLIT_K_REDUCTION`` switches the pass: ``on`` (the
default: CUDA), ``all`` (OpenCL too, with ``mem_fence`` and ``atomic_add``: correct where
caches are coherent, as on PoCL's CPU device, which is how the tests exercise the
transformation's numerics) or ``off`` (``disable=("FuseSplitKReduction",)`` keeps it off in
one pipeline whatever the variable says).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
import tvm_ffi
from tvm import ir, relax, s_tir, tirx
from tvm.target import Target

from .. import switches
from ..analysis.classify import prim_blocks
from ..tir.texture import is_texture

#: ``cl_mem_fence_flags`` value of ``CLK_GLOBAL_MEM_FENCE`` (0x02 in the OpenCL C headers of
#: Clang, PoCL and NVIDIA); TVM's ``call_extern`` cannot name the macro itself.
CLK_GLOBAL_MEM_FENCE = 2
#: Bytes of one cache line of a GPU's (non-coherent) L1 cache.  The last thread block reads
#: partial products other multiprocessors wrote; a line of them already in its L1 could be
#: stale.  On CUDA the reads bypass L1 (``__ldcg``); OpenCL C has no such load, so there the
#: pass requires that no line holds two tiles' partials (rows and tile columns a whole number
#: of lines): the only reads of ``p`` are the last blocks', each of its own tile, after all of
#: that tile's writes (and L1 starts empty at every launch).
CACHE_LINE = 128
RULE = "smartmem.schedule_rule"
ENV = "TVM_SMARTMEM_SPLIT_K_REDUCTION"
MODES = ("on", "all", "off")
#: on CUDA, where it was measured at par with the separate sum kernel (see module doc)
DEFAULT = "on"
#: Outputs per thread whose partial products the last block loads before summing (see
#: :func:`_epilogue_nest`); ``TAIL_ENV`` overrides it, to build and measure.
TAIL_BATCH = 4
TAIL_ENV = "TVM_SMARTMEM_SPLIT_K_TAIL_BATCH"


@dataclasses.dataclass
class _Gemm:
    """Where the split GEMM kernel writes its partial products."""

    nest: tirx.For  # the loop nest around it, directly under the innermost thread loop
    threads: list[tirx.For]  # the threadIdx loops around it, outermost first
    splits: int  # S
    tiles: int  # output tiles, one counter each
    tile_cols: int  # columns of one tile
    tile: tirx.Expr  # the tile of the current thread block (blockIdx vars only)
    row0: tirx.Expr  # the tile's first row and column (blockIdx vars only)
    col0: tirx.Expr
    tile_rows: int
    extent: tuple[int, int]  # (M, N) of the partial products


@dataclasses.dataclass
class _Epilogue:
    """The element-wise reader of the partial products."""

    block: s_tir.SBlock
    partial: tirx.Buffer  # its parameter that is ``p``
    rows: list  # its iterators fused into ``m``: (var, stride, extent), outermost first
    cols: list  # and into ``n``
    unit: list[tirx.Var]  # its other iterators (extent one)


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


def _same(a, b) -> bool:
    return a.same_as(b)


def _thread_tag(loop: tirx.For) -> str:
    return loop.thread_binding.thread_tag if loop.thread_binding is not None else ""


def _static(shape) -> list[int] | None:
    return [int(d) for d in shape] if all(isinstance(d, tirx.IntImm) for d in shape) else None


def _path_to(body: tirx.Stmt, target) -> list | None:
    """The statements from ``body`` down to ``target`` (both included), or None."""
    if body.same_as(target):
        return [body]
    children: list = []
    if isinstance(body, tirx.SeqStmt):
        children = list(body.seq)
    elif isinstance(body, tirx.For):
        children = [body.body]
    elif isinstance(body, s_tir.SBlockRealize):
        children = [body.block]
    elif isinstance(body, s_tir.SBlock):
        children = [body.body]
    for child in children:
        path = _path_to(child, target)
        if path is not None:
            return [body, *path]
    return None


def _writers(func: tirx.PrimFunc, buffer) -> list[s_tir.SBlockRealize]:
    found: list = []

    def on_realize(realize):
        if any(_same(w.source, buffer) for w in realize.block.writes):
            found.append(realize)

    tvm_ffi.structural_walk(func.body, (s_tir.SBlockRealize, on_realize))
    return found


def analyse_gemm(func: tirx.PrimFunc) -> _Gemm | None:
    """The write-back structure of a split-K GEMM kernel (see module doc), or None."""
    if not func.params or any(is_texture(p) for p in func.params):
        return None
    out = func.params[-1]
    shape = _static(out.shape)
    if shape is None or len(shape) != 3 or shape[0] < 2:
        return None
    writers = _writers(func, out)
    if len(writers) != 1 or any(_same(r.source, out) for r in writers[0].block.reads):
        return None
    realize = writers[0]
    store = realize.block.body
    if not isinstance(store, tirx.BufferStore) or not _same(store.buffer, out) or \
            realize.block.init is not None:
        return None
    path = _path_to(func.body, realize)
    if path is None:
        return None
    loops = [s for s in path if isinstance(s, tirx.For)]
    tags = [_thread_tag(lp) for lp in loops]
    last_thread = max((k for k, t in enumerate(tags) if t.startswith("threadIdx")), default=-1)
    if last_thread < 0:
        return None
    outer = loops[:last_thread + 1]
    # the thread loops must be plain nests (no branch a barrier could sit under), virtual
    # threads of extent one, the loops below them serial / unrolled / vectorised
    for lp, tag in zip(outer, tags, strict=False):
        if not tag or (tag.startswith("vthread") and int(lp.extent) != 1):
            return None
    if any(tags[k] for k in range(last_thread + 1, len(loops))):
        return None
    head = path.index(outer[-1])
    below = path[head + 1:]
    if not below or not isinstance(below[0], tirx.SeqStmt) or len(below) < 2 or \
            not isinstance(below[1], tirx.For):
        return None
    # between the root and the innermost thread loop: loops and the root block only
    for s in path[:head]:
        if not isinstance(s, (tirx.For, s_tir.SBlockRealize, s_tir.SBlock)):
            return None
    nest = below[1]
    blocks = [lp for lp, t in zip(outer, tags, strict=False) if t.startswith("blockIdx")]
    threads = [lp for lp, t in zip(outer, tags, strict=False) if t.startswith("threadIdx")]
    tiles = _tiles(realize, loops, blocks, shape)
    if tiles is None:
        return None
    count, tile, (m0, n0, tm, tn) = tiles
    return _Gemm(nest, threads, shape[0], count, tn, tile, m0, n0, tm,
                 (shape[1], shape[2]))


def _tiles(realize, loops, blocks, shape) -> tuple[int, tirx.Expr, tuple] | None:
    """(number of output tiles, the current tile as an expression of the blockIdx variables,
    (row origin, column origin, rows, columns) of the tile).

    The tile origin is the write-back's ``(m, n)`` with every non-block loop at zero; its
    extent is the range of ``(m, n)`` over those loops.  Checked: the split index depends on
    the block loops alone, and the grid is exactly ``S`` blocks per tile."""
    from tvm.sym.analyzer import Analyzer

    block_vars = [lp.loop_var for lp in blocks]
    others = [lp for lp in loops if not any(_same(lp.loop_var, v) for v in block_vars)]
    units = [lp.loop_var for lp in others if isinstance(lp.extent, tirx.IntImm)
             and int(lp.extent) == 1]  # (a write-back loop of one step is the tile's too)
    s_index, m_index, n_index = (_rename(v, [(u, tirx.IntImm(_dtype(u), 0)) for u in units])
                                 for v in realize.iter_values)

    def at_zero(expr):
        return tvm_ffi.structural_map(expr, (tirx.Var, lambda v: tirx.IntImm(_dtype(v), 0) if any(
            _same(v, lp.loop_var) for lp in others) else v))

    def free_of_others(expr) -> bool:
        used: list = []
        tvm_ffi.structural_walk(expr, (tirx.Var, used.append))
        return not any(_same(v, lp.loop_var) for v in used for lp in others)

    if not free_of_others(s_index):
        return None
    analyzer = Analyzer()
    for lp in others:
        analyzer.bind(lp.loop_var, ir.Range.from_min_extent(lp.min, lp.extent))
    for lp in blocks:
        analyzer.bind(lp.loop_var, tvm.ir.Range.from_min_extent(0, 1))
    extents = []
    for index in (m_index, n_index):
        bound = analyzer.const_int_bound(analyzer.simplify(index))
        if bound.min_value != 0 or bound.max_value <= 0 or bound.max_value > 1 << 20:
            return None
        extents.append(int(bound.max_value) + 1)
    tm, tn = extents
    per_row = -(-shape[2] // tn)
    count = -(-shape[1] // tm) * per_row
    grid = 1
    for lp in blocks:
        grid *= int(lp.extent)
    if grid != count * shape[0]:
        return None
    simplify = tvm.sym.analyzer.Analyzer().simplify
    m0, n0 = (simplify(at_zero(e)) for e in (m_index, n_index))
    tile = (m0 // tm) * per_row + n0 // tn
    return count, simplify(tile), (m0, n0, tm, tn)


def analyse_epilogue(func: tirx.PrimFunc, partial_param: int, splits: int) -> _Epilogue | None:
    """The element-wise block of the partial-sum kernel (see module doc), or None."""
    if any(is_texture(p) for p in func.params):
        return None
    partial = func.params[partial_param]
    blocks = prim_blocks(func)
    root = [b for b in [getattr(func.body, "block", None)] if b is not None]
    if len(blocks) != 1 or (root and (list(root[0].alloc_buffers)
                                      or list(root[0].match_buffers))):
        return None
    block = blocks[0]
    if block.init is not None or list(block.alloc_buffers) or list(block.match_buffers) or \
            any(iv.iter_type != tirx.IterVar.DataPar for iv in block.iter_vars) or \
            not isinstance(block.body, tirx.BufferStore) or \
            not _same(block.body.buffer, func.params[-1]):
        return None
    loads: list = []
    tvm_ffi.structural_walk(block.body.value, (ir.TensorLoad, loads.append))
    reads = [ld for ld in loads if _same(ld.source, partial)]
    if not reads or any(len(ld.indices) != 3 for ld in reads):
        return None
    from tvm.sym.analyzer import Analyzer

    analyzer = Analyzer()
    first = reads[0].indices
    splits_read = set()
    for ld in reads:
        k, a, b = ld.indices
        if not isinstance(k, tirx.IntImm) or not analyzer.can_prove(a - first[1] == 0) or \
                not analyzer.can_prove(b - first[2] == 0):
            return None
        splits_read.add(int(k))
    if splits_read != set(range(splits)):
        return None
    shape = _static(partial.shape)
    ivs = list(block.iter_vars)
    rows = _unfuse(first[1], ivs, shape[1])
    cols = _unfuse(first[2], ivs, shape[2])
    if rows is None or cols is None:
        return None
    mapped = [v for v, _, _ in rows + cols]
    if any(  # an iterator in both: not a bijection
            _same(v, w) for i, v in enumerate(mapped) for w in mapped[i + 1:]):
        return None
    unit = []
    for iv in ivs:
        if any(_same(iv.var, v) for v in mapped):
            continue
        if not isinstance(iv.dom.extent, tirx.IntImm) or int(iv.dom.extent) != 1:
            return None
        unit.append(iv.var)
    return _Epilogue(block, partial, rows, cols, unit)


def _unfuse(index, ivs: list, extent: int) -> list | None:
    """``index`` as a row-major fusion of block iterators, ``[(var, stride, extent)..]``
    outermost first (``v0 * 40 + v1`` over extents 2 x 40: ``[(v0, 40, 2), (v1, 1, 40)]``),
    or None when it is not one covering exactly ``extent`` values.  The epilogue's iterators
    are then recovered from the GEMM's row (column) ``m`` as ``(m // stride) % extent``."""
    from tvm.sym.analyzer import Analyzer

    used: list = []
    tvm_ffi.structural_walk(index, (tirx.Var, used.append))
    parts = [iv for iv in ivs if any(_same(iv.var, u) for u in used)]
    if not parts or any(not isinstance(iv.dom.extent, tirx.IntImm) or
                        not isinstance(iv.dom.min, tirx.IntImm) or int(iv.dom.min) != 0
                        for iv in parts):
        return None
    parts = [iv for iv in parts if int(iv.dom.extent) != 1] or parts[-1:]
    stride = 1
    found = []
    for iv in reversed(parts):  # block iterators are row-major: the last is the innermost
        found.append((iv.var, stride, int(iv.dom.extent)))
        stride *= int(iv.dom.extent)
    found.reverse()
    if stride != extent:
        return None
    analyzer = Analyzer()
    for iv in ivs:
        analyzer.bind(iv.var, ir.Range.from_min_extent(iv.dom.min, iv.dom.extent))
    total = tirx.IntImm(_dtype(index), 0)
    for var, step, _ in found:
        total = total + tirx.Cast(_dtype(index), var) * step if _dtype(var) != _dtype(index) \
            else total + var * step
    return found if analyzer.can_prove(index - total == 0) else None


def _rename(node, mapping: list[tuple]):
    """``node`` with every variable of ``mapping`` (pairs old, new) replaced."""
    def on_var(v):
        for old, new in mapping:
            if v.same_as(old):
                return new
        return v
    return tvm_ffi.structural_map(node, (tirx.Var, on_var))


def _recover(parts: list, index: tirx.Var) -> list[tuple]:
    """(epilogue iterator, its value) pairs from the GEMM's row or column ``index``."""
    pairs = []
    for k, (var, stride, extent) in enumerate(parts):
        value = index if stride == 1 else index // tirx.IntImm(_dtype(index), stride)
        if k:  # the outermost needs no modulo: the index stays below the whole extent
            value = value % tirx.IntImm(_dtype(index), extent)
        pairs.append((var, value if _dtype(var) == _dtype(index) else tirx.Cast(_dtype(var),
                                                                               value)))
    return pairs


def _flat_thread(threads: list[tirx.For]) -> tuple[tirx.Expr, int]:
    """(this thread's index in its block, threads per block), ``threadIdx.x`` fastest -- the
    order of the lanes of a warp, so that consecutive indices make coalesced accesses."""
    order = {"threadIdx.x": 0, "threadIdx.y": 1, "threadIdx.z": 2}
    flat, count = None, 1
    for lp in sorted(threads, key=lambda lp: order[_thread_tag(lp)]):
        term = lp.loop_var if count == 1 else lp.loop_var * tirx.IntImm(_dtype(lp.loop_var),
                                                                         count)
        flat = term if flat is None else flat + term
        count *= int(lp.extent)
    return flat, count


def tail_batch() -> int:
    """Outputs per thread whose partial products the last block loads before it sums any of
    them (``TVM_SMARTMEM_SPLIT_K_TAIL_BATCH``; default :data:`TAIL_BATCH`)."""
    return switches.integer(TAIL_ENV, TAIL_BATCH, range(1, 1 << 16),
                            "a positive number of outputs")


def _epilogue_nest(gemm: _Gemm, epi: _Epilogue, partial: tirx.Buffer, regs: tirx.Buffer,
                   batch: int, target: Target) -> tirx.Stmt:
    """The last block's sum: the tile's outputs walked row-major by the whole block (one
    output per thread per step, consecutive threads on consecutive columns: coalesced reads
    of the partial products and writes of the result).  ``batch`` steps at a time, the
    partial products of all of them are first loaded into registers (``regs``) and only then
    summed in order 0..S-1, through the epilogue, and written: one step at a time, each
    thread would wait a full L2 round trip per step (16 steps of a 32 x 64 tile on 128
    threads), and that wait is the tail of the whole kernel."""
    flat, count = _flat_thread(gemm.threads)
    dtype = _dtype(gemm.row0)

    def const(v: int):
        return tirx.IntImm(dtype, v)

    flat = flat if _dtype(flat) == dtype else tirx.Cast(dtype, flat)
    cells = gemm.tile_rows * gemm.tile_cols
    steps = -(-cells // count)
    batch = max(1, min(batch, steps))
    group = tirx.Var("splitk_group", dtype)
    slot = tirx.Var("splitk_slot", dtype)
    index = (group * const(batch) + slot) * const(count) + flat
    rows, cols = gemm.extent
    m = gemm.row0 + index // const(gemm.tile_cols)
    n = gemm.col0 + index % const(gemm.tile_cols)
    inside = tirx.And(tirx.And(index < const(cells), m < const(rows)), n < const(cols))
    if steps % batch:  # the last group's slots past the tile's steps
        inside = tirx.And(group * const(batch) + slot < const(steps), inside)
    splits = gemm.splits

    # the loads: regs[slot * S + k] = p[k, m, n]
    index_of = _partial_index(epi)
    loads = []
    for k in range(splits):
        load = tirx.BufferLoad(partial, [tirx.IntImm(_dtype(index_of[0]), k),
                                         *_at(index_of, epi, m, n)])
        if target.kind.name == "cuda":  # from L2, past this multiprocessor's L1 (see above)
            load = tirx.call_extern(str(partial.dtype), "__ldcg", tirx.address_of(load))
        loads.append(tirx.BufferStore(regs, load, [slot * const(splits) + const(k)]))
    fetch = tirx.For(slot, const(0), const(batch), tirx.ForKind.UNROLLED,
                     tirx.IfThenElse(inside, tirx.SeqStmt(loads), None))

    # the sums: the epilogue block, its reads of p[k] now of regs[slot * S + k]
    vm = tirx.IterVar(tvm.ir.Range.from_min_extent(const(0), const(rows)),
                      tirx.Var("v_m", dtype), tirx.IterVar.DataPar)
    vn = tirx.IterVar(tvm.ir.Range.from_min_extent(const(0), const(cols)),
                      tirx.Var("v_n", dtype), tirx.IterVar.DataPar)
    vs = tirx.IterVar(tvm.ir.Range.from_min_extent(const(0), const(batch)),
                      tirx.Var("v_slot", dtype), tirx.IterVar.DataPar)
    body = _rename(epi.block.body, _at_output(epi, vm.var, vn.var))
    # each partial product read once into a variable (an epilogue may read the sum twice, as
    # GELU does: the compiler merges repeated plain loads, not repeated __ldcg calls)
    reads = [tirx.Var(f"p{k}", str(partial.dtype)) for k in range(splits)]

    def on_load(load):
        if not load.source.same_as(epi.partial):
            return load
        return reads[int(load.indices[0])]

    value = tvm_ffi.structural_map(body.value, (ir.TensorLoad, on_load))
    for k in reversed(range(splits)):
        value = tirx.Let(reads[k], tirx.BufferLoad(regs, [vs.var * const(splits) + const(k)]),
                         value)
    body = tirx.BufferStore(body.buffer, value, body.indices)
    block = s_tir.SBlock([vm, vn, vs], [], [], "splitk_epilogue", body)
    reads_, writes = s_tir.analysis.get_sblock_read_write_region(block, {})
    block = s_tir.SBlock([vm, vn, vs], reads_, writes, "splitk_epilogue", body)
    realize = s_tir.SBlockRealize([m, n, slot], inside, block)
    summed = tirx.For(slot, const(0), const(batch), tirx.ForKind.UNROLLED, realize)
    return tirx.For(group, const(0), const(-(-steps // batch)), tirx.ForKind.UNROLLED,
                    tirx.SeqStmt([fetch, summed]))


def _partial_index(epi: _Epilogue) -> list:
    """The indices (after the split axis) at which the epilogue block reads ``p``."""
    found: list = []

    def on_load(load):
        if load.source.same_as(epi.partial) and not found:
            found.extend(load.indices[1:])
        return load

    tvm_ffi.structural_map(epi.block.body.value, (ir.TensorLoad, on_load))
    return found


def _at_output(epi: _Epilogue, m, n) -> list[tuple]:
    """(epilogue iterator, value) pairs that put the epilogue block at output row ``m`` and
    column ``n`` (its unit iterators at zero)."""
    return _recover(epi.rows, m) + _recover(epi.cols, n) + \
        [(v, tirx.IntImm(_dtype(v), 0)) for v in epi.unit]


def _at(indices: list, epi: _Epilogue, m, n) -> list:
    """``indices`` (in the epilogue block's iterators) at output row ``m`` and column ``n``."""
    subst = _at_output(epi, m, n)
    return [_rename(i, subst) for i in indices]


def _fence(target: Target) -> tirx.Stmt:
    if target.kind.name == "cuda":
        return tirx.Evaluate(tirx.call_extern("void", "__threadfence"))
    return tirx.Evaluate(tirx.call_extern("void", "mem_fence",
                                          tirx.IntImm("int32", CLK_GLOBAL_MEM_FENCE)))


def _atomic_add(target: Target, address, value) -> tirx.Expr:
    name = "atomicAdd" if target.kind.name == "cuda" else "atomic_add"
    return tirx.call_extern("int32", name, address, value)


def _tail(gemm: _Gemm, epi: _Epilogue, partial, counters, flag, last, regs, batch: int,
          target: Target) -> tirx.Stmt:
    """Count this thread block in its tile's counter; the last one sums and writes."""
    zero = [tirx.EQ(lp.loop_var, tirx.IntImm(_dtype(lp.loop_var), 0)) for lp in gemm.threads]
    first = zero[0]
    for cond in zero[1:]:
        first = tirx.And(first, cond)
    tile = tirx.Cast("int32", gemm.tile) if _dtype(gemm.tile) != "int32" else gemm.tile
    zero32 = tirx.IntImm("int32", 0)
    sync = tirx.Evaluate(tirx.op.tvm_storage_sync("shared"))
    count = tirx.BufferStore(flag, _atomic_add(target, tirx.address_of(
        tirx.BufferLoad(counters, [tile])), tirx.IntImm("int32", 1)), [zero32])
    reset = tirx.BufferStore(counters, zero32, [tile])
    summed = tirx.SeqStmt([_fence(target),
                           _epilogue_nest(gemm, epi, partial, regs, batch, target),
                           tirx.IfThenElse(first, reset, None)])
    return tirx.SeqStmt([
        _fence(target), sync,
        tirx.IfThenElse(first, count, None),
        sync,
        # the flag is copied to a register first: TVM's shared-memory access analysis does not
        # take a shared read in a branch condition
        tirx.BufferStore(last, tirx.BufferLoad(flag, [zero32]), [zero32]),
        tirx.IfThenElse(tirx.EQ(tirx.BufferLoad(last, [zero32]),
                                tirx.IntImm("int32", gemm.splits - 1)), summed, None),
    ])


def fuse_kernels(gemm_func: tirx.PrimFunc, epi_func: tirx.PrimFunc, partial_param: int,
                 target: Target) -> tuple[tirx.PrimFunc, int] | None:
    """(the fused kernel, number of counters), or None where the shapes are not the simple
    ones this pass takes.  Parameters of the fused kernel: the GEMM's inputs, the epilogue
    kernel's inputs but ``p``, the counters, then the outputs ``p`` and ``y``."""
    gemm = analyse_gemm(gemm_func)
    if gemm is None:
        return None
    epi = analyse_epilogue(epi_func, partial_param, gemm.splits)
    if epi is None:
        return None
    partial = gemm_func.params[-1]
    if _static(partial.shape) != _static(epi.partial.shape) or partial.dtype != epi.partial.dtype:
        return None
    itemsize = max(tvm.DataType(str(partial.dtype)).bits // 8, 1)
    if target.kind.name != "cuda" and (int(partial.shape[2]) * itemsize % CACHE_LINE or
                                       gemm.tile_cols * itemsize % CACHE_LINE):
        return None
    counters = tirx.decl_buffer((gemm.tiles,), "int32", name="splitk_counters")
    flag = tirx.decl_buffer((1,), "int32", name="splitk_arrivals", scope="shared")
    last = tirx.decl_buffer((1,), "int32", name="splitk_arrived", scope="local")
    batch = tail_batch()
    regs = tirx.decl_buffer((batch * gemm.splits,), str(partial.dtype), name="splitk_partials",
                            scope="local")
    tail = _tail(gemm, epi, partial, counters, flag, last, regs, batch, target)
    # the tail goes right after the write-back nest, inside the innermost thread loop
    inner = gemm.threads[-1]

    def on_for(loop):
        if not loop.same_as(inner):
            return loop
        seq = list(loop.body.seq)
        at = next(k for k, s in enumerate(seq) if s.same_as(gemm.nest))
        body = tirx.SeqStmt([*seq[:at + 1], tail, *seq[at + 1:]])
        return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body,
                        loop.thread_binding, loop.annotations)

    body = tvm_ffi.structural_map(gemm_func.body, (tirx.For, on_for))
    root = body.block
    root = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, root.body,
                        root.init, [*root.alloc_buffers, flag, last, regs], root.match_buffers,
                        root.annotations)
    body = s_tir.SBlockRealize(body.iter_values, body.predicate, root)
    epi_inputs = [p for k, p in enumerate(epi_func.params[:-1]) if k != partial_param]
    params = [*gemm_func.params[:-1], *epi_inputs, counters, partial, epi_func.params[-1]]
    attrs = dict(gemm_func.attrs) if gemm_func.attrs is not None else {}
    attrs[RULE] = f"{attrs.get(RULE, 'Matmul')}+SplitKReduction"
    attrs.pop("global_symbol", None)
    kernel = tirx.PrimFunc(params, body)
    for key, value in attrs.items():
        kernel = kernel.with_attr(key, value)
    return kernel, gemm.tiles


# -- Relax ---------------------------------------------------------------------------------------

def _call_tir(value) -> tuple | None:
    """(callee, args) of a plain ``R.call_tir`` with one tensor output, else None."""
    if not isinstance(value, relax.Call) or not isinstance(value.op, ir.Op) or \
            value.op.name != "relax.call_tir" or len(value.args) != 2:
        return None
    if not isinstance(value.args[1], relax.Tuple) or len(value.ty_args) != 1 or \
            not isinstance(value.ty_args[0], relax.TensorType):
        return None
    return value.args[0], list(value.args[1].fields)


def _use_counts(func: relax.Function) -> list:
    """Every variable use in ``func`` (a list: the same Var object once per use)."""
    used: list = []

    def visit(expr):
        if isinstance(expr, relax.Call):
            used.extend(a for a in expr.args if isinstance(a, relax.Var))
        elif isinstance(expr, relax.Tuple):
            used.extend(f for f in expr.fields if isinstance(f, relax.Var))
        elif isinstance(expr, relax.TupleGetItem) and isinstance(expr.tuple_value, relax.Var):
            used.append(expr.tuple_value)
    relax.analysis.post_order_visit(func.body, visit)
    body = func.body.body
    if isinstance(body, relax.Var):
        used.append(body)
    return used


def _key(var) -> int:
    """A key naming the variable itself (Python's ``id`` names one wrapper of it)."""
    return var.__chandle__()


def _count(used: list, var) -> int:
    return sum(1 for u in used if u.same_as(var))


def fuse_in_function(builder: relax.BlockBuilder, func: relax.Function, target: Target
                     ) -> tuple[relax.Function, int]:
    """(``func`` with every fusable split-K pair fused, pairs fused); the fused kernels are
    added to ``builder``'s module."""
    mod = builder.get()
    used = _use_counts(func)
    fused = 0
    blocks = []
    for block in func.body.blocks:
        producers = {}
        for b in block.bindings:
            if isinstance(b, relax.VarBinding) and _call_tir(b.value) is not None:
                producers[_key(b.var)] = b
        drop: set[int] = set()
        replace: dict[int, list] = {}
        for b in block.bindings:
            call = _call_tir(b.value) if isinstance(b, relax.VarBinding) else None
            if call is None:
                continue
            callee, args = call
            hits = [(k, a) for k, a in enumerate(args)
                    if isinstance(a, relax.Var) and _key(a) in producers and _key(a) not in drop]
            for k, p in hits:
                if _count(used, p) != 1:
                    continue
                g_callee, g_args = _call_tir(producers[_key(p)].value)
                if not isinstance(mod[g_callee], tirx.PrimFunc) or \
                        not isinstance(mod[callee], tirx.PrimFunc):
                    continue
                made = fuse_kernels(mod[g_callee], mod[callee], k, target)
                if made is None:
                    continue
                kernel, tiles = made
                new_gv = builder.add_func(kernel, f"{g_callee.name_hint}_splitk")
                counters = relax.const(np.zeros(tiles, "int32"))
                e_args = [a for j, a in enumerate(args) if j != k]
                p_ty, y_ty = p.ty, b.var.ty
                kind = relax.DataflowVar if isinstance(b.var, relax.DataflowVar) else relax.Var
                pair = kind(f"{p.name}_splitk", relax.TupleType([p_ty, y_ty]))
                value = relax.call_tir(new_gv, relax.Tuple([*g_args, *e_args, counters]),
                                       [p_ty, y_ty])
                replace[_key(b.var)] = [relax.VarBinding(pair, value),
                                      relax.VarBinding(b.var, relax.TupleGetItem(pair, 1))]
                drop.add(_key(p))
                fused += 1
                break
        new_bindings = []
        for b in block.bindings:
            if _key(b.var) in drop:
                continue
            new_bindings.extend(replace.get(_key(b.var), [b]))
        blocks.append(relax.DataflowBlock(new_bindings) if isinstance(block, relax.DataflowBlock)
                      else relax.BindingBlock(new_bindings))
    if not fused:
        return func, 0
    body = relax.SeqExpr(blocks, func.body.body)
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs), fused


@tvm.transform.module_pass(opt_level=0, name="FuseSplitKReduction")
class FuseSplitKReduction:
    """Fuse each split-K GEMM with the element-wise kernel that sums its partial products
    (see module doc).  Runs after the schedule rules, on GPU targets (CUDA, OpenCL)."""

    def __init__(self, target: Target | None = None):
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or Target.current(allow_none=True)
        if target is None or target.kind.name not in ("cuda", "opencl"):
            return mod
        mode = switches.choice(ENV, DEFAULT, MODES)
        if mode == "off" or (mode == "on" and target.kind.name != "cuda"):
            return mod
        builder = relax.BlockBuilder(mod)
        total = 0
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function):
                continue
            new, fused = fuse_in_function(builder, func, target)
            if fused:
                builder.update_func(gv, new.with_attr("smartmem.split_k_reductions_fused", fused))
                total += fused
        if not total:
            return mod
        mod = relax.transform.Normalize()(builder.get())
        return relax.transform.DeadCodeElimination()(mod)

"""NormalisedMatmul: a layer normalisation computed inside the GEMM that reads it.

A pre-LN transformer normalises the residual stream right before each projection
(``LN -> QKV``, ``LN -> MLP-up``).  TVM -- and DNNFusion's table, many-to-many into
many-to-many is red -- makes that two kernels: the layernorm writes ``y = LN(x)`` and the GEMM
reads ``y``.  ``FusePlan`` glues the pair into one function where this rule is on
(:func:`norm_prologue_enabled`) and after ``FuseTIR`` it is a chain of blocks::

    x_sum[r]      += x[r, k]                          (row statistics: reductions over K)
    x_var_sum[r]  += (x[r, k] - x_sum[r] / K) ** 2
    y[r, k]        = (x[r, k] - mean[r]) * rsqrt(var[r] + eps) * g[k] + b[k]
    C[r, n]       += y[r, k] * W[k, n]                (+ epilogue)

The GEMM keeps the schedule it would get alone (``TunedMatmul``, dlight's tiling with the
measured knobs): the rule schedules the function without the statistics blocks -- their
results become parameters -- so the normalisation is an injective prologue that dlight folds
into the shared-memory load of ``y``'s tile.  Then the statistics blocks are put back and
computed at the thread block's loop: each block first reduces the rows of its tile (the
K-reduction split over ``threadIdx.x`` by ``rfactor``, rows over ``threadIdx.y``, partial
sums in registers, row results in shared memory) and normalises ``x`` on its way into shared
memory.  The statistics are stored over flat rows, as the GEMM tiles them, so a tile of rows
folded from batch axes (ConvNeXt's 56 x 56 pixels, MobileViT's patches) reduces exactly its
own rows wherever it starts.  They are recomputed by every column tile of a row tile -- reads
of ``x`` that hit L2 -- in exchange for one launch and a round trip of ``y`` through global
memory per layernorm.

On the H100 that trade loses for wide rows: DeiT-S / ViT-B / GPT-2 / Swin-T builds gluing
every layernorm were 4-11% slower (``benchmarks/results/gpu_h100_variants_1ab389e.md``).  For
rows up to ``SHORT_ROW`` wide (``short``) it is at par or better -- MobileViT-S 1.00x,
Swin-T 1.00x, ConvNeXt-T 1.015x, UNet-tiny 1.00x (``gpu_h100_norm_short_7ea0a97.md``) -- and
takes MobileViT-S under half of TVM's kernels, so ``short`` is CUDA's default; ``on`` is the
kernel-count configuration, ``off`` the default elsewhere (unmeasured there).

Anything else -- one reduction block only, statistics the GEMM's loop nest cannot host, a GEMM
the matmul rule declines -- is declined (``None``) and the next rule takes the kernel.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from .. import switches
from .schedules import _fused

#: ``on`` makes FusePlan glue a layernorm to the GEMM that alone reads it (measured slower on
#: the H100, see the module doc); ``short`` glues only normalised rows up to ``SHORT_ROW``
#: wide, and those GEMMs then stay whole (``SplitKMatmul`` leaves them); default per target
#: kind, :data:`DEFAULT_MODE`.
ENV = "TVM_SMARTMEM_NORM_PROLOGUE"
MODES = ("off", "on", "short")

#: widest normalised row ``short`` glues.  A GEMM reducing over so short a row gains little
#: from a split (each thread block walks at most four 64-wide steps of it), while a split
#: GEMM cannot take the layernorm as its prologue -- the layernorm then keeps a kernel.
SHORT_ROW = 256
#: Steps of a thread's statistics loop (rows x reduction chunk) unrolled at most.
UNROLL_STEPS = 256


#: The mode of a target kind where ``TVM_SMARTMEM_NORM_PROLOGUE`` is not set, where measured
#: (``benchmarks/results/gpu_h100_norm_short_7ea0a97.md``: ``short`` on the H100, >= 1.00x on
#: every model it changes); other kinds ``off``.
DEFAULT_MODE = {"cuda": "short"}


def norm_prologue_mode(target=None) -> str:
    """``TVM_SMARTMEM_NORM_PROLOGUE``: ``off``, ``on`` or ``short``; unset, ``target``'s kind's
    :data:`DEFAULT_MODE` (``off`` without a target)."""
    kind = target.kind.name if target is not None else None
    return switches.choice(ENV, DEFAULT_MODE.get(kind, "off"), MODES)


def norm_prologue_enabled(target=None) -> bool:
    """Is the layernorm -> GEMM glue on for ``target``, for some rows at least?"""
    return norm_prologue_mode(target) != "off"


def glued_row_limit(mode: str | None = None, target=None) -> int | None:
    """The widest normalised row the glue takes in ``mode`` (default: ``target``'s, see
    :func:`norm_prologue_mode`); None when the glue is off."""
    mode = norm_prologue_mode(target) if mode is None else mode
    if mode == "off":
        return None
    return SHORT_ROW if mode == "short" else 1 << 30


def _gemm_rule(gemm=None):
    if gemm is not None:
        return gemm
    from .matmul import TunedMatmul

    return TunedMatmul()


def statistic_lanes(target, gemm=None) -> int:
    """Threads that share one row's statistics: the GEMM's ``threadIdx.x`` extent."""
    config = _gemm_rule(gemm).get_configs(target)
    return int(config.block_size_x)


def row_tile(target, gemm=None) -> int:
    """Rows of the GEMM's thread-block tile (dlight's ``x`` kernel size)."""
    config = _gemm_rule(gemm).get_configs(target)
    return int(config.vthread_x * config.block_size_x * config.micro_size_x)


#: Output widths the rule is glued for: a multiple of this.  Some narrow widths (6, 10, 14
#: columns) leave dlight's padded GEMM tiles in a form where the statistics cannot be computed
#: at the thread block -- projections are multiples of 16 wide in every zoo model.
COLUMN_MULTIPLE = 16


def norm_prologue_fits(shape: tuple, target, columns: int | None = None, gemm=None) -> bool:
    """Can this rule compute the statistics of a norm over the last axis of ``shape`` inside
    ``target``'s GEMM (``columns`` wide, when given)?  More than one row (one row is a GEMV,
    dlight's GEMV rule), the row split evenly over the lanes (an uneven split would need a
    predicate that ``compute_at`` drops), and a multiple of ``COLUMN_MULTIPLE`` columns.
    Batch axes (MobileViT's patch pixels) are folded into the GEMM's rows; the folded rows must
    then fill whole row tiles, since a padded tile would read the statistics of a batch that
    does not exist (``compute_at`` rejects that region)."""
    if target is None or target.kind.name not in ("cuda", "opencl") or \
            "texture" in target.keys or len(shape) < 2 or int(shape[-2]) < 2 or \
            (columns is not None and columns % COLUMN_MULTIPLE):
        return False
    batch = 1
    for d in shape[:-2]:
        batch *= int(d)
    if batch > 1 and (batch * int(shape[-2])) % row_tile(target, gemm):
        return False
    return int(shape[-1]) % statistic_lanes(target, gemm) == 0


def _nests(root: s_tir.SBlock) -> list:
    body = root.body
    return list(body.seq) if isinstance(body, tirx.SeqStmt) else [body]


def _block_of(nest) -> s_tir.SBlock | None:
    while isinstance(nest, tirx.For):
        nest = nest.body
    return nest.block if isinstance(nest, s_tir.SBlockRealize) else None


def _is_reduction(block: s_tir.SBlock) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars)


def _with_root(func: tirx.PrimFunc, params: list, nests: list, allocs: list) -> tirx.PrimFunc:
    """``func`` with other parameters, root statements and root allocations."""
    root = func.body.block
    block = s_tir.SBlock(list(root.iter_vars), list(root.reads), list(root.writes),
                         root.name_hint, tirx.SeqStmt(nests) if len(nests) > 1 else nests[0],
                         root.init, allocs, list(root.match_buffers), dict(root.annotations))
    return tirx.PrimFunc(params, s_tir.SBlockRealize([], True, block), func.ret_type,
                         func.attrs)


def _inline_spatial_into_statistics(sch: s_tir.Schedule) -> bool:
    """Inline every spatial block read by an earlier-than-last reduction (the statistics must
    read parameters only: after the GEMM is scheduled, nothing else is left for them to read)
    and the spatial blocks between statistics (the mean).  False where one cannot be."""
    while True:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        stmts = [sch.get(b) for b in blocks]
        reductions = [i for i, b in enumerate(stmts) if _is_reduction(b)]
        if len(reductions) < 2:
            return False
        stats = reductions[:-1]
        read = {r.source for i in stats for r in stmts[i].reads}
        producers = [i for i, b in enumerate(stmts) if not _is_reduction(b) and i < stats[-1]
                     and any(w.source in read for w in b.writes)]
        if not producers:
            return True
        try:
            sch.compute_inline(blocks[producers[0]])
        except s_tir.ScheduleError:
            return False


def _flat_rows(rows: list[int]):
    """Index map folding row axes of extents ``rows`` into one row index, row-major."""
    def fold(*idx):
        flat = idx[0]
        for i, extent in zip(idx[1:], rows[1:], strict=True):
            flat = flat * extent + i
        return flat
    return fold


def _flatten_statistic(sch: s_tir.Schedule, block, rows: list[int]) -> None:
    """Store ``block``'s result flat and iterate it over (flat row, reduction)."""
    fold = _flat_rows(rows)
    sch.transform_layout(block, ("write", 0),
                         tirx.IndexMap.from_func(lambda *i: [fold(*i)], ndim=len(rows)))
    sch.transform_block_layout(block, tirx.IndexMap.from_func(
        lambda *i: [fold(*i[:-1]), i[-1]], ndim=len(rows) + 1))


def _flatten_statistics(sch: s_tir.Schedule, names: list[str]) -> None:
    """Give each statistics block one row axis (and its result one dimension).

    The thread block of a GEMM tiles the rows flattened (dlight's reindex), so it reads row
    ``r``'s statistics at ``[r // W, r % W]`` where the rows were folded from batch axes
    (ConvNeXt's 56 x 56 pixels, MobileViT's patches).  ``compute_at`` bounds that region per
    axis -- a box over whole ``W``-rows whenever a tile does not align with them -- which
    ``bind`` then refuses as non-affine.  Stored flat, the same read is ``r`` (once
    simplified, :func:`_simplify_reads_of`), and the region a tile needs is exactly its
    rows."""
    for name in names:
        block = sch.get_sblock(name)
        rows = [int(iv.dom.extent) for iv in sch.get(block).iter_vars[:-1]]
        if len(rows) > 1:
            _flatten_statistic(sch, block, rows)


def _simplify_reads_of(sch: s_tir.Schedule, name: str) -> None:
    """Simplify every index into the buffer block ``name`` writes (``r // W * W + r % W`` ->
    ``r``, left by dlight's reindex of the GEMM's rows): an identity ``transform_layout``
    rewrites each access through the analyzer."""
    block = sch.get_sblock(name)
    ndim = len(sch.get(block).writes[0].source.shape)
    sch.transform_layout(block, ("write", 0),
                         tirx.IndexMap.from_func(lambda *i: list(i), ndim=ndim))


def _bound_loops(sch: s_tir.Schedule, block) -> list[tuple]:
    """(thread tag, loop, extent) of ``block``'s thread-bound loops, outermost first."""
    out = []
    for loop in sch.get_loops(block):
        binding = sch.get(loop).thread_binding
        if binding is not None:
            out.append((binding.thread_tag, loop, int(sch.get(loop).extent)))
    return out


def _gemm_block(sch: s_tir.Schedule, name: str):
    """The GEMM's accumulating block (dlight splits off its initialisation as ``_init``)."""
    try:
        return sch.get_sblock(name + "_update")
    except (s_tir.ScheduleError, ValueError):
        return sch.get_sblock(name)


def _below(sch: s_tir.Schedule, block, at) -> list:
    """``block``'s loops inside loop ``at``."""
    loops = sch.get_loops(block)
    depth = next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(at)))
    return loops[depth + 1:]


def _schedule_statistic(sch: s_tir.Schedule, name: str, at, tx: int, ty: int) -> None:
    """Rows over ``threadIdx.y``, the K reduction split over ``threadIdx.x`` (``rfactor``: the
    partial sums in registers, then in shared memory), the final sum per row by ``ty``."""
    rf_block = sch.get_sblock(name + "_rf")
    lane, *rows, k_outer = _below(sch, rf_block, at)
    rows_o, rows_i = sch.split(_fused(sch, rows), [None, ty])
    sch.reorder(rows_i, lane, rows_o, k_outer)
    sch.bind(rows_i, "threadIdx.y")
    sch.bind(lane, "threadIdx.x")
    partial = sch.cache_write(rf_block, 0, "local")
    sch.reverse_compute_at(partial, rows_o, preserve_unit_loops=True)
    # unrolled, each thread's loads of x are independent instructions in flight together
    # instead of one load-then-add round trip per step (the statistics are a serial prefix
    # of every thread block: their latency adds to the kernel's)
    sch.annotate(rows_o, "pragma_auto_unroll_max_step", UNROLL_STEPS)
    sch.annotate(rows_o, "pragma_unroll_explicit", 1)
    block = sch.get_sblock(name)
    total = sch.cache_write(block, 0, "local")
    lanes, *rows = _below(sch, block, at)
    rows_o, rows_i = sch.split(_fused(sch, rows), [None, ty])
    sch.reorder(rows_i, rows_o, lanes)
    sch.bind(rows_i, "threadIdx.y")
    sch.reverse_compute_at(total, rows_o, preserve_unit_loops=True)


class NormalisedMatmul:
    """Schedule rule for a GEMM whose operand is normalised in the same kernel (module doc).

    ``gemm`` is the rule the GEMM gets alone (``TunedMatmul`` in the smartmem pipeline)."""

    def __init__(self, gemm=None):
        self.gemm = _gemm_rule(gemm)

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name not in ("cuda", "opencl"):
            return None
        sch = s_tir.Schedule(func)
        if not _inline_spatial_into_statistics(sch):
            return None
        names = _statistics(sch)
        lanes = statistic_lanes(target, self.gemm)
        if not names or any(int(sch.get(sch.get_sblock(n)).iter_vars[-1].dom.extent) % lanes
                            for n in names):
            return None  # see norm_prologue_fits
        try:
            _flatten_statistics(sch, names)
        except s_tir.ScheduleError:
            return None
        for name in names:  # each row's sum split over the lanes (in the plain function, where
            k = sch.get_loops(sch.get_sblock(name))[-1]  # rfactor's preconditions hold)
            sch.rfactor(sch.split(k, [None, lanes])[1], 0)
        func = sch.mod["main"]
        nests = _nests(func.body.block)
        blocks = [_block_of(n) for n in nests]
        if any(b is None for b in blocks):
            return None
        stats = [i for i, b in enumerate(blocks) if _is_reduction(b)][:-1]
        results = [w.source for i in stats for w in blocks[i].writes]
        allocs = list(func.body.block.alloc_buffers)
        try:
            return self._glue(func, target, tunable, nests, blocks, stats, results, allocs,
                              names, lanes)
        except (s_tir.ScheduleError, RuntimeError):
            return None  # this GEMM tiling cannot host the statistics

    def _glue(self, func, target, tunable, nests, blocks, stats, results, allocs, names, lanes):
        # 1. the GEMM alone, the statistics as parameters: dlight inlines the normalisation
        alone = _with_root(func, [*func.params, *results],
                           [n for i, n in enumerate(nests) if i not in stats],
                           [a for a in allocs if not any(a.same_as(r) for r in results)])
        space = self.gemm.apply(alone, target, tunable)
        if space is None:
            return None
        scheduled = (space if isinstance(space, s_tir.Schedule) else space[0]).mod["main"]
        # 2. the statistics back in front, computed per thread block on its threads
        whole = _with_root(scheduled, list(func.params),
                           [nests[i] for i in stats] + _nests(scheduled.body.block),
                           [*scheduled.body.block.alloc_buffers, *results])
        sch = s_tir.Schedule(whole)
        gemm_name = [b for b in blocks if _is_reduction(b)][-1].name_hint
        bound = _bound_loops(sch, _gemm_block(sch, gemm_name))
        extents = {tag: extent for tag, _, extent in bound}
        grid = [loop for tag, loop, _ in bound if tag.startswith("blockIdx")]
        if not grid or extents.get("threadIdx.x") != lanes or "threadIdx.y" not in extents:
            return None
        at = grid[-1]
        for name in names:  # the results the GEMM's operand load reads
            _simplify_reads_of(sch, name)
        for i in reversed(stats):
            block = sch.get_sblock(blocks[i].name_hint)
            sch.compute_at(block, at, preserve_unit_loops=True)
            sch.set_scope(block, 0, "shared")
        for name in names:
            _schedule_statistic(sch, name, at, lanes, extents["threadIdx.y"])
        return sch


def _statistics(sch: s_tir.Schedule) -> list[str]:
    """Names of the reductions before the last one (the GEMM) when each reduces one axis, its
    last, over rows (its other axes); [] otherwise."""
    blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    reductions = [b for b in blocks if _is_reduction(b)]
    stats = reductions[:-1]
    if any(len(b.iter_vars) < 2 or
           sum(iv.iter_type == tirx.IterVar.CommReduce for iv in b.iter_vars) != 1 or
           b.iter_vars[-1].iter_type != tirx.IterVar.CommReduce for b in stats):
        return []
    return [b.name_hint for b in stats]

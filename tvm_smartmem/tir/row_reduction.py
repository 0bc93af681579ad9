"""RowReductionWithSideOutputs: a normalisation that also stores the row it normalises.

A pre-LN transformer (GPT-2, ViT, CLIP, LLaMA with RMSNorm) adds each sublayer's result to the
residual stream and normalises the sum::

    x'  = x + (h @ W + b)        read again by the next residual add
    y   = layernorm(x')          read by the next GEMM

When the GEMM is split along k (``transform.split_k``), its partial products are summed in a
kernel of their own; ``FusePlan`` can put that sum, the bias, the residual and the layernorm in
one kernel only if the kernel writes ``x'`` too (``Planner._row_side_outputs``).  dlight's
``GeneralReduction`` declines a kernel with two outputs and ``Fallback`` schedules it one thread
per element, the statistics recomputed serially -- so this rule, tried before them, schedules
it as one thread block per row::

    for row in blockIdx.x:
        x'[row, :] -> shared memory           (the prologue, computed once)
        x'[row, :] shared -> global           (the side output, coalesced)
        row statistics from shared            (cross-thread reductions)
        y[row, :] from shared + statistics    (the epilogue)

The side output never travels to global memory and back within the kernel, so the fused
kernel reads the partial products once, where the split pair of kernels read them once and
``x'`` twice more.  Declined (``None``) unless every side output is written in the row's own
layout (rows outer, row inner: the copy iterates the buffer), the rows are static, the cached
rows fit in shared memory and no buffer is a texture.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from .attention import shared_budget
from .schedules import _fused, _normalized_blocks, _row_shape, _unroll, texture_params


def _row_threads(row: int, max_threads: int, widest: int) -> int:
    """Threads along a row: a power of two covering the row, between a warp and ``widest``."""
    threads = 32
    while threads < row and threads < min(widest, max_threads):
        threads *= 2
    return threads


def _leading_side_blocks(sch: s_tir.Schedule, infos, func: tirx.PrimFunc) -> list:
    """The injective blocks before the first reduction that write a parameter of ``func``."""
    side = []
    for info in infos[:-1]:
        if "R" in info.dom_kind() or not info.is_injective():
            break
        writes = sch.get(info.block_rv).writes
        if len(writes) != 1 or not any(writes[0].source.same_as(p) for p in func.params):
            return []
        side.append(info)
    return side


def _writes_row_major(sch: s_tir.Schedule, info, extents: list[int]) -> bool:
    """Does the block store element ``(i..., j...)`` of the iteration at the same position of
    its buffer (unit axes aside)?  Then the buffer is rows outer, row inner, and a copy that
    iterates the buffer in order copies one row per thread block."""
    block = sch.get(info.block_rv)
    write = block.writes[0]
    shape = [int(d) for d in write.source.shape]
    indices = [r.min for d, r in zip(shape, write.region, strict=True) if d != 1]
    loop_vars = [iv.var for iv in block.iter_vars if int(iv.dom.extent) != 1]
    return [d for d in shape if d != 1] == [e for e in extents if e != 1] and \
        len(indices) == len(loop_vars) and \
        all(i.same_as(v) for i, v in zip(indices, loop_vars, strict=True))


def _rows_and_row(sch: s_tir.Schedule, copy, rows: int, row: int) -> tuple:
    """The copy's loops as (rows, row): the buffer's row axes fused, then its row axes.  Fusing
    them all and splitting the result would index the buffer through ``(r * row + t) // ...``
    -- a 2-D grid of rows (Swin's 28 x 28 tokens) then loses its row in the region analysis,
    and the shared-memory cache of one row grows to the whole tensor (600 KB for Swin-T's
    second stage, which no GPU builds)."""
    loops = sch.get_loops(copy)
    extents = [int(sch.get(loop).extent) for loop in loops]
    split, size = 0, 1
    while split < len(loops) and size < rows:
        size *= extents[split]
        split += 1
    if split == 0 or split == len(loops) or size != rows:
        return tuple(sch.split(_fused(sch, loops), [rows, row]))
    return _fused(sch, loops[:split]), _fused(sch, loops[split:])


class RowReductionWithSideOutputs(dl.ScheduleRule):
    """One thread block per row for a normalisation kernel that also stores its prologue
    (see the module doc).  ``widest``: most threads along a row."""

    def __init__(self, widest: int = 256):
        self.widest = widest

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name not in ("cuda", "opencl") \
                or texture_params(func):
            return None
        sch, infos = _normalized_blocks(func)
        if not infos:
            return None
        side = _leading_side_blocks(sch, infos, func)
        rest = infos[len(side):]
        shape = _row_shape(rest) if side and len(rest) >= 2 else None
        if shape is None:
            return None
        n_spatial, n_reduce, rows, row = shape
        extents = [info.dom for info in rest[0].iters]
        if any(info.dom_kind() != "S" * len(extents)
               or [it.dom for it in info.iters] != extents
               or not _writes_row_major(sch, info, extents) for info in side):
            return None
        cached = sum(row * max(sch.get(s.block_rv).writes[0].source.dtype.bits // 8, 1)
                     for s in side)
        if cached > shared_budget(target) // 2:
            return None
        threads = _row_threads(row, int(target.attrs.get("max_num_threads", 1024)), self.widest)
        return self._schedule(sch, side, rest, n_spatial, n_reduce, rows, row, threads)

    @staticmethod
    def _schedule(sch, side, rest, n_spatial, n_reduce, rows, row, threads):
        lanes, serials = [], []

        def spread(loop):
            serial, lane = sch.split(loop, [None, threads])
            serials.append(serial)
            lanes.append(lane)

        # the readers of each side output read a shared-memory copy; the original buffer is
        # written by a copy block (created here, scheduled with the rest below)
        copies = [sch.cache_write(s.block_rv, 0, "shared",
                                  consumer_blocks=sch.get_consumers(s.block_rv)) for s in side]
        loops = sch.get_loops(rest[-1].block_rv)
        row_loop = _fused(sch, loops[:n_spatial])
        spread(_fused(sch, loops[n_spatial:]))
        for info in reversed(rest[:-1]):
            sch.compute_at(info.block_rv, row_loop, preserve_unit_loops=True)
            inner = sch.get_loops(info.block_rv)[-n_reduce:]
            spread(_fused(sch, inner))
            for i in range(len(sch.get(info.block_rv).writes)):
                sch.set_scope(info.block_rv, i, "shared")
        heads = []
        for copy in copies:
            head, inner = _rows_and_row(sch, copy, rows, row)
            spread(inner)
            heads.append(head)
        # one loop over rows for all of it: the copies first, then statistics and epilogue
        row_loop = sch.merge(*heads, row_loop)
        for s in reversed(side):
            sch.compute_at(s.block_rv, row_loop, preserve_unit_loops=True)
            inner = sch.get_loops(s.block_rv)[1:]
            spread(_fused(sch, inner))
        sch.bind(row_loop, "blockIdx.x")
        for lane in lanes:
            sch.bind(lane, "threadIdx.x")
        for serial in serials:
            _unroll(sch, serial)
        return sch

"""Schedule rules of our own, in dlight's style: small rules tried in order before TVM's.

``TextureMatmul``  a GEMM (any fused prologue / epilogue) that reads a texture-packed operand
                   (``PackWeightsToTexture``'s ``P[n, k // 4, k % 4]``): the measured GEMM tiling
                   of ``TunedMatmul`` with the cooperative fetch vectorised by exactly the 4
                   RGBA lanes, so each fetch of the packed operand is one ``read_imagef`` of a
                   whole texel (a 2-wide fetch would split texels, which the OpenCL code
                   generator cannot express).  The reduction step is kept a multiple of 4.
``TextureElementwise``  an injective kernel *writing* a texture buffer: spatial loops fused
                   onto threads, the lane axis vectorised, so every store is one RGBA write
                   (``LowerTextureAccess`` refuses any other kind of texture store).

``LongRowReduction``  row reductions with few, long rows and their element-wise epilogue
                   (GroupNorm: 32 rows of up to a million elements) on the widest thread
                   block, before dlight's ``GeneralReduction`` (256 threads a row).

Kernels without texture buffers are left to the buffer rules that follow in the list.
"""

from __future__ import annotations

import dataclasses

import tvm_ffi
from tvm import ir, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight import gpu

from .matmul import TunedMatmul, load_table, target_key
from .texture import LANES, is_texture


def texture_params(func: tirx.PrimFunc) -> list[str]:
    """Names of ``func``'s parameters in a texture scope."""
    return [p.name for p in func.params if hasattr(p, "scope") and is_texture(p)]


def _reads_texture(func: tirx.PrimFunc) -> bool:
    loads: list = []
    tvm_ffi.structural_walk(func.body, (ir.TensorLoad, loads.append))
    return any(is_texture(ld.source) for ld in loads)


class TextureMatmul(TunedMatmul):
    """``TunedMatmul`` for GEMMs reading a texture-packed operand (see module doc)."""

    def get_configs(self, target) -> gpu.Matmul.Config:
        if self.config is not None:  # the texture sweep's candidates
            base = self.config
        else:  # measured for textures (benchmarks/texture_matmul_sweep.py), else the buffer one
            key = target_key(target)
            table = load_table(self.table)
            texture = table.get(f"{key}-texture", {}) if key else {}
            entry = texture if "config" in texture else (table.get(key) if key else None)
            base = gpu.Matmul.Config(**entry["config"]) if entry else \
                super().get_configs(target)
        k_step = max(LANES, base.micro_size_k - base.micro_size_k % LANES)
        return dataclasses.replace(base, vector_size=LANES, micro_size_k=k_step)

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or not _reads_texture(func):
            return None
        return super().apply(func, target, tunable)


class TextureElementwise(dl.ScheduleRule):
    """One spatial block writing a texture buffer: threads over texels, lanes vectorised."""

    def __init__(self, threads: int = 256):
        self.threads = threads

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        # inline everything but the block that writes the texture (injective producers)
        for b in blocks[:-1]:
            try:
                sch.compute_inline(b)
            except Exception:  # not inlinable: not an element-wise kernel for this rule
                return None
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if len(blocks) != 1:
            return None
        block = sch.get(blocks[0])
        if block.init is not None or not any(is_texture(w.source) for w in block.writes):
            return None
        if any(iv.iter_type != tirx.IterVar.DataPar for iv in block.iter_vars):
            return None
        loops = sch.get_loops(blocks[0])
        lane = sch.get(loops[-1])
        if not isinstance(lane.extent, tirx.IntImm) or int(lane.extent.value) != LANES:
            return None
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        bx, tx = sch.split(outer, [None, self.threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(loops[-1])
        return sch


class LongRowReduction(dl.ScheduleRule):
    """Row reductions with few, long rows (a diffusion model's GroupNorm: 32 groups of up to a
    million elements) and the element-wise epilogue that reads their results.

    dlight's ``GeneralReduction`` gives each row one thread block of 256 threads; with 32 rows
    that is 8192 threads on a GPU that holds 270 000, and the epilogue (normalise, affine,
    SiLU over every element) runs at that parallelism too.  This rule keeps one block per row
    (the statistics need no second kernel) but uses the target's widest block, so each SM in
    use keeps four times the loads in flight, with the serial part of every loop unrolled.
    Applies only to static shapes with at most ``max_rows`` rows of at least ``min_row``
    elements; everything else is left to ``GeneralReduction``."""

    def __init__(self, max_rows: int = 128, min_row: int = 65536):
        self.max_rows, self.min_row = max_rows, min_row

    def apply(self, func, target, _tunable):
        from tvm.s_tir.dlight.analysis import normalize_prim_func
        from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

        if not isinstance(func, tirx.PrimFunc) or target.kind.name not in ("cuda", "opencl"):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        infos = try_inline_contiguous_spatial(sch, infos) if infos else None
        if not infos or len(infos) < 2:
            return None
        shape = _row_shape(infos)
        if shape is None:
            return None
        n_spatial, n_reduce, rows, row = shape
        if rows > self.max_rows or row < self.min_row:
            return None
        threads = int(target.attrs.get("max_num_threads", 1024))
        last = sch.get_loops(infos[-1].block_rv)
        block_loop = sch.fuse(*last[:n_spatial]) if n_spatial > 1 else last[0]
        inner = sch.fuse(*last[n_spatial:]) if len(last) - n_spatial > 1 else last[n_spatial]
        serial, lane = sch.split(inner, [None, threads])
        sch.bind(block_loop, "blockIdx.x")
        sch.bind(lane, "threadIdx.x")
        _unroll(sch, serial)
        for info in reversed(infos[:-1]):
            sch.compute_at(info.block_rv, block_loop, preserve_unit_loops=True)
            loops = sch.get_loops(info.block_rv)[-n_reduce:]
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            serial, lane = sch.split(fused, [None, threads])
            sch.bind(lane, "threadIdx.x")
            _unroll(sch, serial)
            for i in range(len(sch.get(info.block_rv).writes)):
                sch.set_scope(info.block_rv, i, "shared")
        return sch


def _unroll(sch: s_tir.Schedule, loop) -> None:
    sch.annotate(loop, "pragma_auto_unroll_max_step", 256)
    sch.annotate(loop, "pragma_unroll_explicit", 1)


def _row_shape(infos) -> tuple[int, int, int, int] | None:
    """(spatial iters, reduction iters, rows, row length) when every block but the last is
    the same ``S..SR..R`` reduction over static extents and the last block is an injective
    map over the same ``S..S`` + row iterations; else None."""
    kind = infos[0].dom_kind()
    n_spatial = len(kind) - len(kind.lstrip("S"))
    n_reduce = len(kind) - len(kind.rstrip("R"))
    if n_spatial == 0 or n_reduce == 0 or n_spatial + n_reduce != len(kind):
        return None
    if any(info.dom_kind() != kind for info in infos[:-1]):
        return None
    last = infos[-1]
    if not last.is_injective() or last.dom_kind() != "S" * len(kind):
        return None
    extents = []
    for a, b in zip(infos[0].iters, last.iters, strict=True):
        if not isinstance(a.dom, int) or a.dom != b.dom:  # dlight gives static extents as int
            return None
        extents.append(a.dom)
    rows = 1
    for e in extents[:n_spatial]:
        rows *= e
    row = 1
    for e in extents[n_spatial:]:
        row *= e
    return n_spatial, n_reduce, rows, row

"""Schedule rules for texture (image2d) memory, in dlight's style: small rules tried in order.

``TextureMatmul``  a GEMM (any fused prologue / epilogue) that reads a texture-packed operand
                   (``PackWeightsToTexture``'s ``P[n, k // 4, k % 4]``): the measured GEMM tiling
                   of ``TunedMatmul`` with the cooperative fetch vectorised by exactly the 4
                   RGBA lanes, so each fetch of the packed operand is one ``read_imagef`` of a
                   whole texel (a 2-wide fetch would split texels, which the OpenCL code
                   generator cannot express).  The reduction step is kept a multiple of 4.
``TextureElementwise``  an injective kernel *writing* a texture buffer: spatial loops fused
                   onto threads, the lane axis vectorised, so every store is one RGBA write
                   (``LowerTextureAccess`` refuses any other kind of texture store).

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

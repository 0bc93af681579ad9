"""WindowReduction: one output per thread for reductions over a small window.

A depthwise convolution reduces each output over its 3 x 3 (or 7 x 7) window only; so do
poolings.  dlight has no rule for them: ``GeneralReduction`` takes them as row reductions and
gives every output a thread block that cooperatively sums nine products -- on the H100 a
64 x 128 x 128 depthwise convolution with its SiLU took 1.13 ms in MobileViT-S's buffer build
(0.1 GB/s of useful traffic), the texture build's one-texel-per-thread version a fraction of
that.  Here each thread computes one output: the padding is inlined into the reads, the window
loops run (unrolled) in the thread with the sum in a register, and the epilogue (bias, SiLU...)
writes from it.  Adjacent threads take adjacent outputs, so the reads coalesce.

Applies to kernels with exactly one reduction block, whose reduction covers at most
``max_window`` elements, and which are not matrix products (a GEMM with a short K belongs to
the GEMM rules, which come first anyway).
"""

from __future__ import annotations

import contextlib
import math

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from ..analysis.classify import prim_blocks
from .schedules import _fused, _is_gemm, producers_under_thread, texture_params


def window_size(block) -> int | None:
    """Elements one output of ``block`` reduces over (None: a symbolic extent)."""
    size = 1
    for iv in block.iter_vars:
        if iv.iter_type != tirx.IterVar.CommReduce:
            continue
        if not isinstance(iv.dom.extent, tirx.IntImm):
            return None
        size *= int(iv.dom.extent.value)
    return size


def _writes_param(func: tirx.PrimFunc, block) -> bool:
    return any(any(w.source.same_as(p) for p in func.params) for w in block.writes)


class WindowReduction(dl.ScheduleRule):
    """Schedule a small-window reduction (depthwise convolution, pooling) with its prologue
    and epilogue, one output per thread (see module doc); decline anything else."""

    def __init__(self, max_window: int = 64, threads: int = 256):
        self.max_window = max_window
        self.threads = threads

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name not in ("cuda", "opencl"):
            return None
        if texture_params(func):
            return None  # images take whole texels: TextureFallback's business
        blocks = prim_blocks(func)
        reductions = [b for b in blocks if b.init is not None]
        if len(reductions) != 1 or _is_gemm(func):
            return None
        size = window_size(reductions[0])
        if size is None or size > self.max_window:
            return None
        writers = [b for b in blocks if _writes_param(func, b)]
        if len(writers) != 1 or len(writers[0].writes) != 1:
            return None
        try:
            return self._schedule(func, reductions[0].name_hint, writers[0].name_hint)
        except Exception:  # an access pattern the primitives refuse: not ours to schedule
            return None

    def _schedule(self, func: tirx.PrimFunc, reduction: str, writer: str) -> s_tir.Schedule:
        sch = s_tir.Schedule(func)
        for block in prim_blocks(func):  # padding before, element-wise after: into the reads
            if block.name_hint in (reduction, writer):
                continue
            rv = sch.get_sblock(block.name_hint)
            with contextlib.suppress(Exception):
                sch.compute_inline(rv)
                continue
            with contextlib.suppress(Exception):
                sch.reverse_compute_inline(rv)
        out = sch.get_sblock(writer)
        if writer == reduction:  # the sum in a register, then one store
            out = sch.cache_write(out, 0, "local")
        loops = sch.get_loops(out)
        spatial = math.prod(int(sch.get(lp).extent) for lp in loops)
        threads = min(self.threads, 1 << max(spatial - 1, 1).bit_length())
        bx, tx = sch.split(_fused(sch, loops), [None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        producers_under_thread(sch, tx, sch.get(out).name_hint)
        sch.annotate(bx, "pragma_auto_unroll_max_step", self.max_window)
        sch.annotate(bx, "pragma_unroll_explicit", 1)
        return sch

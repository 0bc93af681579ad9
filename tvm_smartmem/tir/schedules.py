"""Schedule rules of our own, in dlight's style: small rules tried in order before TVM's.

``TextureMatmul``  a GEMM (any fused prologue / epilogue) that reads a texture-packed operand
                   (``PackWeightsToTexture``'s ``P[n, k // 4, k % 4]``): the measured GEMM tiling
                   of ``TunedMatmul`` with the cooperative fetch vectorised by exactly the 4
                   RGBA lanes, so each fetch of the packed operand is one ``read_imagef`` of a
                   whole texel (a 2-wide fetch would split texels, which the OpenCL code
                   generator cannot express).  The reduction step is kept a multiple of 4.
``TextureElementwise``  an injective kernel *writing* a texture buffer: iterated over the
                   texture's texels (a packed activation's ``c // 4, c % 4``), spatial loops
                   fused onto threads, the lane axis vectorised, so every store is one RGBA
                   write (``LowerTextureAccess`` refuses any other kind of texture store).
``TextureRowReduction``  a layernorm / softmax / RMSNorm whose output is a texture packed
                   along the row: each thread reduces and writes whole texels.
``TextureFallback``  any other kernel writing a texture (depthwise convolution, pooling, a
                   one-row GEMM -- never a GEMM with rows and columns): one texel per thread,
                   its lanes computed in registers.

Every texture store is *staged* (:func:`stage_texture_writes`): computed into four registers,
then written by a copy that always vectorises into one RGBA write.

``LongRowReduction``  row reductions with few, long rows and their element-wise epilogue
                   (GroupNorm: 32 rows of up to a million elements) on the widest thread
                   block, before dlight's ``GeneralReduction`` (256 threads a row).

Kernels without texture buffers are left to the buffer rules that follow in the list.
"""

from __future__ import annotations

import contextlib
import dataclasses

import tvm
import tvm_ffi
from tvm import ir, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight import gpu

from .matmul import RULE_KNOBS, TunedMatmul, load_table, target_key, texture_key
from .texture import LANES, is_texture


def _fused(sch: s_tir.Schedule, loops: list):
    """``loops`` as one loop (the loop itself when there is one)."""
    return sch.fuse(*loops) if len(loops) > 1 else loops[0]


def producers_under_thread(sch: s_tir.Schedule, thread, writer: str) -> None:
    """Every block but ``writer``, last to first, computed under the thread loop ``thread``
    with what it writes in registers: the rules that give each thread one output (or texel)
    compute all that output needs in that thread."""
    from ..analysis.classify import prim_blocks

    rest = [b for b in prim_blocks(sch.mod["main"]) if b.name_hint != writer]
    for block in reversed(rest):
        rv = sch.get_sblock(block.name_hint)
        sch.compute_at(rv, thread, preserve_unit_loops=True)
        for i in range(len(block.writes)):
            sch.set_scope(rv, i, "local")


def rule_knob(target, rule: str, knob: str, table: str | None = None) -> int:
    """``rule``'s ``knob`` for ``target``: measured (the table's texture entry) or default."""
    key = target_key(target) if target is not None else None
    entry = load_table(table).get(texture_key(key), {}) if key else {}
    return int(entry.get("rules", {}).get(rule, {}).get(knob, RULE_KNOBS[rule][knob]))


def texture_params(func: tirx.PrimFunc) -> list[str]:
    """Names of ``func``'s parameters in a texture scope."""
    return [p.name for p in func.params if hasattr(p, "scope") and is_texture(p)]


def _reads_texture(func: tirx.PrimFunc) -> bool:
    loads: list = []
    tvm_ffi.structural_walk(func.body, (ir.TensorLoad, loads.append))
    return any(is_texture(ld.source) for ld in loads)


def _writes_texture(func: tirx.PrimFunc) -> bool:
    stores: list = []
    tvm_ffi.structural_walk(func.body, (tirx.BufferStore, stores.append))
    return any(is_texture(st.buffer) for st in stores)


def stage_texture_writes(sch: s_tir.Schedule) -> s_tir.Schedule | None:
    """Every block writing a texture from the body of a vectorised 4-lane loop computes into
    registers instead, and a copy block writes the texels from them; None when a thread's
    texels cannot be staged exactly (the rule then declines the kernel).

    TVM's ``VectorizeLoop`` cannot vectorise every body (a GELU's ``erf``, a select of two
    loads): such a loop is scalarised whole, and a scalarised texture store writes its texel
    four times with one lane broadcast -- wrong values, found on a BERT FFN's GEMM epilogue.
    The copy block's body is a plain load, which always vectorises into one RGBA write; the
    computing loop becomes an unrolled scalar loop into registers.

    The copy sits right under the innermost thread-bound loop, so the registers hold the
    thread's whole tile and every texel's vector load reads its own registers: TVM's OpenCL
    code generator reuses a texture store's value by its printed text, across the stores in
    between, so one staging buffer reused per texel wrote every texel of a GEMM tile with the
    first one's value.  ``reverse_compute_at`` gives the copy the hull of what the thread wrote,
    per axis of the register buffer, and that hull must hold exactly the thread's values
    (checked).  Where it does not -- a GEMM tile's rows are consecutive pixels, which may wrap an
    image row (14 x 14 pixels, 4 a thread) -- the buffer's axes other than the texel axis and
    the lanes are fused into one, for each choice of texel axis (only for blocks that write a
    value in every iteration, see the code).  ``reverse_compute_at`` also drops the computing
    block's predicate (a tile that overhangs the tensor), while an image write out of range is
    undefined -- PoCL writes into the next row -- so the copy is guarded by the image's
    bounds."""
    from ..analysis.classify import prim_blocks

    copies: list[str] = []
    for block in prim_blocks(sch.mod["main"]):
        texture_writes = [i for i, w in enumerate(block.writes) if is_texture(w.source)]
        if len(texture_writes) != 1 or block.init is not None or _is_copy(block):
            continue
        loops = sch.get_loops(sch.get_sblock(block.name_hint))
        lane = sch.get(loops[-1])
        if len(loops) < 2 or lane.kind != tirx.ForKind.VECTORIZED or \
                not isinstance(lane.extent, tirx.IntImm) or int(lane.extent.value) != LANES:
            continue
        rank = len(block.writes[texture_writes[0]].source.shape)
        staged = None
        # the registers laid out like the image first; fused layouts only where every
        # iteration of the computing block writes a real value: with a predicate (a padded
        # GEMM tile), a fused register index past one image row is another row's index, and
        # the copy would write unset registers into real texels
        fusions = [None] + ([] if rank <= 3 or _predicated(sch, block.name_hint)
                            else list(reversed(range(rank - 1))))
        for texel_axis in fusions:
            staged = _stage_one(sch.copy(), block.name_hint, texture_writes[0], texel_axis)
            if staged is not None:
                break
        if staged is None:
            return None  # no register layout holds exactly the thread's texels
        sch, copy_name = staged
        copies.append(copy_name)
    if not copies:
        return sch
    return s_tir.Schedule(_guard_copies(sch.mod["main"], set(copies)))


def _predicated(sch: s_tir.Schedule, name: str) -> bool:
    """Does block ``name`` run under a predicate (some iterations write nothing)?"""
    found: list = []

    def on_realize(realize):
        if realize.block.name_hint == name:
            found.append(realize.predicate)

    tvm_ffi.structural_walk(sch.mod["main"].body, (s_tir.SBlockRealize, on_realize))
    return any(not (isinstance(p, tirx.IntImm) and int(p.value) == 1) for p in found)


def _stage_one(sch: s_tir.Schedule, name: str, write: int, texel_axis: int | None):
    """(schedule, copy block name) with block ``name``'s texture write staged in registers
    laid out like the image, or with every axis but ``texel_axis`` and the lanes fused; None
    when the copy would not cover exactly the thread's values."""
    block_rv = sch.get_sblock(name)
    loops = sch.get_loops(block_rv)
    bound = [k for k, lp in enumerate(loops[:-1]) if sch.get(lp).thread_binding is not None]
    at = bound[-1] if bound else len(loops) - 2
    computed = _extent_product(sch, loops[at + 1:])
    copy = sch.cache_write(block_rv, write, "local")
    shape = list(sch.get(block_rv).writes[write].source.shape)
    if texel_axis is not None:
        def fuse_others(*idx):
            flat = None
            for k in range(len(idx) - 1):
                if k != texel_axis:
                    flat = idx[k] if flat is None else flat * shape[k] + idx[k]
            return flat, idx[texel_axis], idx[-1]

        try:  # the registers and the copy's iterations both in the fused coordinates
            sch.transform_layout(block_rv, ("write", write), fuse_others)
            sch.transform_block_layout(copy, tirx.IndexMap.from_func(fuse_others,
                                                                     ndim=len(shape)))
        except Exception:  # not expressible (a non-bijective fold): this texel axis is out
            return None
    try:
        sch.reverse_compute_at(copy, loops[at], preserve_unit_loops=True)
    except Exception:  # the region is not a box TVM can iterate
        return None
    copy_loops = sch.get_loops(copy)[at + 1:]
    if computed is None or _extent_product(sch, copy_loops) != computed:
        return None  # the hull the copy covers holds values of other threads
    sch.vectorize(copy_loops[-1])
    sch.unroll(loops[-1])
    return sch, sch.get(copy).name_hint


def _is_gemm(func: tirx.PrimFunc) -> bool:
    """Is ``func`` a matrix product with more than one row and column?  A texel per thread
    with the reduction serial would be a naive GEMM: matrix products write images only through
    ``TextureMatmul``'s tiles (a GEMV, one row or column, is fine).  Convolutions are not
    refused: one output texel per thread looping over the input channels and the window is how
    mobile GPU libraries run them on images (MNN, TFLite's GPU delegate), and ``TextureMatmul``
    cannot always stage a convolution's tile (its pixels may wrap an image row)."""
    from tvm.s_tir.dlight.gpu.matmul import get_index_map

    from ..analysis.classify import prim_blocks

    for block in prim_blocks(func):
        if block.init is None or "conv" in block.name_hint:
            continue
        maps = get_index_map(block)
        if maps is None:
            continue
        extents = [iv.dom.extent for iv in block.iter_vars]
        try:
            _, rows, cols, _ = maps[0].map_shape(extents)
        except Exception:  # not a plain [S, I, J, K] contraction: not a GEMM for this check
            continue
        if not (isinstance(rows, tirx.IntImm) and isinstance(cols, tirx.IntImm)) or \
                (int(rows) > 1 and int(cols) > 1):
            return True
    return False


def _is_copy(block) -> bool:
    """A block whose store is a plain load of registers: it vectorises as it is (but still
    needs the guard when it overhangs)."""
    stores: list = []
    tvm_ffi.structural_walk(block.body, (tirx.BufferStore, stores.append))
    return len(stores) == 1 and isinstance(stores[0].value, tvm.ir.TensorLoad) and \
        stores[0].value.source.scope() == "local"


def _extent_product(sch: s_tir.Schedule, loops) -> int | None:
    n = 1
    for lp in loops:
        extent = sch.get(lp).extent
        if not isinstance(extent, tirx.IntImm):
            return None
        n *= int(extent.value)
    return n


def _guard_copies(func: tirx.PrimFunc, names: set[str]) -> tirx.PrimFunc:
    """``func`` with the named copy blocks predicated on their texture's bounds (each index of
    the store, in loop variables, below the texture's extent)."""

    def on_realize(realize):
        block = realize.block
        if block.name_hint not in names:
            return realize
        stores: list = []
        tvm_ffi.structural_walk(block.body, (tirx.BufferStore, stores.append))
        store = next(st for st in stores if is_texture(st.buffer))
        bindings = list(zip([iv.var for iv in block.iter_vars], realize.iter_values,
                            strict=True))

        def bind(v):
            return next((value for var, value in bindings if var.same_as(v)), v)

        guard = realize.predicate
        for index, extent in zip(store.indices, store.buffer.shape, strict=True):
            guard = tirx.And(guard, tvm_ffi.structural_map(index, (tirx.Var, bind)) < extent)
        return s_tir.SBlockRealize(list(realize.iter_values), guard, block)

    return tvm_ffi.structural_map(func, (s_tir.SBlockRealize, on_realize))


class TextureMatmul(TunedMatmul):
    """``TunedMatmul`` for GEMMs reading a texture-packed operand (see module doc)."""

    def get_configs(self, target) -> gpu.Matmul.Config:
        if self.config is not None:  # the texture sweep's candidates
            base = self.config
        else:  # measured for textures (benchmarks/texture_matmul_sweep.py), else the buffer one
            key = target_key(target)
            table = load_table(self.table)
            texture = table.get(texture_key(key), {}) if key else {}
            entry = texture if "config" in texture else (table.get(key) if key else None)
            base = gpu.Matmul.Config(**entry["config"]) if entry else \
                super().get_configs(target)
        k_step = max(LANES, base.micro_size_k - base.micro_size_k % LANES)
        return dataclasses.replace(base, vector_size=LANES, micro_size_k=k_step)

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or not (_reads_texture(func)
                                                       or _writes_texture(func)):
            return None
        sch = super().apply(func, target, tunable)
        return stage_texture_writes(sch) if sch is not None else None


class TextureElementwise(dl.ScheduleRule):
    """One spatial block writing a texture buffer: threads over texels, lanes vectorised."""

    def __init__(self, threads: int | None = None):
        self.threads = threads  # None: the target's measured value (``rule_knob``)

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        threads = self.threads or rule_knob(target, "TextureElementwise", "threads")
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
        if _texels_on_threads(sch, blocks[0], threads) is None:
            return None
        return stage_texture_writes(sch)


def _texels_on_threads(sch: s_tir.Schedule, block_rv, threads: int):
    """Iterate the block over the texels of the texture it writes, one texel per thread (the
    lanes vectorised); the thread loop, or None when the block cannot iterate that way."""
    if not _iterate_like_texture(sch, block_rv):
        return None
    loops = sch.get_loops(block_rv)
    lane = sch.get(loops[-1])
    if not isinstance(lane.extent, tirx.IntImm) or int(lane.extent.value) != LANES:
        return None
    outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    bx, tx = sch.split(outer, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(loops[-1])
    return tx


def _iterate_like_texture(sch: s_tir.Schedule, block_rv) -> bool:
    """Make the block iterate over the texture it writes (texel coordinates, then the lane),
    when its own iteration space is the tensor's original one (a packed activation written as
    ``P[.., c // 4, .., c % 4]``).  False when the write is no bijection of the iterators."""
    block = sch.get(block_rv)
    stores: list = []
    tvm_ffi.structural_walk(block.body, (tirx.BufferStore, stores.append))
    store = next((st for st in stores if is_texture(st.buffer)), None)
    if store is None:
        return False
    iters = [iv.var for iv in block.iter_vars]
    if list(store.indices) == iters[-len(store.indices):] and len(iters) == len(store.indices):
        return True  # already texel-major with the lane last
    try:
        sch.transform_block_layout(block_rv, tirx.IndexMap(iters, list(store.indices), None))
    except Exception:  # not a bijective affine map of the iterators
        return False
    return True


class TextureRowReduction(dl.ScheduleRule):
    """Row reductions (layernorm, softmax, RMSNorm) whose element-wise epilogue writes a
    texture packed along the row: a thread block per row, each thread reduces and writes a
    contiguous run of whole texels (4 consecutive row elements each), the two-level reduction
    across the block's threads.
    dlight's ``GeneralReduction`` gives consecutive row elements to consecutive threads, so no
    thread holds the four lanes of a texel and the write cannot be one RGBA store."""

    def __init__(self, max_threads: int | None = None):
        self.max_threads = max_threads  # None: the target's measured value (``rule_knob``)

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not _writes_texture(func):
            return None
        max_threads = self.max_threads or rule_knob(target, "TextureRowReduction",
                                                    "max_threads")
        found = _row_reduction(func)
        if found is None:
            return None
        sch, infos, (n_spatial, n_reduce, _rows, row) = found
        if n_reduce != 1 or row % LANES:
            return None
        texels = row // LANES
        threads = next((t for t in (512, 256, 128, 64, 32) if t <= max_threads
                        and texels % t == 0), min(64, max_threads))
        loops = sch.get_loops(infos[-1].block_rv)
        block_loop = sch.fuse(*loops[:n_spatial]) if n_spatial > 1 else loops[0]
        # each thread owns a contiguous run of texels (its registers stage their writes)
        tx, _, lane = sch.split(loops[n_spatial], [threads, None, LANES])
        sch.bind(block_loop, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(lane)
        for info in reversed(infos[:-1]):
            for i in range(len(sch.get(info.block_rv).writes)):
                sch.set_scope(info.block_rv, i, "shared")
            sch.compute_at(info.block_rv, block_loop, preserve_unit_loops=True)
            r_tx, _, _ = sch.split(sch.get_loops(info.block_rv)[-1], [threads, None, LANES])
            sch.bind(r_tx, "threadIdx.x")
        return stage_texture_writes(sch)


class TextureFallback(dl.ScheduleRule):
    """Any other kernel whose output is a texture (a depthwise convolution, a pooling, a
    one-row GEMM, a reduction with an epilogue): one texel per thread, its four lanes computed
    in registers by the thread and written by one RGBA store.

    The block writing the texture is made to iterate over the texture's texels (for a block
    that reduces, over a register copy of its result: the image is never read back while it is
    written); injective blocks are inlined, every other block is computed per texel under the
    thread.  What dlight's ``Fallback`` does for buffers -- one element per thread -- cannot
    write an image, which takes whole texels."""

    def __init__(self, threads: int | None = None):
        self.threads = threads  # None: the target's measured value (``rule_knob``)

    def apply(self, func, target, _tunable):
        from ..analysis.classify import prim_blocks

        if not isinstance(func, tirx.PrimFunc) or not _writes_texture(func) or _is_gemm(func):
            return None
        sch = s_tir.Schedule(func)
        writers = [b for b in prim_blocks(func) if any(is_texture(w.source) for w in b.writes)]
        if len(writers) != 1 or len(writers[0].writes) != 1:
            return None
        writer = sch.get_sblock(writers[0].name_hint)
        if sch.get(writer).init is not None:
            writer = sch.cache_write(writer, 0, "local")  # the reduction accumulates in registers
        for block in prim_blocks(sch.mod["main"]):
            rv = sch.get_sblock(block.name_hint)
            if block.name_hint == sch.get(writer).name_hint or block.init is not None:
                continue
            # not injective or not inlinable: computed per texel below
            with contextlib.suppress(Exception):
                sch.compute_inline(rv)
        tx = _texels_on_threads(sch, writer,
                                self.threads or rule_knob(target, "TextureFallback", "threads"))
        if tx is None:
            return None
        producers_under_thread(sch, tx, sch.get(writer).name_hint)
        return stage_texture_writes(sch)


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
        if not isinstance(func, tirx.PrimFunc) or target.kind.name not in ("cuda", "opencl"):
            return None
        found = _row_reduction(func)
        if found is None:
            return None
        sch, infos, (n_spatial, n_reduce, rows, row) = found
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
            serial, lane = sch.split(_fused(sch, loops), [None, threads])
            sch.bind(lane, "threadIdx.x")
            _unroll(sch, serial)
            for i in range(len(sch.get(info.block_rv).writes)):
                sch.set_scope(info.block_rv, i, "shared")
        return sch


def _unroll(sch: s_tir.Schedule, loop) -> None:
    sch.annotate(loop, "pragma_auto_unroll_max_step", 256)
    sch.annotate(loop, "pragma_unroll_explicit", 1)


def _normalized_blocks(func: tirx.PrimFunc):
    """(schedule, dlight block infos) of ``func`` with its spatial blocks inlined where they
    can be, as dlight's reduction rules see it (infos None when dlight cannot analyse it)."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    return sch, try_inline_contiguous_spatial(sch, infos) if infos else None


def _row_reduction(func: tirx.PrimFunc):
    """(schedule, dlight block infos, :func:`_row_shape`) of a row-reduction kernel -- the
    same ``S..SR..R`` reductions followed by an injective epilogue -- or None."""
    sch, infos = _normalized_blocks(func)
    if not infos or len(infos) < 2:
        return None
    shape = _row_shape(infos)
    return None if shape is None else (sch, infos, shape)


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

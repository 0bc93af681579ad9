"""LowerTextureAccess: N-d accesses of texture-scoped buffers become RGBA image reads / writes.

A buffer in a texture scope (``global.texture``, ``-weight``, ``-nhwc``) is an image2d array
whose texels are the buffer's last axis (4 lanes).  The other axes map to the image as the
OpenCL runtime lays it out (:func:`texture_coordinates`, the same convention as
``runtime/opencl/device_api.cc``): the axes before the scope's separator fold into the array
depth, the separator axis is the height, the axes after it (but the last) the width.

TVM 0.27 has such a flattening pass (the Adreno ``TextureFlatten``) but types each store call
with the buffer's *pointer* type, so ``VectorizeLoop`` cannot vectorise it and scalarises the
loop instead: every texel is written four times, each time with one lane broadcast (wrong
results).  Here the store call is typed with the element type, which lets the vectoriser turn
the lane loop into one RGBA ``write_image{f,h}`` -- and since an image write always writes a
whole texel, a store that is *not* inside a vectorised loop over exactly the 4 lanes is refused
with :class:`~tvm_smartmem.errors.TextureLoweringError` instead of being mis-compiled.  Loads
need no such care: a scalar read picks its lane out of the texel, a vectorised one keeps all four.

The pass runs on scheduled, block-structured PrimFuncs (the end of the pipeline's ``tir``
phase, after the schedule rules); the texture calls then travel through TVM's TIR pipeline like
any other intrinsic.  Their coordinates are written in loop variables, simplified with the
loops' ranges: a vectorised texel read must have coordinates that do not depend on the lane
loop (TVM's vectoriser only rewrites the lane argument), and a schedule's fused fetch indices
(``(k0 * 16 + (t * 4 + lane) % 16) // 4``) only show that once the ranges are known.  A
vectorised loop whose texture reads would split texels is unrolled into scalar reads instead.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import ir, s_tir, tirx

from ..errors import TextureLoweringError

TEXTURE_SCOPES = ("global.texture", "global.texture-weight", "global.texture-nhwc")
LANES = 4
LOWERED_ATTR = "smartmem.texture_buffers"


def separator(rank: int, scope: str) -> int:
    """The axis that becomes the image height, by scope (TVM's texture convention)."""
    if scope == "global.texture":
        return rank - 2
    if scope == "global.texture-weight":
        return 1
    if scope == "global.texture-nhwc":
        return 2
    raise TextureLoweringError(f"'{scope}' is not a texture scope (known: {TEXTURE_SCOPES})")


def image_extent(shape: list[int], scope: str) -> tuple[int, int, int]:
    """(width, height, depth) in texels of a tensor of ``shape`` stored in ``scope``."""
    sep = separator(len(shape), scope)
    width = height = depth = 1
    for axis, extent in enumerate(shape[:-1]):
        if axis < sep - 1:
            depth *= extent
        elif axis < sep:
            height *= extent
        else:
            width *= extent
    return width, height, depth


def texture_coordinates(shape, indices, scope: str) -> tuple:
    """(x, y, depth) of the texel holding ``buffer[indices]`` (all but the lane index)."""
    sep = separator(len(shape), scope)
    x = y = d = None

    def fold(acc, idx, extent):
        return idx if acc is None else acc * extent + idx

    for axis in range(len(shape) - 1):
        idx, extent = indices[axis], shape[axis]
        if axis < sep - 1:
            d = fold(d, idx, extent)
        elif axis < sep:
            y = fold(y, idx, extent)
        else:
            x = fold(x, idx, extent)
    zero = tirx.IntImm("int32", 0)
    return tuple(zero if v is None else _int32(v) for v in (x, y, d))


def _int32(expr):
    """Image coordinates are ``int`` in OpenCL C; the buffer indices are usually int64."""
    if isinstance(expr, int):
        return tirx.IntImm("int32", expr)
    return expr if str(expr.ty.dtype) == "int32" else tirx.Cast("int32", expr)


def buffer_scope(buffer) -> str:
    return str(buffer.scope()) if hasattr(buffer, "scope") else ""


def is_texture(buffer) -> bool:
    return buffer_scope(buffer) in TEXTURE_SCOPES


def _static_shape(buffer) -> list[int]:
    shape = []
    for d in buffer.shape:
        if not isinstance(d, tirx.IntImm):
            raise TextureLoweringError(
                f"texture buffer '{buffer.name}' has a dynamic shape {list(buffer.shape)}; "
                "images need static extents")
        shape.append(int(d.value))
    if len(shape) < 2 or shape[-1] != LANES:
        raise TextureLoweringError(
            f"texture buffer '{buffer.name}' of shape {shape}: the last axis must be the "
            f"{LANES} RGBA lanes")
    return shape


def _loop_context(func: tirx.PrimFunc):
    """(analyzer, vectorised 4-lane loop variables): an analyzer that knows every loop
    variable's range and substitutes every block variable by its binding.  Loop and block
    variables are distinct objects throughout the function (``renew_defs`` first), so one
    analyzer serves every access: texture coordinates are written in loop variables and
    simplified with their ranges."""
    from tvm.sym.analyzer import Analyzer

    analyzer = Analyzer()
    lanes: set = set()

    def on_for(loop):
        analyzer.bind(loop.loop_var, tvm.ir.Range.from_min_extent(loop.min, loop.extent))
        if loop.kind == tirx.ForKind.VECTORIZED and isinstance(loop.extent, tirx.IntImm) \
                and int(loop.extent.value) == LANES:
            lanes.add(loop.loop_var)

    def on_realize(realize):
        for iv, value in zip(realize.block.iter_vars, realize.iter_values, strict=True):
            analyzer.bind(iv.var, value)

    tvm_ffi.structural_walk(func.body, (tirx.For, on_for))
    tvm_ffi.structural_walk(func.body, (s_tir.SBlockRealize, on_realize))
    return analyzer, lanes


def _lane_matches(loop, load_lane, analyzer) -> bool:
    """Is the lane index of a texture read the vectorised loop's variable itself (so that the
    vectoriser turns the read into one RGBA texel read)?"""
    return analyzer.can_prove(load_lane - loop.loop_var == 0)


def _texel_fixed(loop, load, analyzer) -> bool:
    """Do the texel coordinates of a read in a vectorised loop not mention the loop variable?
    The vectoriser only rewrites the lane argument; a coordinate that still names the lane
    loop (a head merge read through ``(k % 36) // 4``, where the simplifier cannot show that four
    aligned lanes stay in one texel) would be left undefined in the generated code."""
    coords = texture_coordinates([int(d) for d in load.source.shape],
                                 [analyzer.simplify(i) for i in load.indices],
                                 buffer_scope(load.source))
    found: list = []
    for c in coords:
        tvm_ffi.structural_walk(analyzer.simplify(c), (tirx.Var, found.append))
    return not any(v.same_as(loop.loop_var) for v in found)


def _devectorise_split_reads(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Vectorised loops that read a texture other than lane by lane over exactly one texel
    (a 2-wide fetch, a lane index that is not the loop variable, texel coordinates that may
    change with it) become unrolled loops of scalar reads: TVM's OpenCL generator can only
    vectorise a texel read whose lane index is a 4-wide ramp, anything else would be
    mis-compiled."""
    analyzer, _ = _loop_context(func)

    def on_for(loop):
        if loop.kind != tirx.ForKind.VECTORIZED:
            return loop
        loads: list = []
        tvm_ffi.structural_walk(loop.body, (ir.TensorLoad, loads.append))
        texture_loads = [ld for ld in loads if is_texture(ld.source)]
        if not texture_loads:
            return loop
        whole_texels = isinstance(loop.extent, tirx.IntImm) and \
            int(loop.extent.value) == LANES and \
            all(_lane_matches(loop, ld.indices[-1], analyzer)
                and _texel_fixed(loop, ld, analyzer) for ld in texture_loads)
        if whole_texels:
            return loop
        return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.UNROLLED, loop.body,
                        loop.thread_binding, loop.annotations)

    return tvm_ffi.structural_map(func, (tirx.For, on_for))


def lower_texture_access(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with every texture-scoped access lowered (see module doc)."""
    if not _touches_texture(func):
        return func
    # one analyzer serves the whole function, so every loop / block variable must be defined
    # once: schedule primitives (dlight's cache reads) can give two blocks the same iterator
    # objects, and a texture read would then take the other block's loop variables
    func = _devectorise_split_reads(s_tir.renew_defs(func))
    analyzer, lane_vars = _loop_context(func)
    touched: set[str] = set()

    def args_of(buffer, indices):
        shape = _static_shape(buffer)
        # in loop variables, simplified with their ranges: the coordinates of a vectorised
        # read must not mention the lane loop (the vectoriser only rewrites the lane index)
        loop_indices = [analyzer.simplify(i) for i in indices]
        x, y, d = texture_coordinates(shape, loop_indices, buffer_scope(buffer))
        bits = tirx.IntImm("int32", LANES * tvm.DataType(str(buffer.dtype)).bits)
        return [buffer.data, analyzer.simplify(x), analyzer.simplify(y),
                analyzer.simplify(d), bits], loop_indices[-1]

    refused: list[str] = []

    def on_load(load):
        buffer = load.source
        if not is_texture(buffer):
            return load
        touched.add(buffer.name)
        args, lane = args_of(buffer, load.indices)
        return tirx.op.call_intrin(str(buffer.dtype), "tirx.texture2d_load", *args, lane)

    def on_store(store):
        buffer = store.buffer
        if not is_texture(buffer):
            return store
        args, lane = args_of(buffer, store.indices)
        if not (isinstance(lane, tirx.Var) and lane in lane_vars):
            raise TextureLoweringError(
                f"store to texture buffer '{buffer.name}' at lane index {lane}: an image write "
                f"writes a whole texel, so the store must sit in a vectorised loop over its "
                f"{LANES} lanes (schedule: vectorize the innermost axis)")
        touched.add(buffer.name)
        # typed with the element type (not the pointer type): VectorizeLoop then makes it one
        # RGBA write of the vectorised value
        return tirx.Evaluate(tirx.op.call_intrin(str(buffer.dtype), "tirx.texture2d_store",
                                                 *args, store.value))

    def guarded(callback):
        # errors are raised after the walk: an exception must not cross the FFI callback
        # (tvm-ffi 0.1.14 corrupts its heap when a Python callback of structural_map raises)
        def call(node):
            try:
                return callback(node)
            except TextureLoweringError as err:
                refused.append(str(err))
                return node
        return call

    new = tvm_ffi.structural_map(func, [(ir.TensorLoad, guarded(on_load)),
                                        (tirx.BufferStore, guarded(on_store))])
    if refused:
        raise TextureLoweringError(refused[0])
    return new.with_attr(LOWERED_ATTR, sorted(touched)) if touched else func


def _touches_texture(func: tirx.PrimFunc) -> bool:
    return any(is_texture(p) for p in func.params if hasattr(p, "scope")) or \
        bool(_texture_allocations(func))


def _texture_allocations(func: tirx.PrimFunc) -> list:
    found: list = []

    def on_block(block):
        found.extend(b for b in block.alloc_buffers if is_texture(b))

    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, on_block))
    return found


def LowerTextureAccess() -> tvm.transform.Pass:
    """Lower texture-scoped buffer accesses of every PrimFunc (see module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="LowerTextureAccess")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = mod.clone()
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc):
                out[gv] = lower_texture_access(func)
        return out

    return _pass

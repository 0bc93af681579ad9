"""PackActivationsToTexture: intermediate tensors in RGBA images, packed by the reduction
dimension of the kernels that read them.

SmartMem lays a tensor out in 2.5D memory for its consumers: the dimension they *reduce over*
is split in chunks of 4 across the RGBA lanes of a texel, and the tensor's next axes span the
image's width and height, so that the reduction walks texels through the texture cache.  This
pass does that for the intermediate tensors of a compiled model, at the level where the kernels
are known: after fusion (``FuseTIR``) and layout elimination, before scheduling.

For every tensor that one ``call_tir`` kernel writes and only other kernels read:

1. **Which axis goes into the lanes.**  In each reading kernel, an axis of the tensor is a
   *reduction axis* when its index uses only reduction iterators of the block that consumes it
   (``k`` of a matmul operand, the channel of a convolution's input, the normalised axis of a
   softmax / layernorm), followed through the element-wise blocks a kernel applies first.  The
   innermost such axis is the lane axis; readers that reduce over nothing (element-wise) accept
   any, and every axis holding whole texels is tried, innermost first, until the producer
   writes it (step 3: a convolution writes its channels as texels); so are they when a
   pooling's window holds no whole texels (a 7 x 7 window then reads four channels per
   texel).  Readers that want
   different lane axes would each need a copy in its own layout (SmartMem's pooled copies):
   the tensor stays in a buffer and the bytes those copies would take are reported.
2. **The packed layout** splits the lane axis in place, ``[.., C, ..] -> [.., C / 4, .., 4]``,
   in scope ``global.texture``: the last two axes before the lanes are the image's height and
   width, the ones before fold into the image array's depth (``tir.texture``).  For a GEMM
   operand ``A[m, k]`` that is ``[m, k / 4, 4]`` (rows along the height, the reduction along
   the width); for an NCHW convolution input the NCHW4c layout ``[n, c / 4, h, w, 4]`` (the
   window in the image plane).  The lane axis must be a multiple of 4 and the image within the
   target's limits (``texture_spatial_limit`` / ``texture_depth_limit``).
3. **Every kernel touching the tensor must still schedule and lower**: the producer and the
   readers are rewritten (``transform_layout`` of the parameter, texture scope) and scheduled on
   trial with the pipeline's rule list; the producer must end up storing whole texels from one
   thread (``LowerTextureAccess`` refuses anything else).  A tensor whose kernels fail stays in
   a buffer, with the reason.

Fused attention kernels read Q / K / V from images and write their output as texels
(``FusedAttention``); a Q/K/V projection whose V is reduced over the tokens wants the tokens in
the lanes, which its GEMM cannot write, so it stays a buffer (the reason says so).  Graph inputs
and outputs, and tensors read by anything but kernels (views, tuples), are never placed.

Whether an image pays is decided per tensor by the cost model of ``cost.texture``: the
``opencl-texture`` entry of ``tir/matmul_configs.json`` gives, for a measured device, the time
ratio image / buffer of each kind of kernel (``texture_time_ratio``), and a tensor goes to an
image only when the mean ratio of the kernels writing and reading it is below one.  A device
without ratios packs wherever its kernels allow (an entry may still say
``texture_activations: buffer`` for all tensors at once);
``TVM_SMARTMEM_TEXTURE_ACTIVATIONS=always|never|measured`` overrides (``measured``, the default,
is the cost model).  The decisions are recorded as ``smartmem.texture_activations`` on the
function (``images``: tensor -> image extents, ``kept``: tensor -> reason, ``estimates``:
tensor -> the model's ratio, ``image_bytes``, ``kept_bytes``, ``copy_bytes``).
``AllocateTextureTensors`` and ``TextureStorageViews`` then allocate the chosen tensors as
images at run time.
"""

from __future__ import annotations

import dataclasses
import logging

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.target import Target

from ..analysis.classify import prim_blocks
from ..analysis.stats import tensor_bytes
from ..cost.texture import image_estimate, kernel_kind
from ..errors import SmartMemError
from ..tir.texture import LANES, image_extent, lower_texture_access
from .math_rewrite import shape_of
from .partition import (
    Block,
    bind_like,
    for_each_function,
    is_single_block,
    rebuild_function,
    substitute,
)
from .texture import image_limits

ACTIVATIONS_ATTR = "smartmem.texture_activations"
SCOPE = "global.texture"
POLICY_ENV = "TVM_SMARTMEM_TEXTURE_ACTIVATIONS"
_DTYPES = ("float32", "float16")
log = logging.getLogger(__name__)


# -- which axes a kernel reduces over --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AxisUse:
    """How one kernel reads a tensor: axes indexed only by reduction iterators (``pure``) and
    axes indexed by reduction and spatial ones together (``mixed``: a convolution window)."""

    pure: frozenset = frozenset()
    mixed: frozenset = frozenset()

    def __or__(self, other: AxisUse) -> AxisUse:
        return AxisUse(self.pure | other.pure, self.mixed | other.mixed)


def _vars(expr) -> set:
    found: list = []
    tvm_ffi.structural_walk(expr, (tirx.Var, found.append))
    return set(found)


def _loads_of(block, buffer) -> list:
    loads: list = []
    tvm_ffi.structural_walk(block.body, (tvm.ir.TensorLoad, loads.append))
    return [ld for ld in loads if ld.source.same_as(buffer)]


def axis_use(func: tirx.PrimFunc, buffer, _seen: frozenset = frozenset()) -> AxisUse:
    """The reduction axes of ``buffer`` in ``func`` (see :class:`AxisUse`), followed through
    the element-wise blocks between the parameter and the reduction that consumes it."""
    use = AxisUse()
    params = set(func.params)
    for block in prim_blocks(func):
        loads = _loads_of(block, buffer)
        if not loads:
            continue
        reduce = {iv.var for iv in block.iter_vars if int(iv.iter_type) == 2}
        if reduce:
            for load in loads:
                for axis, index in enumerate(load.indices):
                    used = _vars(index)
                    if used and used <= reduce:
                        use = use | AxisUse(pure=frozenset({axis}))
                    elif used & reduce:
                        use = use | AxisUse(mixed=frozenset({axis}))
            continue
        # an element-wise block: follow its output into the blocks that read it
        for write in block.writes:
            out = write.source
            if any(out.same_as(p) for p in params) or out in _seen:
                continue
            inner = axis_use(func, out, _seen | {buffer})
            stores: list = []
            tvm_ffi.structural_walk(block.body, (tirx.BufferStore, stores.append))
            for store in stores:
                if not store.buffer.same_as(out):
                    continue
                out_vars = [_vars(i) for i in store.indices]
                for load in loads:
                    for axis, index in enumerate(load.indices):
                        used = _vars(index)
                        for b, vs in enumerate(out_vars):
                            if used and used & vs:
                                if b in inner.pure:
                                    use = use | AxisUse(pure=frozenset({axis}))
                                elif b in inner.mixed:
                                    use = use | AxisUse(mixed=frozenset({axis}))
    return use


def lane_axes(uses: list[AxisUse], shape: list[int]) -> tuple[list[int], str | None]:
    """(lane axes to try, in order of preference, None), or ([], why no lane axis serves
    every reader).  Readers that reduce fix the lane axis; readers that only read element by
    element leave it free: every axis holding whole texels, innermost first (the producer
    decides among them -- a convolution writes its channels as texels, not its width)."""
    wanted = {max(u.pure) for u in uses if u.pure}
    if len(wanted) > 1:
        return [], (f"readers reduce over different axes {sorted(wanted)}: one layout each "
                    "(pooled copies)")
    free = [a for a in reversed(range(len(shape))) if shape[a] % LANES == 0]
    if wanted:
        axis = wanted.pop()
        if shape[axis] % LANES == 0:
            return [axis], None
        # no whole texels along the reduction: a pooling (a 7 x 7 window, over two or more
        # axes) still reads four channels per texel; a GEMM or a softmax over 197 keys would
        # read one lane of every texel it fetches, so its input stays a buffer
        if free and all(len(u.pure) >= 2 for u in uses if u.pure):
            return free, None
        return [], f"lane axis {axis} has extent {shape[axis]}, not a multiple of {LANES}"
    if not free:
        return [], f"no axis of {shape} is a multiple of {LANES}"
    return free, None


def lane_axis(uses: list[AxisUse], shape: list[int]) -> tuple[int | None, str | None]:
    """The preferred lane axis of :func:`lane_axes` (or None and the reason)."""
    axes, why = lane_axes(uses, shape)
    return (axes[0], None) if axes else (None, why)


def packed_shape(shape: list[int], lane: int) -> list[int]:
    """``shape`` with axis ``lane`` split in place into texels and the 4 lanes moved last."""
    return [*shape[:lane], shape[lane] // LANES, *shape[lane + 1:], LANES]


def _pack_map(lane: int):
    def index_map(*idx):
        return (*idx[:lane], idx[lane] // LANES, *idx[lane + 1:], idx[lane] % LANES)

    return index_map


def pack_param(func: tirx.PrimFunc, index: int, lane: int) -> tirx.PrimFunc:
    """``func`` with parameter ``index`` re-laid in the packed layout of ``lane`` and declared
    in texture scope; every access in the body reads / writes through the map."""
    from .texture import with_buffer_scope

    buffer = func.params[index]
    sch = s_tir.Schedule(func)
    for block in prim_blocks(func):
        for kind, regions in (("read", block.reads), ("write", block.writes)):
            for i, region in enumerate(regions):
                if region.source.same_as(buffer):
                    sch.transform_layout(sch.get_sblock(block.name_hint), (kind, i),
                                         _pack_map(lane))
                    return with_buffer_scope(sch.mod["main"], index, SCOPE)
    raise SmartMemError(f"parameter '{buffer.name}' of a kernel is never accessed")


# -- policy and limits -------------------------------------------------------------------------


def policy_reason(target: Target | None, policy: str | None = None) -> str | None:
    """Why the policy keeps every activation of ``target`` in buffers, or None when it packs."""
    from .texture import measured_policy

    return measured_policy(
        target, policy, POLICY_ENV, "texture_activations",
        lambda e: (f"activations in images measured slower than buffers on {e.get('device')} "
                   f"({e.get('activations_measured')})"))


def cost_ratios(target: Target | None, policy: str | None = None) -> tuple[dict, str] | None:
    """(measured image / buffer time ratio per kernel kind, device) for the per-tensor cost
    model, or None: the policy is not ``measured``, or the target has no ratios."""
    import os

    from .texture import texture_entry

    if (policy or os.environ.get(POLICY_ENV) or "measured") != "measured" or target is None:
        return None
    entry = texture_entry(target)
    ratios = entry.get("texture_time_ratio")
    return (dict(ratios), str(entry.get("device", target.kind.name))) if ratios else None


def extent_reason(shape: list[int], limits: tuple[int, int]) -> str | None:
    width, height, depth = image_extent(shape, SCOPE)
    spatial, max_depth = limits
    if width > spatial or height > spatial or depth > max_depth:
        return (f"image {width} x {height} x {depth} texels exceeds the target's limits "
                f"{spatial} x {spatial} x {max_depth}")
    return None


# -- the pass ----------------------------------------------------------------------------------


def _call_tir(value) -> bool:
    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and \
        value.op.name == "relax.call_tir" and isinstance(value.args[1], relax.Tuple) and \
        len(value.args) == 2


@dataclasses.dataclass
class _Site:
    """A call_tir binding and the PrimFunc it will call (rewritten as tensors are placed)."""

    index: int
    func: tirx.PrimFunc
    n_inputs: int
    changed: bool = False


def _schedule_error(func: tirx.PrimFunc, target: Target, rules: list) -> str | None:
    """None when ``func`` schedules with ``rules`` and its texture accesses lower."""
    from ..tir.schedule import apply_rules

    with target:
        scheduled, rule = apply_rules(func, target, rules)
    if scheduled is None:
        return "no schedule rule applies"
    try:
        lower_texture_access(scheduled)
    except SmartMemError as err:
        return f"{rule}: {err}"
    return None


def place_function(mod: tvm.IRModule, target: Target, rules: list,
                   func_name: str = "main", policy: str | None = None) -> tvm.IRModule:
    """Place the intermediate tensors of ``func_name`` in images (see module doc)."""
    func = mod[func_name]
    if not is_single_block(func):
        return mod
    block = Block.of(func)
    record: dict = {"images": {}, "kept": {}, "estimates": {}, "image_bytes": 0,
                    "kept_bytes": 0, "copy_bytes": 0}
    not_worth_it = policy_reason(target, policy)  # validates the policy too
    model = cost_ratios(target, policy)
    if model is not None:
        not_worth_it = None  # the ratios decide, tensor by tensor
    sites: dict[int, _Site] = {}
    for i, b in enumerate(block.bindings):
        if _call_tir(b.value) and isinstance(mod[b.value.args[0]], tirx.PrimFunc):
            sites[i] = _Site(i, mod[b.value.args[0]], len(b.value.args[1].fields))
    limits = image_limits(target)
    lanes: dict[str, int] = {}  # placed tensor -> its lane axis
    for i in sites:
        var = block.bindings[i].var
        shape = list(shape_of(var) or ())
        if not shape or not block.users[i] or var in block.output_vars:
            continue  # dynamic, a scalar, dead or a graph output: not an intermediate tensor
        if str(var.ty.dtype) not in _DTYPES:
            continue
        readers = []
        for u in sorted(block.users[i]):
            value = block.bindings[u].value
            if u not in sites:
                readers = None
                break
            readers += [(u, k) for k, a in enumerate(value.args[1].fields) if a.same_as(var)]
        if not readers:
            record["kept"][var.name] = "read by something other than a kernel"
            record["kept_bytes"] += tensor_bytes(var.ty)
            continue
        reason = not_worth_it
        lane = None
        if reason is None and model is not None:
            kinds = [kernel_kind(sites[i].func)] + [kernel_kind(sites[u].func) for u, _ in readers]
            estimate = image_estimate(kinds, model[0])
            record["estimates"][var.name] = round(estimate.ratio, 3)
            if not estimate.pays:
                reason = estimate.describe(model[1])
        if reason is None:
            uses = [axis_use(sites[u].func, sites[u].func.params[k]) for u, k in readers]
            candidates, reason = lane_axes(uses, shape)
            if reason and "copies" in reason:
                copies = len({max(u.pure) for u in uses if u.pure})
                record["copy_bytes"] += (copies - 1) * tensor_bytes(var.ty)
            failures = []
            for axis in candidates:
                why = extent_reason(packed_shape(shape, axis), limits) or \
                    _try_place(sites, i, readers, axis, target, rules)
                if why is None:
                    lane = axis
                    break
                failures.append(why)
            if failures and lane is None:
                reason = failures[0] + (f" (lane axes {candidates[1:]} tried too)"
                                        if len(candidates) > 1 else "")
        if reason is not None:
            record["kept"][var.name] = reason
            record["kept_bytes"] += tensor_bytes(var.ty)
            log.info("activation %s stays in a buffer: %s", var.name, reason)
            continue
        width, height, depth = image_extent(packed_shape(shape, lane), SCOPE)
        record["images"][var.name] = f"{width}x{height}x{depth}"
        record["image_bytes"] += tensor_bytes(var.ty)
        lanes[var.name] = lane
    return _rewrite(mod, func_name, block, sites, lanes, record)


def _try_place(sites: dict, producer: int, readers: list, lane: int, target: Target,
               rules: list) -> str | None:
    """Rewrite the producer and readers of one tensor for its packed image; keep the rewrite
    when every kernel still schedules and lowers, else undo it and say why."""
    trial: dict[int, tirx.PrimFunc] = {}
    site = sites[producer]
    trial[producer] = pack_param(site.func, site.n_inputs, lane)
    for u, k in readers:
        trial[u] = pack_param(trial.get(u, sites[u].func), k, lane)
    for idx, func in trial.items():
        error = _schedule_error(func, target, rules)
        if error is not None:
            role = "producer" if idx == producer else "reader"
            return f"{role} kernel does not lower with an image: {error}"
    for idx, func in trial.items():
        sites[idx].func = func
        sites[idx].changed = True
    return None


def _rewrite(mod: tvm.IRModule, func_name: str, block: Block, sites: dict, lanes: dict,
             record: dict) -> tvm.IRModule:
    func = mod[func_name]
    attrs = {str(k): v for k, v in func.attrs.items()} if func.attrs else {}
    attrs[ACTIVATIONS_ATTR] = _as_attr(record)
    if not lanes:
        out = mod.clone()
        out[func_name] = func.with_attr(ACTIVATIONS_ATTR, attrs[ACTIVATIONS_ATTR])
        return out

    def emit(bb: relax.BlockBuilder, mapping: dict) -> None:
        for i, b in enumerate(block.bindings):
            value = substitute(b.value, mapping)
            site = sites.get(i)
            if site is not None and site.changed:
                old = value.args[0]
                gv = bb.add_func(site.func.without_attr("global_symbol"),
                                 f"{old.name_hint}_texture")
                ty = b.var.ty
                if b.var.name in lanes:
                    ty = relax.TensorType(packed_shape(list(shape_of(b.var)), lanes[b.var.name]),
                                          ty.dtype)
                if isinstance(ty, relax.TupleType):  # a kernel with several outputs
                    ty = list(ty.fields)
                value = relax.call_tir(gv, value.args[1], ty)
            bind_like(bb, b.var, value, mapping)

    out = rebuild_function(mod, func_name, "texture_activations", emit, attrs)
    return relax.transform.DeadCodeElimination()(out)


def _as_attr(record: dict) -> dict:
    return {"images": dict(record["images"]), "kept": dict(record["kept"]),
            "estimates": {k: str(v) for k, v in record["estimates"].items()},
            **{key: tirx.IntImm("int64", record[key])
               for key in ("image_bytes", "kept_bytes", "copy_bytes")}}


def texture_activations_of(func: relax.Function) -> dict:
    """The recorded placement (images: {tensor: 'WxHxD'}, kept: {tensor: reason},
    estimates: {tensor: the cost model's image / buffer ratio}, image_bytes, kept_bytes (the
    intermediates left in buffers), copy_bytes); empty when the pass did not run."""
    if not func.attrs or ACTIVATIONS_ATTR not in func.attrs:
        return {}
    rec = func.attrs[ACTIVATIONS_ATTR]
    return {"images": {str(k): str(v) for k, v in rec["images"].items()},
            "kept": {str(k): str(v) for k, v in rec["kept"].items()},
            "estimates": {str(k): float(str(v)) for k, v in rec["estimates"].items()}
            if "estimates" in rec else {},
            **{key: int(rec[key]) for key in ("image_bytes", "kept_bytes", "copy_bytes")}}


def PackActivationsToTexture(target: Target | None = None, rules: list | None = None,
                             func_name: str | None = None,
                             policy: str | None = None) -> tvm.transform.Pass:
    """Place intermediate tensors in RGBA images packed by their readers' reduction axis (see
    module doc); ``rules`` are the schedule rules the pipeline will use (tried per kernel)."""

    @tvm.transform.module_pass(opt_level=0, name="PackActivationsToTexture")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        tgt = target or Target.current(allow_none=False)
        if rules is None:
            from ..pipeline import _dlight_rules

            use = _dlight_rules(tuned=True, texture=True, long_rows=True, attention=True)
        else:
            use = rules
        return for_each_function(mod, func_name,
                                 lambda m, name: place_function(m, tgt, use, name, policy))

    return _pass

"""PackWeightsToTexture: matmul weights packed by their reduction dimension into RGBA images.

SmartMem's 2.5D mapping stores a tensor in image memory with its consumer's reduction dimension
split in chunks of 4 across the RGBA lanes of a texel.  For a projection ``y = x @ W`` with
``W[k, n]`` the consumer reduces over ``k``, so the weight becomes ``P[n, k // 4, k % 4]`` --
``k / 4`` texels along the image width, one image row per output column ``n`` -- and the
GEMM reads four consecutive ``k`` of one column as one texel through the texture cache.

Weights are the tensors worth it first: at batch 1 a transformer's projections read every
weight once per inference, and weights are written once, so packing happens at load time (the
pack kernel and the copy into an image are weight-only work that ``LiftWeightTransforms`` moves
to ``main_transform_params``).  The copy is the runtime's ``smartmem.opencl.to_image`` (the
VM's pooled allocator does not hand out images); the GEMM is a ``call_tir`` of a PrimFunc whose
weight parameter is in ``global.texture`` scope, scheduled by the GEMM rule like any matmul and
lowered by ``tir.texture.LowerTextureAccess``.

Whether images pay is a property of the device, so it is measured: the ``opencl-texture`` entry
of ``tir/matmul_configs.json`` (written by ``benchmarks/texture_matmul_sweep.py``) says
``texture_weights: image`` or ``buffer``.  On the H100 through NVIDIA OpenCL the texture GEMMs
ran at 0.77x of the buffer GEMMs, so the shipped table keeps weights in buffers there; a target
without a measurement packs (what a mobile GPU's texture path is for).
``TVM_SMARTMEM_TEXTURE_WEIGHTS=always|never|measured`` overrides the policy.

A weight also stays in a buffer, with the reason recorded, when ``k`` is not a multiple of 4, when
the image would exceed the target's ``texture_spatial_limit`` (the vocabulary projection of an
LLM: tens of thousands of rows), or when its dtype has no RGBA image format here.  The record
is ``smartmem.texture_weights`` on the function: packed count, image bytes, and per weight kept
in a buffer the reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import tvm
import tvm_ffi
from tvm import ir, relax, te, tirx
from tvm.target import Target

from ..analysis.stats import tensor_bytes
from ..tir.texture import LANES, image_extent
from .combine_parallel_matmul import weight_vars
from .math_rewrite import shape_of
from .partition import (
    Block,
    bind_like,
    for_each_function,
    is_single_block,
    rebuild_function,
    substitute,
)

TEXTURE_ATTR = "smartmem.texture_weights"
SCOPE = "global.texture"
TO_IMAGE = "smartmem.opencl.to_image"
_DTYPES = ("float32", "float16")
log = logging.getLogger(__name__)


def with_buffer_scope(func: tirx.PrimFunc, index: int, scope: str) -> tirx.PrimFunc:
    """``func`` with parameter ``index``'s buffer declared in memory ``scope``."""
    old = func.params[index]
    new = tirx.decl_buffer(old.shape, old.dtype, old.name, scope=scope)
    return tvm_ffi.structural_map(func, (ir.Var, lambda v: new if v.same_as(old) else v))


def image_limits(target: Target | None) -> tuple[int, int]:
    """(largest image width / height, largest array depth) on ``target`` (16384 and 2048 when
    it does not say)."""
    attrs = target.attrs if target is not None else {}
    spatial = int(attrs["texture_spatial_limit"]) if "texture_spatial_limit" in attrs else 16384
    depth = int(attrs["texture_depth_limit"]) if "texture_depth_limit" in attrs else 2048
    return spatial, depth


def texture_limit(target: Target | None) -> int:
    """The largest image width / height the target allows (16384 when it does not say)."""
    return image_limits(target)[0]


POLICY_ENV = "TVM_SMARTMEM_TEXTURE_WEIGHTS"
POLICIES = ("measured", "always", "never")


def measured_policy(target: Target | None, policy: str | None, env: str, verdict: str,
                    why: Callable[[dict], str]) -> str | None:
    """Why a texture policy keeps ``target``'s tensors in buffers, or None when it packs.

    ``policy`` (else ``$env``, else ``measured``) is ``always``, ``never`` or ``measured``: the
    ``opencl-texture`` entry of ``tir/matmul_configs.json`` saying ``verdict: buffer`` for the
    target's kind (``why(entry)`` words the measurement); a kind never measured packs."""

    policy = policy or os.environ.get(env) or "measured"
    if policy not in POLICIES:
        raise ValueError(f"{env}={policy}: expected one of {', '.join(POLICIES)}")
    if policy == "always":
        return None
    if policy == "never":
        return f"{env}=never"
    entry = texture_entry(target)
    return why(entry) if entry.get(verdict) == "buffer" else None


def texture_entry(target: Target | None) -> dict:
    """The ``opencl-texture`` entry of ``tir/matmul_configs.json`` for ``target``'s kind (the
    texture measurements of that device; empty when there are none)."""
    from ..tir.matmul import load_table, target_key, texture_key

    key = target_key(target) if target is not None else None
    return load_table().get(texture_key(key), {}) if key else {}


def policy_reason(target: Target | None, policy: str | None = None) -> str | None:
    """Why the policy keeps every weight of ``target`` in buffers, or None when it packs."""
    return measured_policy(
        target, policy, POLICY_ENV, "texture_weights",
        lambda e: (f"texture GEMMs measured slower than buffer GEMMs on {e.get('device')} "
                   f"({e.get('texture_over_buffer')}x, {e.get('measured')})"))


def pack_reason(k: int, n: int, dtype: str, limit: int) -> str | None:
    """Why a ``[k, n]`` weight cannot be packed into an image, or None when it can."""
    if dtype not in _DTYPES:
        return f"dtype {dtype} has no RGBA image format here (supported: {', '.join(_DTYPES)})"
    if k % LANES:
        return f"reduction length {k} is not a multiple of {LANES}"
    width, height, _ = image_extent([n, k // LANES, LANES], SCOPE)
    if width > limit or height > limit:
        return f"image {width} x {height} texels exceeds the texture limit {limit}"
    return None


def _i64(*dims: int) -> list:
    """int64 extents, like the legalised kernels these fuse with (FuseTIR compares types)."""
    return [tirx.IntImm("int64", d) for d in dims]


def pack_primfunc(k: int, n: int, dtype: str) -> tirx.PrimFunc:
    """``P[n, k4, c] = W[4 * k4 + c, n]`` (a global buffer, copied into an image after)."""
    w = te.placeholder(_i64(k, n), dtype, name="w")
    packed = te.compute(_i64(n, k // LANES, LANES),
                        lambda j, k4, c: w[k4 * LANES + c, j], name="T_pack_rgba")
    return te.create_prim_func([w, packed])


def texture_matmul_primfunc(x_shape: list[int], n: int, dtype: str) -> tirx.PrimFunc:
    """``y[..., m, n] = sum_k x[..., m, k] * P[n, k // 4, k % 4]``, ``P`` in ``global.texture``."""
    k = x_shape[-1]
    x = te.placeholder(_i64(*x_shape), dtype, name="x")
    p = te.placeholder(_i64(n, k // LANES, LANES), dtype, name="w_rgba")
    r = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", k)), name="k")

    def body(*idx):
        return te.sum(x(*idx[:-1], r) * p[idx[-1], r // LANES, r % LANES], axis=r)

    y = te.compute(_i64(*x_shape[:-1], n), body, name="T_matmul_texture")
    return with_buffer_scope(te.create_prim_func([x, p, y]), 1, SCOPE)


def _candidates(block: Block, weights: set) -> list[int]:
    """Bindings ``x @ w`` with ``w`` a 2-D weight and ``x`` a static-shape activation."""
    found = []
    for i, b in enumerate(block.bindings):
        v = b.value
        if not (isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op)
                and v.op.name == "relax.matmul"):
            continue
        x, w = v.args
        if isinstance(w, relax.Var) and w in weights and x not in weights \
                and shape_of(w) is not None and len(shape_of(w)) == 2 \
                and shape_of(x) is not None and len(shape_of(x)) >= 2 \
                and str(getattr(b.var.ty, "dtype", "")) == str(w.ty.dtype) == str(x.ty.dtype):
            found.append(i)
    return found


def pack_function(mod: tvm.IRModule, target: Target | None, func_name: str = "main",
                  policy: str | None = None) -> tvm.IRModule:
    """Pack the weights of ``func_name``'s matmuls into images (see the module doc)."""
    func = mod[func_name]
    if not is_single_block(func) or not func.attrs or "num_input" not in func.attrs:
        return mod
    block = Block.of(func)
    weights = weight_vars(func, block)
    limit = texture_limit(target)
    not_worth_it = policy_reason(target, policy)
    chosen: dict[int, tuple[int, int]] = {}
    kept: dict[str, str] = {}
    image_bytes = 0
    for i in _candidates(block, weights):
        w = block.bindings[i].value.args[1]
        k, n = shape_of(w)
        reason = not_worth_it or pack_reason(k, n, str(w.ty.dtype), limit)
        if reason:
            kept[w.name] = reason
            log.info("weight %s stays in a buffer: %s", w.name, reason)
        else:
            chosen[i] = (k, n)
            image_bytes += tensor_bytes(w.ty)
    record = {"packed": len(chosen), "image_bytes": image_bytes, "kept": kept}
    attrs = {str(key): v for key, v in func.attrs.items()}
    if not chosen:
        return _with_record(mod, func_name, func, record)

    images: dict = {}  # one image per weight, however many matmuls read it

    def emit(bb: relax.BlockBuilder, mapping: dict) -> None:
        for i, b in enumerate(block.bindings):
            value = substitute(b.value, mapping)
            if i in chosen:
                k, n = chosen[i]
                x, w = value.args
                dtype = str(w.ty.dtype)
                if w not in images:
                    pack = bb.add_func(pack_primfunc(k, n, dtype), "pack_rgba")
                    packed_ty = relax.TensorType((n, k // LANES, LANES), dtype)
                    packed = bb.emit(relax.call_tir(pack, [w], packed_ty))
                    images[w] = bb.emit(relax.call_pure_packed(
                        TO_IMAGE, packed, tvm.ir.StringImm(SCOPE), ty_args=packed_ty))
                gemm = bb.add_func(texture_matmul_primfunc(shape_of(x), n, dtype),
                                   "matmul_texture")
                value = relax.call_tir(gemm, [x, images[w]], b.var.ty)
            bind_like(bb, b.var, value, mapping)

    out = rebuild_function(mod, func_name, "texture", emit, attrs)
    return _with_record(out, func_name, out[func_name], record)


def _with_record(mod: tvm.IRModule, func_name: str, func, record: dict) -> tvm.IRModule:
    out = mod.clone() if mod[func_name].same_as(func) else mod
    out[func_name] = func.with_attr(TEXTURE_ATTR, {
        "packed": tirx.IntImm("int64", record["packed"]),
        "image_bytes": tirx.IntImm("int64", record["image_bytes"]),
        "kept": record["kept"]})
    return out


def texture_weights_of(func: relax.Function) -> dict:
    """The recorded packing (packed, image_bytes, kept: {weight: reason}); empty when the
    pass did not run."""
    if not func.attrs or TEXTURE_ATTR not in func.attrs:
        return {}
    rec = func.attrs[TEXTURE_ATTR]
    return {"packed": int(rec["packed"]), "image_bytes": int(rec["image_bytes"]),
            "kept": {str(k): str(v) for k, v in rec["kept"].items()}}


def PackWeightsToTexture(target: Target | None = None, func_name: str | None = None,
                         policy: str | None = None) -> tvm.transform.Pass:
    """Pack matmul weights into RGBA images by their reduction dimension (see module doc);
    ``policy`` (``measured`` by default, or ``$TVM_SMARTMEM_TEXTURE_WEIGHTS``) decides whether
    images are used on this target at all."""

    @tvm.transform.module_pass(opt_level=0, name="PackWeightsToTexture")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        tgt = target or Target.current(allow_none=True)
        return for_each_function(mod, func_name,
                                 lambda m, name: pack_function(m, tgt, name, policy))

    return _pass

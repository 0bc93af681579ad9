"""Activations in texture memory (PackActivationsToTexture and what runs them) on PoCL.

Intermediate tensors go into RGBA images packed along the axis their readers reduce over; the
producer kernel writes whole texels, readers read through the packed layout, the VM allocates
images through the runtime's allocator.  Every graph runs on a real OpenCL device (PoCL) and is
compared with numpy / ONNX Runtime (fp32 tolerance of ``tvm_smartmem.numerics``); placement
decisions are asserted exactly on hand-built graphs.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tvm
from conftest import assert_matches, run_vm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tvm import relax, s_tir, te, tirx

from tvm_smartmem import errors, frontend, models, numerics, targets
from tvm_smartmem.analysis.stats import collect
from tvm_smartmem.pipeline import UP_TO_KERNELS, phase_passes, smartmem_pipeline
from tvm_smartmem.runtime.opencl.image_bounds import check_image_bounds
from tvm_smartmem.tir.schedules import TextureElementwise, TextureRowReduction
from tvm_smartmem.tir.texture import LowerTextureAccess, is_texture
from tvm_smartmem.transform.texture import with_buffer_scope
from tvm_smartmem.transform.texture_activations import (
    AxisUse,
    axis_use,
    lane_axes,
    lane_axis,
    pack_param,
    packed_shape,
    texture_activations_of,
)
from tvm_smartmem.transform.texture_alloc import AllocateTextureTensors

TEXTURE = targets.get("opencl-texture")
F32 = "float32"


@pytest.fixture(autouse=True)
def _activations_in_images(monkeypatch):
    """Weights stay where the shipped table puts them; activations always go to images (the
    table keeps them in buffers on desktop OpenCL, measured on the H100: these tests exercise
    the image path, so they ask for it)."""
    monkeypatch.setenv("TVM_SMARTMEM_TEXTURE_ACTIVATIONS", "always")


def _stats() -> dict:
    return dict(tvm.get_global_func("smartmem.opencl.allocator_stats")())


def _placement(mod: tvm.IRModule, target=TEXTURE) -> dict:
    return texture_activations_of(smartmem_pipeline(target, phases=UP_TO_KERNELS)(mod)["main"])


def _run(mod, args, params, dev, target=TEXTURE, **vm_options):
    ex = tvm.compile(mod, target, relax_pipeline="smartmem")
    if vm_options:
        from tvm_smartmem.measure.runner import flatten_outputs, prepare_weights

        vm = relax.VirtualMachine(ex, dev, **vm_options)
        up = [tvm.runtime.tensor(a, dev) for a in args]
        weights = prepare_weights(vm, [tvm.runtime.tensor(p, dev) for p in params])
        return flatten_outputs(vm["main"](*up, *weights))
    return run_vm(ex, args, dev=dev, params=params)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * g + b


def _mlp(m: int, d: int, hidden: int, act: str = "gelu"):
    """x -> Linear(d, hidden) + act ("hidden") -> Linear(hidden, d) + x ("summed") ->
    LayerNorm (the output)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, d), F32))
    w1 = relax.Var("w1", relax.TensorType((d, hidden), F32))
    b1 = relax.Var("b1", relax.TensorType((hidden,), F32))
    w2 = relax.Var("w2", relax.TensorType((hidden, d), F32))
    g = relax.Var("g", relax.TensorType((d,), F32))
    beta = relax.Var("beta", relax.TensorType((d,), F32))
    with bb.function("main", [x, w1, b1, w2, g, beta], attrs={"num_input": 1}):
        with bb.dataflow():
            h = bb.emit(relax.op.add(relax.op.matmul(x, w1), b1))
            h = bb.emit(relax.op.nn.gelu(h) if act == "gelu" else relax.op.nn.relu(h),
                        name_hint="hidden")
            s = bb.emit(relax.op.add(relax.op.matmul(h, w2), x), name_hint="summed")
            out = bb.emit_output(relax.op.nn.layer_norm(s, g, beta, axes=[-1]))
        bb.emit_func_output(out)
    rng = np.random.default_rng(m * 131 + d * 7 + hidden)
    params = [rng.standard_normal(shape).astype(F32) * scale for shape, scale in
              (((d, hidden), d ** -0.5), ((hidden,), 1.0), ((hidden, d), hidden ** -0.5),
               ((d,), 1.0), ((d,), 1.0))]
    xv = rng.standard_normal((m, d)).astype(F32)
    w1v, b1v, w2v, gv, betav = params
    hv = xv @ w1v + b1v
    hv = _gelu(hv) if act == "gelu" else np.maximum(hv, 0)
    ref = _layer_norm(hv @ w2v + xv, gv, betav)
    return bb.get(), [xv], params, [ref.astype(F32)]


# -- decisions on hand-built graphs ---------------------------------------------------------


def test_mlp_activations_go_to_images_packed_along_their_readers_reduction(dev):
    """Both intermediates of the MLP block are read by a reduction over their last axis (the
    second GEMM reduces over ``hidden``, the layernorm over ``d``), so both are packed along it:
    ``hidden`` [16, 128] -> 32 texels wide, 16 rows; ``summed`` [16, 64] -> 16 x 16.  The
    output is a graph output and stays a buffer; nothing else is an intermediate."""
    mod, args, params, refs = _mlp(16, 64, 128)
    record = _placement(mod)
    assert record["images"] == {"hidden": "32x16x1", "summed": "16x16x1"}
    assert record["kept"] == {} and record["copy_bytes"] == record["kept_bytes"] == 0
    assert record["image_bytes"] == (16 * 128 + 16 * 64) * 4
    before = _stats()
    assert_matches(_run(mod, args, params, dev), refs)
    first = _stats()
    assert first["images_created"] - before["images_created"] <= 2
    assert_matches(_run(mod, args, params, dev), refs)


def test_a_second_inference_creates_no_images(dev):
    """The VM's allocator pools images by extent: the first inference creates them, every
    later one reuses them (two image tensors per inference here)."""
    mod, args, params, refs = _mlp(16, 64, 128)
    ex = tvm.compile(mod, TEXTURE, relax_pipeline="smartmem")
    from tvm_smartmem.measure.runner import flatten_outputs, prepare_weights

    vm = relax.VirtualMachine(ex, dev)
    weights = prepare_weights(vm, [tvm.runtime.tensor(p, dev) for p in params])
    x = tvm.runtime.tensor(args[0], dev)
    assert_matches(flatten_outputs(vm["main"](x, *weights)), refs)
    before = _stats()
    for _ in range(3):
        assert_matches(flatten_outputs(vm["main"](x, *weights)), refs)
    after = _stats()
    assert after["images_created"] == before["images_created"]
    assert after["images_reused"] - before["images_reused"] == 3 * 2


def test_the_naive_allocator_serves_images_too(dev):
    """``memory_cfg="naive"`` (no pooling): images are created and released per inference."""
    mod, args, params, refs = _mlp(8, 32, 64)
    before = _stats()
    assert_matches(_run(mod, args, params, dev, memory_cfg="naive"), refs)
    assert _stats()["images_created"] - before["images_created"] == 2


def test_an_axis_that_is_not_a_multiple_of_four_keeps_a_buffer(dev):
    """``hidden`` has 18 columns: no whole texels along the reduction, so it stays a buffer
    with the reason; ``summed`` (32 columns) still goes to an image."""
    mod, args, params, refs = _mlp(8, 32, 18)
    record = _placement(mod)
    assert record["images"] == {"summed": "8x8x1"}
    assert record["kept"] == {"hidden": "lane axis 1 has extent 18, not a multiple of 4"}
    assert record["kept_bytes"] == 8 * 18 * 4
    assert_matches(_run(mod, args, params, dev), refs)


def test_images_beyond_the_targets_limits_keep_buffers(dev):
    """A target whose images are at most 16 texels wide: ``hidden`` (32 texels) stays a
    buffer, ``summed`` (16) fits."""
    small = targets.get("opencl-texture", spatial_limit=16)
    mod, args, params, refs = _mlp(16, 64, 128)
    record = _placement(mod, small)
    assert list(record["images"]) == ["summed"]
    assert record["kept"]["hidden"].startswith("image 32 x 16 x 1 texels exceeds")
    assert_matches(_run(mod, args, params, dev, target=small), refs)


def _two_readers(transposed_reader: bool):
    """t = exp(x) [32, 16], read by ``t @ w1`` (reduces axis 1) and by ``w2 @ t`` (reduces
    axis 0) or by ``t^T @ w3`` (reduces axis 0 too, through a transpose folded into it)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((32, 16), F32))
    w1 = relax.Var("w1", relax.TensorType((16, 8), F32))
    w2 = relax.Var("w2", relax.TensorType((8, 32), F32))
    with bb.function("main", [x, w1, w2], attrs={"num_input": 1}):
        with bb.dataflow():
            t = bb.emit(relax.op.exp(x), name_hint="t")
            if transposed_reader:
                y = bb.emit(relax.op.matmul(relax.op.permute_dims(t, [1, 0]),
                                            relax.op.permute_dims(w2, [1, 0])))
                out = bb.emit_output(relax.op.multiply(y, y))
            else:
                a = bb.emit(relax.op.matmul(t, w1))
                b = bb.emit(relax.op.matmul(w2, t))
                out = bb.emit_output(relax.op.add(relax.op.sum(a), relax.op.sum(b)))
        bb.emit_func_output(out)
    rng = np.random.default_rng(3)
    xv = rng.standard_normal((32, 16)).astype(F32) * 0.5
    w1v = rng.standard_normal((16, 8)).astype(F32)
    w2v = rng.standard_normal((8, 32)).astype(F32)
    tv = np.exp(xv)
    if transposed_reader:
        y = tv.T @ w2v.T
        ref = y * y
    else:
        ref = np.array((tv @ w1v).sum() + (w2v @ tv).sum(), dtype=F32)
    return bb.get(), [xv], [w1v, w2v], [ref.astype(F32)]


def test_readers_reducing_over_different_axes_keep_a_buffer_and_report_the_copy(dev):
    """One reader reduces over axis 1, the other over axis 0: one layout cannot serve both
    (SmartMem would keep a copy per layout): the tensor stays in a buffer and the bytes of the
    one extra copy (32 x 16 floats) are reported."""
    mod, args, params, refs = _two_readers(False)
    record = _placement(mod)
    assert "t" not in record["images"]
    assert record["kept"]["t"].startswith("readers reduce over different axes [0, 1]")
    assert record["copy_bytes"] == 32 * 16 * 4
    assert_matches(_run(mod, args, params, dev), refs)


def test_a_reader_reducing_over_the_first_axis_packs_that_axis(dev):
    """``t^T @ w`` reduces over axis 0 of ``t``: the texels hold 4 consecutive rows of one
    column, [32, 16] -> [8, 16, 4], 16 texels wide and 8 high (the element-wise producer
    writes along any axis)."""
    mod, args, params, refs = _two_readers(True)
    record = _placement(mod)
    assert record["images"] == {"t": "16x8x1"}
    assert_matches(_run(mod, args, params, dev), refs)


def test_policy_never_and_a_measured_buffer_verdict_keep_every_activation(monkeypatch, tmp_path):
    mod, *_ = _mlp(16, 64, 128)
    monkeypatch.setenv("TVM_SMARTMEM_TEXTURE_ACTIVATIONS", "never")
    record = _placement(mod)
    assert record["images"] == {} and set(record["kept"].values()) == {
        "TVM_SMARTMEM_TEXTURE_ACTIVATIONS=never"}
    monkeypatch.setenv("TVM_SMARTMEM_TEXTURE_ACTIVATIONS", "sometimes")
    with pytest.raises(ValueError, match="TVM_SMARTMEM_TEXTURE_ACTIVATIONS=sometimes"):
        _placement(mod)
    # a table of our own (the shipped one has no activation verdict): read fresh, and the
    # cache cleared again before anything else reads the shipped one
    table = tmp_path / "configs.json"
    table.write_text(json.dumps({"opencl-texture": {
        "texture_activations": "buffer", "device": "Some GPU", "activations_measured": "x.json"}}))
    monkeypatch.setenv("TVM_SMARTMEM_MATMUL_CONFIGS", str(table))
    monkeypatch.setenv("TVM_SMARTMEM_TEXTURE_ACTIVATIONS", "measured")
    from tvm_smartmem.tir.matmul import load_table

    load_table.cache_clear()
    try:
        record = _placement(mod)
    finally:
        load_table.cache_clear()
    assert record["images"] == {}
    assert "measured slower than buffers on Some GPU" in record["kept"]["hidden"]


def test_the_pass_can_be_switched_off_and_buffer_targets_are_untouched():
    mod, *_ = _mlp(16, 64, 128)
    off = smartmem_pipeline(TEXTURE, phases=UP_TO_KERNELS,
                            disable=("PackActivationsToTexture",))(mod)
    assert texture_activations_of(off["main"]) == {}
    plain = smartmem_pipeline(targets.get("opencl"), phases=UP_TO_KERNELS)(mod)
    assert texture_activations_of(plain["main"]) == {}
    on = smartmem_pipeline(TEXTURE, phases=UP_TO_KERNELS)(mod)
    assert collect(on).kernels == collect(off).kernels == collect(plain).kernels


# -- the analysis ------------------------------------------------------------------------------


def _prim(fn, *shapes):
    args = [te.placeholder(s, F32, name=f"a{i}") for i, s in enumerate(shapes)]
    return te.create_prim_func([*args, fn(*args)])


def test_axis_use_of_matmul_conv_softmax_and_elementwise_readers():
    from tvm import topi

    mm = _prim(lambda a, b: topi.matmul(a, b), (8, 16), (16, 4))
    assert axis_use(mm, mm.params[0]) == AxisUse(pure=frozenset({1}))
    assert axis_use(mm, mm.params[1]) == AxisUse(pure=frozenset({0}))
    conv = _prim(lambda x, w: topi.nn.conv2d_nchw(x, w, 1, 1, 1), (1, 8, 6, 6), (4, 8, 3, 3))
    use = axis_use(conv, conv.params[0])  # through the padding block
    assert use == AxisUse(pure=frozenset({1}), mixed=frozenset({2, 3}))
    sm = _prim(lambda x: topi.nn.softmax(x, axis=1), (4, 12))
    assert axis_use(sm, sm.params[0]).pure == frozenset({1})
    ew = _prim(lambda x: topi.exp(x), (4, 12))
    assert axis_use(ew, ew.params[0]) == AxisUse()


def test_lane_axis_choice():
    assert lane_axis([AxisUse()], [3, 8]) == (1, None)  # element-wise readers: last axis
    assert lane_axis([AxisUse(pure=frozenset({1, 3}))], [2, 4, 5, 8]) == (3, None)
    assert lane_axis([AxisUse(pure=frozenset({1}), mixed=frozenset({2, 3}))],
                     [1, 8, 6, 6]) == (1, None)  # NCHW4c for a convolution's input
    axis, why = lane_axis([AxisUse(pure=frozenset({0})), AxisUse(pure=frozenset({1}))], [4, 4])
    assert axis is None and "different axes [0, 1]" in why
    assert packed_shape([1, 8, 6, 6], 1) == [1, 2, 6, 6, 4]
    # element-wise readers leave the lane free: every whole-texel axis, innermost first (the
    # producer picks: a convolution's GEMM writes channels, so W fails and C is taken)
    assert lane_axes([AxisUse(), AxisUse()], [1, 8, 6, 8]) == ([3, 1], None)
    axes, why = lane_axes([AxisUse()], [1, 3, 5])
    assert axes == [] and "no axis of [1, 3, 5] is a multiple of 4" in why
    # a 7 x 7 pooling window holds no whole texels: four channels per texel instead; a
    # softmax / GEMM over 197 keys would read one lane per texel fetched: it keeps a buffer
    assert lane_axes([AxisUse(pure=frozenset({2, 3}))], [1, 8, 7, 7]) == ([1], None)
    axes, why = lane_axes([AxisUse(pure=frozenset({3}))], [1, 12, 197, 197])
    assert axes == [] and "extent 197, not a multiple of 4" in why


# -- schedule rules writing textures -----------------------------------------------------------


def _texture_kernel(func: tirx.PrimFunc, rule, dev):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with TEXTURE:
        from tvm.s_tir import dlight as dl

        mod = LowerTextureAccess()(dl.ApplyDefaultSchedule(rule)(mod))
    assert "smartmem.texture_buffers" in mod["main"].attrs
    return tvm.compile(mod, TEXTURE)


def _pipeline_kernel(func: tirx.PrimFunc, expected_rule: str):
    """Schedule ``func`` with the texture pipeline's rule list (checking which rule took it),
    lower its image accesses and build it."""
    from tvm_smartmem.pipeline import gpu_rules
    from tvm_smartmem.tir.schedule import apply_rules

    with TEXTURE:
        scheduled, rule = apply_rules(func, TEXTURE, gpu_rules(frozenset(), texture=True))
    assert rule == expected_rule
    mod = LowerTextureAccess()(tvm.IRModule({"main": scheduled.with_attr("global_symbol",
                                                                         "main")}))
    return tvm.compile(mod, TEXTURE)


def _image_of(array: np.ndarray, dev):
    img = tvm.runtime.empty(array.shape, str(array.dtype), dev, mem_scope="global.texture")
    img.copyfrom(array)
    return img


def _unpack(packed: np.ndarray, lane: int) -> np.ndarray:
    """Inverse of the in-place split: [.., C/4, .., 4] -> [.., C, ..]."""
    moved = np.moveaxis(packed, -1, lane + 1)
    shape = list(packed.shape[:-1])
    shape[lane] *= 4
    return moved.reshape(shape)


@pytest.mark.parametrize("shape, lane", [((3, 20), 1), ((5, 8, 6), 1), ((8, 3, 7), 0)])
def test_elementwise_rule_writes_texels_along_any_axis(dev, shape, lane):
    """An element-wise kernel whose output is packed along ``lane`` (not the innermost loop):
    the rule iterates over the texture's texels; odd extents leave partial thread blocks."""
    func = pack_param(_prim(lambda x: te.compute(x.shape, lambda *i: te.exp(x(*i)) * 2.0,
                                                 name="y"), shape), 1, lane)
    ex = _texture_kernel(func, TextureElementwise(), dev)
    x = np.random.default_rng(1).standard_normal(shape).astype(F32)
    out = tvm.runtime.empty(packed_shape(list(shape), lane), F32, dev, mem_scope="global.texture")
    ex["main"](tvm.runtime.tensor(x, dev), out)
    assert_matches([_unpack(out.numpy(), lane)], [np.exp(x) * 2])


@pytest.mark.parametrize("rows, cols", [(3, 20), (17, 64), (2, 1028), (4, 2048)])
@pytest.mark.parametrize("op", ["layer_norm", "softmax", "rms_norm"])
def test_row_reduction_rule_reads_and_writes_texels(dev, rows, cols, op):
    """Normalisations whose input and output are packed along the row, at sizes where the
    row's texels are not a multiple of the threads (5, 257 texels) and several rows."""
    from tvm import topi

    def body(x, g):
        if op == "layer_norm":
            return topi.nn.layer_norm(x, g, g, axis=[1], epsilon=1e-5)
        if op == "softmax":
            return topi.nn.softmax(x, axis=1)
        return topi.nn.rms_norm(x, g, axis=[1], epsilon=1e-5)

    func = _prim(body, (rows, cols), (cols,))
    func = pack_param(pack_param(func, 0, 1), 2, 1)
    ex = _texture_kernel(func, TextureRowReduction(), dev)
    rng = np.random.default_rng(rows + cols)
    x = rng.standard_normal((rows, cols)).astype(F32)
    g = rng.standard_normal(cols).astype(F32)
    out = tvm.runtime.empty((rows, cols // 4, 4), F32, dev, mem_scope="global.texture")
    ex["main"](_image_of(x.reshape(rows, cols // 4, 4), dev), tvm.runtime.tensor(g, dev), out)
    if op == "layer_norm":
        ref = _layer_norm(x, g, g)
    elif op == "softmax":
        e = np.exp(x - x.max(1, keepdims=True))
        ref = e / e.sum(1, keepdims=True)
    else:
        ref = x / np.sqrt((x * x).mean(1, keepdims=True) + 1e-5) * g
    assert_matches([out.numpy().reshape(rows, cols)], [ref.astype(F32)])


def _torch(fn, *arrays):
    import torch

    return fn(*[torch.tensor(a) for a in arrays]).numpy()


@pytest.mark.parametrize("case", ["depthwise", "max_pool", "global_avg_pool", "gemv"])
def test_fallback_rule_writes_texels_of_any_kernel(dev, case):
    """Kernels no other texture rule takes, with their output packed along the channels (odd
    spatial sizes, channel counts that leave partial thread blocks): computed a texel per
    thread in registers, every value checked against torch / numpy."""
    import torch.nn.functional as F
    from tvm import topi

    if case == "depthwise":
        shapes, lane = [(1, 12, 7, 9), (12, 1, 3, 3)], 1
        fn = lambda x, w: topi.nn.depthwise_conv2d_nchw(x, w, 1, 1, 1)  # noqa: E731
        ref = lambda x, w: _torch(lambda a, b: F.conv2d(a, b, padding=1, groups=12), x, w)  # noqa: E731
    elif case == "max_pool":
        shapes, lane = [(1, 8, 9, 9)], 1
        fn = lambda x: topi.nn.pool2d(x, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), "max")  # noqa: E731
        ref = lambda x: _torch(lambda a: F.max_pool2d(a, 3, 2, 1), x)  # noqa: E731
    elif case == "global_avg_pool":
        shapes, lane = [(1, 20, 7, 7)], 1
        fn = lambda x: topi.nn.global_pool(x, "avg")  # noqa: E731
        ref = lambda x: x.mean((2, 3), keepdims=True)  # noqa: E731
    else:
        shapes, lane = [(1, 48), (48, 20)], 1
        fn = lambda x, w: topi.matmul(x, w)  # noqa: E731
        ref = lambda x, w: x @ w  # noqa: E731
    from tvm_smartmem.tir.schedules import TextureFallback

    args = [te.placeholder(s, F32, name=f"a{i}") for i, s in enumerate(shapes)]
    out = fn(*args)
    func = pack_param(te.create_prim_func([*args, out]), len(shapes), lane)
    ex = _texture_kernel(func, TextureFallback(), dev)
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal(s).astype(F32) for s in shapes]
    out_shape = [int(d) for d in out.shape]
    img = tvm.runtime.empty(packed_shape(out_shape, lane), F32, dev, mem_scope="global.texture")
    ex["main"](*[tvm.runtime.tensor(a, dev) for a in arrays], img)
    assert_matches([_unpack(img.numpy(), lane)], [ref(*arrays).astype(F32)])


def test_fallback_rule_leaves_matrix_products_to_the_gemm_rule():
    """A texel per thread with a serial reduction would be a naive GEMM: a matrix product
    with rows and columns is declined (GEMV and convolutions are taken, above)."""
    from tvm import topi

    from tvm_smartmem.tir.schedules import TextureFallback

    gemm = pack_param(_prim(lambda a, b: topi.matmul(a, b), (8, 16), (16, 12)), 2, 1)
    gemv = pack_param(_prim(lambda a, b: topi.matmul(a, b), (1, 16), (16, 12)), 2, 1)
    assert TextureFallback().apply(gemm, TEXTURE, False) is None
    assert TextureFallback().apply(gemv, TEXTURE, False) is not None


def test_a_gelu_epilogue_with_an_overhanging_tile_writes_every_texel_once(dev):
    """GEMM + bias + GELU written to an image, 17 rows (the GEMM tile overhangs): ``erf``
    does not vectorise, so the epilogue is staged in registers and each texel written by one
    float4 ``write_imagef`` guarded by the image's bounds (regression: scalarised stores wrote
    broadcast lanes; a shared staging register was merged by CSE; the overhang wrote past the
    image)."""
    from tvm import topi

    m, k, n = 17, 32, 64

    def gemm_gelu(x, w, b):
        y = topi.add(topi.matmul(x, w), b)
        return te.compute(y.shape, lambda i, j: 0.5 * y[i, j] * (
            1.0 + te.erf(y[i, j] * (1.0 / math.sqrt(2.0)))), name="gelu")

    func = _prim(gemm_gelu, (m, k), (k, n), (n,))
    func = pack_param(func, 3, 1)
    ex = _pipeline_kernel(func, "TextureMatmul")
    src = ex.mod.imports[0].inspect_source()
    writes = [line.strip() for line in src.splitlines() if "write_imagef(" in line]
    # a thread's 4 x 4 tile: four texels, each written once with its own float4
    assert len(writes) == 4 and len({w.rsplit(",", 1)[1] for w in writes}) == 4, writes
    rng = np.random.default_rng(2)
    xv, wv = rng.standard_normal((m, k)).astype(F32), rng.standard_normal((k, n)).astype(F32)
    bv = rng.standard_normal(n).astype(F32)
    out = tvm.runtime.empty((m, n // 4, 4), F32, dev, mem_scope="global.texture")
    ex["main"](*[tvm.runtime.tensor(a, dev) for a in (xv, wv, bv)], out)
    assert_matches([out.numpy().reshape(m, n)], [_gelu(xv @ wv + bv).astype(F32)])


def test_a_gemm_tile_whose_rows_wrap_an_image_row_is_staged_exactly(dev):
    """A channels-last linear layer + GELU on 16 x 6 pixels, written as an image packed along
    its 64 channels: each thread's 4 rows are consecutive pixels that wrap the 6-pixel image
    row, so the registers are laid out with the pixels fused (the image's own layout would
    cover other threads' texels); every value checked against numpy."""
    from tvm import topi

    h, w, cin, cout = 16, 6, 32, 64

    def linear_gelu(x, wt):
        y = topi.nn.matmul(topi.reshape(x, (h * w, cin)), wt)
        y = topi.reshape(y, (1, h, w, cout))
        return te.compute(y.shape, lambda *i: 0.5 * y(*i) * (
            1.0 + te.erf(y(*i) * (1.0 / math.sqrt(2.0)))), name="gelu")

    func = pack_param(_prim(linear_gelu, (1, h, w, cin), (cin, cout)), 2, 3)
    ex = _pipeline_kernel(func, "TextureMatmul")
    rng = np.random.default_rng(11)
    xv = rng.standard_normal((1, h, w, cin)).astype(F32)
    wv = rng.standard_normal((cin, cout)).astype(F32)
    out = tvm.runtime.empty((1, h, w, cout // 4, 4), F32, dev, mem_scope="global.texture")
    ex["main"](tvm.runtime.tensor(xv, dev), tvm.runtime.tensor(wv, dev), out)
    ref = _gelu(xv.reshape(h * w, cin) @ wv).reshape(1, h, w, cout)
    assert_matches([out.numpy().reshape(1, h, w, cout)], [ref.astype(F32)])


def test_a_gemm_reading_a_texture_through_a_head_merge_keeps_its_texel_coordinates(dev):
    """MobileViT's head merge with 36-wide heads: the GEMM's cooperative fetch reads
    ``x[k // 36, m, (k % 36) // 4, k % 4]`` four lanes at a time.  The simplifier cannot show
    that the four lanes stay in one texel, so the fetch is made scalar rather than leaving the
    lane variable undefined in the texel coordinates (regression: the build failed)."""
    heads, m, hd, n = 4, 64, 36, 48

    def merged_gemm(x, w):
        r = te.reduce_axis((0, heads * hd), name="k")
        return te.compute((m, n), lambda i, j: te.sum(
            x[r // hd, i, r % hd] * w[r, j], axis=r), name="y")

    func = pack_param(_prim(merged_gemm, (heads, m, hd), (heads * hd, n)), 0, 2)
    ex = _pipeline_kernel(func, "TextureMatmul")
    rng = np.random.default_rng(9)
    xv = rng.standard_normal((heads, m, hd)).astype(F32)
    wv = rng.standard_normal((heads * hd, n)).astype(F32)
    out = tvm.runtime.empty((m, n), F32, dev)
    ex["main"](_image_of(xv.reshape(heads, m, hd // 4, 4), dev), tvm.runtime.tensor(wv, dev), out)
    ref = np.transpose(xv, (1, 0, 2)).reshape(m, heads * hd) @ wv
    assert_matches([out.numpy()], [ref])


# -- the Relax side ----------------------------------------------------------------------------


def test_texture_allocations_follow_the_kernels_and_disagreement_is_refused():
    """After CallTIRRewrite the output a kernel declares in global.texture is allocated in
    it; a reader declaring a buffer for the same tensor is a compile error, not a device
    fault."""
    shape = (8, 16)

    def kernel(src_scope, dst_scope):
        x = te.placeholder(shape, F32, name="x")
        y = te.compute(shape, lambda i, j: x[i, j] + 1.0, name="y")
        f = te.create_prim_func([x, y])
        f = with_buffer_scope(f, 0, src_scope) if src_scope else f
        return with_buffer_scope(f, 1, dst_scope) if dst_scope else f

    def module(reader_scope):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType(shape, F32))
        with bb.function("main", [x]):
            with bb.dataflow():
                p = bb.add_func(kernel(None, "global.texture"), "produce")
                c = bb.add_func(kernel(reader_scope, None), "consume")
                t = bb.emit(relax.call_tir(p, [x], relax.TensorType(shape, F32)))
                out = bb.emit_output(relax.call_tir(c, [t], relax.TensorType(shape, F32)))
            bb.emit_func_output(out)
        seq = tvm.transform.Sequential(phase_passes(TEXTURE, ("dataflow_lower",))[:-1])
        return seq(bb.get())

    lowered = AllocateTextureTensors()(module("global.texture"))
    scopes = []
    relax.analysis.post_order_visit(
        lowered["main"], lambda e: scopes.append(str(e.args[3].value)) if isinstance(
            e, relax.Call) and isinstance(e.op, tvm.ir.Op)
        and e.op.name == "relax.builtin.alloc_tensor" else None)
    assert sorted(scopes) == ["global", "global.texture"]
    with pytest.raises(errors.TextureLoweringError, match=r"both global\.texture and global"):
        AllocateTextureTensors()(module(None))


def test_image_tensors_are_scoped_views_in_the_vm_code():
    """Each image tensor is allocated with its scope (the VM then asks the allocator for a
    view, which is an image); buffers keep the plain allocation."""
    mod, *_ = _mlp(16, 64, 128)
    ex = tvm.compile(mod, TEXTURE, relax_pipeline="smartmem")
    text = ex.as_text()
    calls = [line for line in text.splitlines() if "vm.builtin.alloc_tensor in:" in line]
    scoped = [line for line in calls if line.rstrip().endswith(tuple(
        f"c[{i}] dst:" for i in range(100))) or line.count(",") >= 4]
    assert len(scoped) == 2 and len(calls) > len(scoped)


# -- whole models ------------------------------------------------------------------------------

#: images / kept per built-in model: every intermediate but ViT's attention probabilities
#: (17 keys: no whole texels along the reduction) and LLaMA's Q/K/V projection (V is reduced
#: over the tokens, so the tokens would be the lanes, which its GEMM tile cannot write).  The
#: attention kernels read Q/K/V from images and write their output as texels; the CNNs'
#: convolutions write NCHW4c images through the GEMM rule, depthwise convolutions, poolings and
#: the classifier's GEMV through TextureFallback.
MODELS = {
    "bert_layer": (6, 0), "vit_block": (7, 1), "swin_block": (7, 0), "small_cnn": (5, 0),
    "convnext_block": (4, 0), "mobilevit_block": (5, 0), "llm_block": (8, 1),
}


def _rules(kernels: tvm.IRModule) -> list[str]:
    return sorted(str(f.attrs["smartmem.schedule_rule"]) for _, f in kernels.functions_items()
                  if isinstance(f, tirx.PrimFunc) and f.attrs
                  and "smartmem.schedule_rule" in f.attrs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_with_activations_in_images_match_onnxruntime(dev, name):
    """The texture build places the intermediates above, keeps every attention a
    FusedAttention kernel (images in and out) and matches ONNX Runtime on PoCL."""
    model = models.get(name)
    mod, params = frontend.from_onnx(model)
    kernels = smartmem_pipeline(TEXTURE, phases=UP_TO_KERNELS)(mod)
    record = texture_activations_of(kernels["main"])
    assert (len(record["images"]), len(record["kept"])) == MODELS[name], record
    buffers = smartmem_pipeline(targets.get("opencl"), phases=UP_TO_KERNELS)(mod)
    assert _rules(kernels).count("FusedAttention") == _rules(buffers).count("FusedAttention")
    inputs = models.random_inputs(model, seed=5)
    with check_image_bounds() as report:  # PoCL's values can be right with texels past an edge
        outs = _run(mod, list(inputs.values()), params, dev)
    assert not report.accesses, report.accesses[:4]
    assert_matches(outs, numerics.onnxruntime_reference(model, inputs))


# -- random graphs -----------------------------------------------------------------------------


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.sampled_from([1, 5, 16, 17]), d=st.sampled_from([8, 12, 16, 20]),
       hidden=st.sampled_from([6, 16, 24, 36]), act=st.sampled_from(["gelu", "relu"]))
def test_random_mlps_match_numpy_and_place_every_whole_texel_tensor(dev, m, d, hidden, act):
    """Every intermediate whose lane axis holds whole texels goes to an image (a one-row GEMM
    too, through TextureFallback); the others stay buffers and say why."""
    mod, args, params, refs = _mlp(m, d, hidden, act)
    record = _placement(mod)
    whole = {"hidden"} if hidden % 4 == 0 else set()
    whole |= {"summed"} if d % 4 == 0 else set()
    assert set(record["images"]) == whole, record
    for t in {"hidden", "summed"} - whole:
        assert "not a multiple of 4" in record["kept"][t]
    assert_matches(_run(mod, args, params, dev), refs)


def _attention_then_projection(b, h, sq, sk, d, dv):
    """softmax(q k^T / sqrt(d)) v, then a projection over dv: the attention output is an
    intermediate read by a GEMM reducing over its last axis."""
    q = relax.Var("q", relax.TensorType((b, h, sq, d), F32))
    k = relax.Var("k", relax.TensorType((b, h, sk, d), F32))
    v = relax.Var("v", relax.TensorType((b, h, sk, dv), F32))
    w = relax.Var("w", relax.TensorType((dv, 8), F32))
    bb = relax.BlockBuilder()
    with bb.function("main", [q, k, v, w], attrs={"num_input": 3}):
        with bb.dataflow():
            s = bb.emit(relax.op.multiply(relax.op.matmul(
                q, relax.op.permute_dims(k, [0, 1, 3, 2])), relax.const(0.9 / d ** 0.5, F32)))
            o = bb.emit(relax.op.matmul(relax.op.nn.softmax(s, axis=-1), v), name_hint="o")
            out = bb.emit_output(relax.op.matmul(o, w))
        bb.emit_func_output(out)
    rng = np.random.default_rng(b * 1000 + h * 100 + sq * 10 + sk + d + dv)
    qv, kv, vv = (rng.standard_normal(shape).astype(F32) for shape in
                  ((b, h, sq, d), (b, h, sk, d), (b, h, sk, dv)))
    wv = rng.standard_normal((dv, 8)).astype(F32)
    sv = qv.astype(np.float64) @ np.swapaxes(kv, -1, -2) * (0.9 / d ** 0.5)
    pv = np.exp(sv - sv.max(-1, keepdims=True))
    pv /= pv.sum(-1, keepdims=True)
    ref = (pv @ vv) @ wv
    return bb.get(), [qv, kv, vv], [wv], [ref.astype(F32)]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), h=st.integers(1, 3), sq=st.sampled_from([1, 7, 16, 33]),
       sk=st.sampled_from([5, 32, 40]), d=st.sampled_from([8, 16]),
       dv=st.sampled_from([8, 20, 36, 160]))
def test_fused_attentions_write_their_output_as_texels(dev, b, h, sq, sk, d, dv):
    """The attention output goes to an image packed along dv (a multiple of 4 here, up to
    40 texels: more texels than a warp's lanes, and fewer); the kernel stays one
    FusedAttention, touches no texel outside its images and matches float64 numpy."""
    mod, args, params, refs = _attention_then_projection(b, h, sq, sk, d, dv)
    kernels = smartmem_pipeline(TEXTURE, phases=UP_TO_KERNELS)(mod)
    record = texture_activations_of(kernels["main"])
    assert "o" in record["images"], record
    assert _rules(kernels).count("FusedAttention") == 1
    with check_image_bounds() as report:
        outs = _run(mod, args, params, dev)
    assert not report.accesses, report.accesses[:4]
    assert_matches(outs, refs)


def test_pack_param_rewrites_every_access_of_a_parameter():
    """``pack_param`` re-lays a parameter read in two blocks (softmax reads its input twice)
    and declares it in texture scope."""
    from tvm import topi

    func = pack_param(_prim(lambda x: topi.nn.softmax(x, axis=1), (4, 12)), 0, 1)
    assert is_texture(func.params[0]) and [int(d) for d in func.params[0].shape] == [4, 3, 4]
    loads: list = []
    import tvm_ffi

    tvm_ffi.structural_walk(func.body, (tvm.ir.TensorLoad, loads.append))
    assert all(len(ld.indices) == 3 for ld in loads if ld.source.same_as(func.params[0]))
    assert s_tir.Schedule(func)  # still a valid block-structured function

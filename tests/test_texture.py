"""Texture (image2d) memory on PoCL: lowering, schedule rules, weight packing, whole models.

Every kernel here runs on a real OpenCL device (PoCL, a CPU OpenCL with image support) and is
compared with numpy / ONNX Runtime -- generated source is only inspected in addition.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import assert_matches, run_vm
from tvm import te, tirx, topi
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight import gpu

from tvm_smartmem import errors, frontend, models, numerics, targets
from tvm_smartmem.analysis.stats import collect
from tvm_smartmem.pipeline import UP_TO_KERNELS, smartmem_pipeline
from tvm_smartmem.runtime import opencl
from tvm_smartmem.tir.schedules import TextureElementwise, TextureMatmul
from tvm_smartmem.tir.texture import (
    TEXTURE_SCOPES,
    LowerTextureAccess,
    image_extent,
)
from tvm_smartmem.transform.texture import (
    PackWeightsToTexture,
    pack_reason,
    texture_matmul_primfunc,
    texture_weights_of,
    with_buffer_scope,
)

TEXTURE = targets.get("opencl-texture")


@pytest.fixture(autouse=True)
def _textures_always(monkeypatch):
    """The shipped table keeps weights in buffers on desktop OpenCL (measured on the H100);
    these tests exercise the image path, so they ask for it."""
    monkeypatch.setenv("TVM_SMARTMEM_TEXTURE_WEIGHTS", "always")


def _build(func: tirx.PrimFunc, *rules):
    mod = tvm.IRModule({"main": func})
    with TEXTURE:
        mod = dl.ApplyDefaultSchedule(*rules)(mod) if rules else mod
    mod = LowerTextureAccess()(mod)
    return tvm.compile(mod, TEXTURE), mod


def _source(ex) -> str:
    return ex.mod.imports[0].inspect_source()


def _image(array: np.ndarray, dev, scope: str = "global.texture"):
    img = tvm.runtime.empty(array.shape, str(array.dtype), dev, mem_scope=scope)
    img.copyfrom(array)
    return img


def _copy_func(shape, dtype, src_scope, dst_scope, scale=2.0):
    x = te.placeholder(shape, dtype, name="x")
    y = te.compute(shape, lambda *i: x(*i) * tvm.tirx.const(scale, dtype), name="y")
    func = te.create_prim_func([x, y])
    if src_scope:
        func = with_buffer_scope(func, 0, src_scope)
    if dst_scope:
        func = with_buffer_scope(func, 1, dst_scope)
    return func


# -- lowering ------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", TEXTURE_SCOPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 700, 4), (5, 2, 3, 3, 4)])
def test_texture_write_then_read_round_trips_every_scope(dev, scope, shape):
    """buffer -> image (vectorised RGBA stores) -> buffer (texel reads): the values and the
    image extents the runtime allocated both follow the layout convention."""
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    write, _ = _build(_copy_func(shape, "float32", None, scope), TextureElementwise())
    read, _ = _build(_copy_func(shape, "float32", scope, None, scale=1.0), dl.gpu.Fallback())
    img = tvm.runtime.empty(shape, "float32", dev, mem_scope=scope)
    write["main"](tvm.runtime.tensor(x, dev), img)
    w, h, d = image_extent(list(shape), scope)
    assert opencl.image_info(img) == {"image": True, "width": w, "height": h, "depth": d}
    np.testing.assert_array_equal(img.numpy(), 2 * x)  # the runtime's own image -> host copy
    out = tvm.runtime.empty(shape, "float32", dev)
    read["main"](img, out)
    np.testing.assert_array_equal(out.numpy(), 2 * x)


def test_texture_store_is_one_rgba_write_per_texel(dev):
    """TVM's own flattening scalarises texture stores (four writes of one broadcast lane);
    ours types the store so the vectoriser emits one write_imagef of a float4."""
    shape = (4, 8, 4)
    func = _copy_func(shape, "float32", "global.texture", "global.texture")
    ex, _ = _build(func, TextureElementwise())
    src = _source(ex)
    assert src.count("write_imagef(") == 1 and "float4" in src
    x = np.random.default_rng(1).standard_normal(shape).astype("float32")
    out = tvm.runtime.empty(shape, "float32", dev, mem_scope="global.texture")
    ex["main"](_image(x, dev), out)
    np.testing.assert_array_equal(out.numpy(), 2 * x)


def test_fp16_textures_use_half_image_calls(dev):
    """float16 images read and write with read_imageh / write_imageh; run where the device
    has cl_khr_fp16 (PoCL has not: the generated source is checked there)."""
    shape = (4, 8, 4)
    ex, _ = _build(_copy_func(shape, "float16", "global.texture", "global.texture"),
                   TextureElementwise())
    src = _source(ex)
    assert "write_imageh(" in src and "READ_IMAGEH(" in src
    if opencl.describe()["devices"][0].get("fp16"):
        x = np.random.default_rng(2).standard_normal(shape).astype("float16")
        out = tvm.runtime.empty(shape, "float16", dev, mem_scope="global.texture")
        ex["main"](_image(x, dev), out)
        np.testing.assert_array_equal(out.numpy(), 2 * x)


def test_a_store_that_would_split_texels_is_refused():
    """Without the lane axis vectorised an image write cannot be expressed: a clear error."""
    func = _copy_func((4, 8, 4), "float32", None, "global.texture")
    with pytest.raises(errors.TextureLoweringError, match="vectorised loop over its 4 lanes"):
        _build(func, dl.gpu.Fallback())


@pytest.mark.parametrize("shape, match", [((4, 6), "4 RGBA lanes"), ((3, 4, 2), "4 RGBA lanes")])
def test_texture_buffers_need_four_lanes(shape, match):
    func = _copy_func(shape, "float32", "global.texture", None)
    with pytest.raises(errors.TextureLoweringError, match=match):
        _build(func, dl.gpu.Fallback())


def test_dynamic_texture_shapes_are_refused():
    n = tvm.tirx.Var("n", "int64")
    func = _copy_func((n, 4), "float32", "global.texture", None)
    with pytest.raises(errors.TextureLoweringError, match="dynamic shape"):
        _build(func, dl.gpu.Fallback())


# -- GEMM on texture-packed weights --------------------------------------------------------


def _packed(w: np.ndarray) -> np.ndarray:
    k, n = w.shape
    return np.ascontiguousarray(w.T.reshape(n, k // 4, 4))


@pytest.mark.parametrize("m, k, n", [(128, 256, 192), (7, 20, 12), (1, 64, 40)])
def test_texture_matmul_rule_reads_whole_texels(dev, m, k, n):
    """TextureMatmul fetches the packed weight as float4 texels and matches numpy, odd sizes
    included."""
    func = texture_matmul_primfunc([m, k], n, "float32")
    ex, _ = _build(func, TextureMatmul(), dl.gpu.Fallback())
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((m, k)).astype("float32"), rng.standard_normal((k, n)).astype(
        "float32")
    y = tvm.runtime.empty((m, n), "float32", dev)
    ex["main"](tvm.runtime.tensor(x, dev), _image(_packed(w), dev), y)
    assert_matches([y.numpy()], [x @ w])
    if m >= 4:
        assert "float4 v_ = as_float4(READ_IMAGEF(" in _source(ex)


def test_two_wide_fetches_of_a_texture_are_unrolled_not_miscompiled(dev):
    """A GEMM schedule fetching 2 lanes at a time would split texels: LowerTextureAccess turns
    that loop into scalar texel reads, which stay correct."""
    config = gpu.Matmul.Config(block_size_x=8, block_size_y=16, vthread_x=1, vthread_y=1,
                               micro_size_x=4, micro_size_y=4, micro_size_k=16,
                               vector_size=2, unroll=256, use_shared=True, storage_align=True,
                               inner_x=False)
    from tvm_smartmem.tir.matmul import TunedMatmul

    m, k, n = 64, 64, 64
    ex, _ = _build(texture_matmul_primfunc([m, k], n, "float32"), TunedMatmul(config))
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((m, k)).astype("float32"), rng.standard_normal((k, n)).astype(
        "float32")
    y = tvm.runtime.empty((m, n), "float32", dev)
    ex["main"](tvm.runtime.tensor(x, dev), _image(_packed(w), dev), y)
    assert_matches([y.numpy()], [x @ w])


# -- PackWeightsToTexture ------------------------------------------------------------------


def test_pack_reasons():
    assert pack_reason(768, 3072, "float32", 16384) is None
    assert "multiple of 4" in pack_reason(18, 8, "float32", 16384)
    assert "exceeds the texture limit" in pack_reason(768, 32000, "float32", 16384)
    assert "no RGBA image format" in pack_reason(8, 8, "int8", 16384)


@pytest.mark.parametrize("name, packed", [("bert_layer", 4), ("vit_block", 4),
                                          ("small_cnn", 1), ("swin_block", 4)])
def test_models_through_the_texture_pipeline_match_onnxruntime(dev, name, packed):
    """Matmul weights packed into images at load time, GEMMs reading them: same outputs."""
    model = models.get(name)
    mod, params = frontend.from_onnx(model)
    kernels = smartmem_pipeline(TEXTURE, phases=UP_TO_KERNELS)(mod)
    record = texture_weights_of(kernels["main"])
    assert record["packed"] == packed and record["kept"] == {}
    # the kernels of the buffer build, but for the normalisations that store their prologue
    # too (texture targets keep one output per normalisation kernel)
    assert collect(kernels).kernels == collect(
        smartmem_pipeline(targets.get("opencl"), phases=UP_TO_KERNELS,
                          disable=("RowReductionWithSideOutputs",))(mod)).kernels
    ex = tvm.compile(mod, TEXTURE, relax_pipeline="smartmem")
    inputs = models.random_inputs(model, seed=5)
    outs = run_vm(ex, list(inputs.values()), dev=dev, params=params)
    assert_matches(outs, numerics.onnxruntime_reference(model, inputs))


def test_weights_that_do_not_fit_stay_in_buffers_with_a_reason(dev):
    """A target whose images are at most 32 texels wide keeps the larger weights in buffers
    (and says why); the model still matches."""
    small = targets.get("opencl-texture", spatial_limit=32)
    model = models.get("bert_layer")
    mod, params = frontend.from_onnx(model)
    with small:
        packed = PackWeightsToTexture(small)(mod)
    record = texture_weights_of(packed["main"])
    assert record["kept"] and all("exceeds the texture limit 32" in r
                                  for r in record["kept"].values())
    ex = tvm.compile(mod, small, relax_pipeline="smartmem")
    inputs = models.random_inputs(model, seed=6)
    outs = run_vm(ex, list(inputs.values()), dev=dev, params=params)
    assert_matches(outs, numerics.onnxruntime_reference(model, inputs))


def test_matmul_with_reduction_not_a_multiple_of_four_stays_a_buffer_matmul(dev):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, 18), "float32"))
    w = relax.Var("w", relax.TensorType((18, 8), "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(out)
    mod = bb.get()
    record = texture_weights_of(PackWeightsToTexture(TEXTURE)(mod)["main"])
    assert record["packed"] == 0 and "multiple of 4" in record["kept"]["w"]
    ex = tvm.compile(mod, TEXTURE, relax_pipeline="smartmem")
    rng = np.random.default_rng(7)
    xv, wv = rng.standard_normal((3, 18)).astype("float32"), rng.standard_normal((18, 8)).astype(
        "float32")
    assert_matches(run_vm(ex, [xv], dev=dev, params=[wv]), [xv @ wv])


def test_topi_dense_kernel_still_schedules_without_textures(dev):
    """Kernels without texture buffers go to the buffer rules untouched on texture targets."""
    a = te.placeholder((16, 32), name="a")
    b = te.placeholder((32, 8), name="b")
    ex, mod = _build(te.create_prim_func([a, b, topi.matmul(a, b)]), TextureMatmul(),
                     dl.gpu.Matmul())
    assert "smartmem.texture_buffers" not in (mod["main"].attrs or {})
    x, y = np.random.rand(16, 32).astype("float32"), np.random.rand(32, 8).astype("float32")
    out = tvm.runtime.empty((16, 8), "float32", dev)
    ex["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(y, dev), out)
    assert_matches([out.numpy()], [x @ y])


def test_the_measured_policy_keeps_buffers_where_textures_lost(monkeypatch):
    """On the shipped table (texture GEMMs 0.77x of buffer GEMMs on the H100) the measured
    policy keeps every weight in a buffer and says why; a bad policy name is refused."""
    monkeypatch.setenv("TVM_SMARTMEM_TEXTURE_WEIGHTS", "measured")
    mod, _ = frontend.from_onnx(models.get("bert_layer"))
    record = texture_weights_of(PackWeightsToTexture(TEXTURE)(mod)["main"])
    # the six projections of the layer as imported (q, k, v, out, two FFN)
    assert record["packed"] == 0 and len(record["kept"]) == 6
    assert all("measured slower than buffer GEMMs" in r for r in record["kept"].values())
    monkeypatch.setenv("TVM_SMARTMEM_TEXTURE_WEIGHTS", "sometimes")
    with pytest.raises(ValueError, match="expected one of"):
        PackWeightsToTexture(TEXTURE)(mod)

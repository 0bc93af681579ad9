"""Statistics on hand-built graphs whose answers are known by construction."""

from __future__ import annotations

import pytest
import tvm
from conftest import LLVM
from tvm import relax, te, topi

from tvm_smartmem import frontend, models
from tvm_smartmem.analysis.stats import collect, is_data_movement_primfunc
from tvm_smartmem.pipeline import UP_TO_KERNELS, baseline

F32 = "float32"


def _tensor(shape, dtype=F32):
    return relax.TensorType(shape, dtype)


def _module(build) -> tvm.IRModule:
    """A one-function module; ``build(bb, *params)`` returns the output expression."""
    bb = relax.BlockBuilder()
    params = build.params
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _graph(params):
    def deco(fn):
        fn.params = params
        return fn

    return deco


# -- high level ------------------------------------------------------------------------------


def test_histogram_and_layout_ops_of_a_high_level_graph():
    @_graph([relax.Var("x", _tensor((2, 8, 16))), relax.Var("w", _tensor((2, 4, 4, 8)))])
    def g(bb, x, w):
        t = bb.emit(relax.op.reshape(x, (2, 8, 4, 4)))
        t = bb.emit(relax.op.permute_dims(t, [0, 2, 1, 3]))  # [2, 4, 8, 4]
        t = bb.emit(relax.op.matmul(t, w))  # [2, 4, 8, 8]
        t = bb.emit(relax.op.add(t, t))
        return relax.op.nn.softmax(t)

    s = collect(_module(g))
    assert s.stage == "high-level"
    assert s.op_histogram == {
        "relax.add": 1, "relax.matmul": 1, "relax.nn.softmax": 1, "relax.permute_dims": 1,
        "relax.reshape": 1,
    }
    assert s.layout_ops == {"relax.permute_dims": 1, "relax.reshape": 1}
    assert (s.kernels, s.data_movement_kernels, s.zero_copy_views) == (0, 0, 0)


# -- PrimFunc classification -----------------------------------------------------------------


def _prim(fcompute, *shapes, dtype=F32):
    ins = [te.placeholder(s, dtype, name=f"A{i}") for i, s in enumerate(shapes)]
    out = fcompute(*ins)
    return te.create_prim_func([*ins, out])


DATA_MOVEMENT = {
    "copy": lambda: _prim(lambda a: te.compute(a.shape, lambda i, j: a[i, j]), (4, 8)),
    "transpose": lambda: _prim(lambda a: topi.transpose(a, [1, 0]), (4, 8)),
    "reshape": lambda: _prim(lambda a: topi.reshape(a, (2, 16)), (4, 8)),
    "cast": lambda: _prim(lambda a: topi.cast(a, "float16"), (4, 8)),
    "pad (select of load and constant)": lambda: _prim(
        lambda a: topi.nn.pad(a, [1, 1], [1, 1]), (4, 8)
    ),
    "concat (select of loads)": lambda: _prim(
        lambda a, b: topi.concatenate([a, b], axis=0), (4, 8), (2, 8)
    ),
    "strided slice": lambda: _prim(lambda a: topi.strided_slice(a, [1, 0], [3, 8]), (4, 8)),
    "gather (take)": lambda: _take(),
}


def _take():
    a = te.placeholder((4, 8), F32, name="a")
    idx = te.placeholder((3,), "int64", name="idx")
    return te.create_prim_func([a, idx, topi.take(a, idx, axis=0)])

COMPUTE = {
    "add": lambda: _prim(lambda a, b: topi.add(a, b), (4, 8), (4, 8)),
    "relu": lambda: _prim(lambda a: topi.nn.relu(a), (4, 8)),
    "scale": lambda: _prim(lambda a: topi.multiply(a, 2.0), (4, 8)),
    "fill (no load)": lambda: _prim(lambda a: te.compute((4, 8), lambda i, j: 0.0), (4, 8)),
    "sum (reduction)": lambda: _prim(lambda a: topi.sum(a, axis=1), (4, 8)),
    "matmul": lambda: _prim(lambda a, b: topi.matmul(a, b), (4, 8), (8, 4)),
}


@pytest.mark.parametrize("name", list(DATA_MOVEMENT))
def test_data_movement_primfuncs(name):
    assert is_data_movement_primfunc(DATA_MOVEMENT[name]())


@pytest.mark.parametrize("name", list(COMPUTE))
def test_compute_primfuncs(name):
    assert not is_data_movement_primfunc(COMPUTE[name]())


def test_gpu_scheduled_transpose_is_still_data_movement():
    """After dlight's fallback schedule (threads, staging) a transpose still only moves data."""
    from tvm.s_tir import dlight as dl

    mod = tvm.IRModule({"main": DATA_MOVEMENT["transpose"]()})
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    assert is_data_movement_primfunc(mod["main"])


# -- call sites, bytes and stages ------------------------------------------------------------


def test_bytes_moved_by_a_transpose_kernel():
    @_graph([relax.Var("x", _tensor((4, 8)))])
    def g(bb, x):
        return bb.emit_te(topi.transpose, x, [1, 0])

    s = collect(_module(g))
    assert s.stage == "legalized"
    assert (s.kernels, s.data_movement_kernels) == (1, 1)
    assert s.data_movement_bytes == 4 * 8 * 4 * 2  # read 128 B, write 128 B


def test_symbolic_shapes_are_counted_as_unsized():
    n = tvm.tirx.Var("n", "int64")

    @_graph([relax.Var("x", _tensor((n, 8)))])
    def g(bb, x):
        return bb.emit_te(topi.transpose, x, [1, 0])

    s = collect(_module(g))
    assert (s.data_movement_kernels, s.data_movement_bytes, s.unsized_data_movement) == (1, 0, 1)


def test_library_calls_count_as_kernels():
    @_graph([relax.Var("x", _tensor((4, 8)))])
    def g(bb, x):
        return relax.call_dps_packed("my_vendor_gemm", (x,), _tensor((4, 8)))

    s = collect(_module(g))
    assert (s.kernels, s.data_movement_kernels) == (1, 0)
    assert s.kernel_table[0].kind == "library"


def _matmul_reshape_transpose():
    @_graph([relax.Var("x", _tensor((8, 16))), relax.Var("w", _tensor((16, 16)))])
    def g(bb, x, w):
        t = bb.emit(relax.op.matmul(x, w))
        t = bb.emit(relax.op.reshape(t, (8, 4, 4)))
        return relax.op.permute_dims(t, [1, 0, 2])

    return _module(g)


def test_stages_agree_on_a_matmul_then_head_split():
    """TVM fuses neither the reshape nor the transpose into the matmul: 2 kernels, 1 moves data
    (8*16 floats read and written = 1024 bytes)."""
    mod = _matmul_reshape_transpose()
    legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern()]
    fused = tvm.transform.Sequential([*legalize, relax.transform.FuseOps()])(mod)
    fused_tir = relax.transform.FuseTIR()(fused)
    lowered = baseline(LLVM)(mod)
    expect = (2, 1, 1024)
    for stage, m in (("fused", fused), ("legalized", fused_tir), ("lowered", lowered)):
        s = collect(m)
        assert s.stage == stage
        assert (s.kernels, s.data_movement_kernels, s.data_movement_bytes) == expect, stage


def test_flatten_between_pool_and_gemm_is_a_view_after_lowering():
    """mean -> reshape -> matmul: the reshape stands alone, RewriteDataflowReshape makes it a
    `vm.builtin.reshape` view; before that it is one fused data-movement kernel."""

    @_graph([relax.Var("x", _tensor((1, 16, 4, 4))), relax.Var("w", _tensor((16, 10)))])
    def g(bb, x, w):
        t = bb.emit(relax.op.mean(x, axis=[2, 3], keepdims=True))
        t = bb.emit(relax.op.reshape(t, (1, 16)))
        return relax.op.matmul(t, w)

    mod = _module(g)
    up_to_kernels = collect(baseline(LLVM, phases=UP_TO_KERNELS)(mod))
    assert (up_to_kernels.kernels, up_to_kernels.data_movement_kernels) == (3, 1)
    lowered = collect(baseline(LLVM)(mod))
    assert (lowered.kernels, lowered.data_movement_kernels, lowered.zero_copy_views) == (2, 0, 1)


# -- built-in models: the counts the CLI reports ---------------------------------------------


def test_bert_layer_counts():
    """15 kernels: Q/K/V projections (3), head split for Q, K^T, V (3, data movement), QK^T with
    scale+mask, softmax, PV, head merge (data movement), out-projection+residual, layernorm,
    FFN1+GELU, FFN2+residual, layernorm.  Each data-movement launch reads and writes 32x64 fp32
    (8 KiB each way)."""
    mod, _ = frontend.from_onnx(models.bert_layer())
    s = collect(baseline(LLVM)(mod))
    assert (s.kernels, s.data_movement_kernels, s.zero_copy_views) == (15, 4, 0)
    assert s.data_movement_bytes == 4 * 2 * 32 * 64 * 4


def test_swin_block_counts():
    """19 kernels, 7 of them data movement: roll + window partition (one fused kernel), the
    relative-position bias gather and its reshape/transpose (2), head split for Q, V (2 launches
    of one kernel) and K^T (1), head merge (1).  Window reverse + reverse roll fuse into the
    residual add, so they do not count."""
    mod, _ = frontend.from_onnx(models.swin_block())
    s = collect(baseline(LLVM)(mod))
    assert (s.kernels, s.data_movement_kernels) == (19, 7)
    dm = {k.name: k.launches for k in s.kernel_table if k.data_movement}
    assert sum(dm.values()) == 7
    assert any("concatenate" in n and "transpose" in n for n in dm)  # roll + partition
    assert any(n.startswith("take") for n in dm)  # bias gather

"""RowReductionWithSideOutputs: a normalisation kernel that also stores the row it normalises
(pre-LN residual streams), planned by FusePlan, scheduled one row per thread block, run on PoCL
and compared with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from conftest import LLVM, assert_matches, run_vm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tvm import relax

from tvm_smartmem import targets
from tvm_smartmem.pipeline import SMARTMEM_PASSES, UP_TO_KERNELS, smartmem_pipeline
from tvm_smartmem.report import compile_with
from tvm_smartmem.tir.norm_matmul import ENV as NORM_ENV
from tvm_smartmem.tir.row_reduction import RowReductionWithSideOutputs, _row_threads
from tvm_smartmem.transform import split_k

OPENCL = targets.get("opencl")
RULE = "RowReductionWithSideOutputs"


def _pre_ln(m=40, k=512, n=256, norm="layer_norm", lead=(1,)):
    """GPT-2's residual step: ``x' = x + (h @ W + b)``, ``y = norm(x')``, then the next
    sublayer ``y @ W2 + x'`` reads the residual stream again."""
    bb = relax.BlockBuilder()
    h = relax.Var("h", relax.TensorType((*lead, m, k), "float32"))
    x = relax.Var("x", relax.TensorType((*lead, m, n), "float32"))
    w = relax.Var("w", relax.TensorType((k, n), "float32"))
    b = relax.Var("b", relax.TensorType((n,), "float32"))
    w2 = relax.Var("w2", relax.TensorType((n, n), "float32"))
    gamma = relax.const(np.linspace(0.5, 1.5, n).astype("float32"))
    with bb.function("main", [h, x, w, b, w2]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(x, relax.op.add(relax.op.matmul(h, w), b)))
            if norm == "layer_norm":
                z = bb.emit(relax.op.nn.layer_norm(
                    y, gamma, relax.const(np.full(n, 0.1, "float32")), axes=[-1]))
            elif norm == "rms_norm":
                z = bb.emit(relax.op.nn.rms_norm(y, gamma, axes=[-1]))
            elif norm == "rms_decomposed":  # as LLaMA's ONNX export spells it
                ms = relax.op.mean(relax.op.multiply(y, y), axis=[-1], keepdims=True)
                z = bb.emit(relax.op.multiply(relax.op.multiply(
                    y, relax.op.rsqrt(relax.op.add(ms, relax.const(1e-5, "float32")))), gamma))
            else:
                z = bb.emit(relax.op.nn.softmax(y, axis=-1))
            out = bb.emit_output(bb.emit(relax.op.add(relax.op.matmul(z, w2), y)))
        bb.emit_func_output(out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("num_input", 2)
    return mod


def _reference(h, x, w, b, w2, norm):
    h, x, w, w2 = (a.astype("float64") for a in (h, x, w, w2))
    n = w.shape[1]
    y = x + h @ w + b
    gamma = np.linspace(0.5, 1.5, n).astype("float32")
    if norm == "layer_norm":
        mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
        z = (y - mu) / np.sqrt(var + 1e-5) * gamma + 0.1
    elif norm in ("rms_norm", "rms_decomposed"):
        z = y / np.sqrt((y * y).mean(-1, keepdims=True) + 1e-5) * gamma
    else:
        e = np.exp(y - y.max(-1, keepdims=True))
        z = e / e.sum(-1, keepdims=True)
    return (z @ w2 + y).astype("float32")


def _data(m, k, n, lead=(1,), seed=0):
    rng = np.random.default_rng(seed)
    return ([rng.standard_normal((*lead, m, k)).astype("float32"),
             rng.standard_normal((*lead, m, n)).astype("float32")],
            [(rng.standard_normal((k, n)) / math.sqrt(k)).astype("float32"),
             rng.standard_normal(n).astype("float32"),
             (rng.standard_normal((n, n)) / math.sqrt(n)).astype("float32")])


def _kernels(mod, target, disable=()) -> int:
    from tvm_smartmem.analysis.stats import collect

    with target:
        return collect(smartmem_pipeline(target, disable=disable)(mod)).kernels


def _rules(mod, target, disable=()) -> dict[str, str]:
    with target:
        lowered = smartmem_pipeline(target, phases=UP_TO_KERNELS, disable=disable)(mod)
    return {gv.name_hint: str(f.attrs["smartmem.schedule_rule"])
            for gv, f in lowered.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
            and "smartmem.schedule_rule" in f.attrs}


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm", "rms_decomposed", "softmax"])
def test_split_pre_ln_sum_and_norm_are_one_kernel_on_opencl(dev, monkeypatch, norm):
    """Split 4 ways: GEMM, partial sum + bias + residual + norm (storing the residual stream),
    GEMM, partial sum + residual -- four kernels where the side output being illegal left five
    (the sum a kernel of its own, then the norm); values match numpy on PoCL."""
    monkeypatch.setenv(split_k.ENV, "4")
    mod = _pre_ln(norm=norm)
    ex, stats, _ = compile_with(mod, OPENCL, "smartmem")
    assert (stats.kernels, _kernels(mod, OPENCL, disable=(RULE,))) == (4, 5)
    assert sorted(_rules(mod, OPENCL).values()).count(RULE) == 1
    assert RULE not in _rules(mod, OPENCL, disable=(RULE,)).values()
    inputs, params = _data(40, 512, 256)
    assert_matches(run_vm(ex, inputs, dev, params), [_reference(*inputs, *params, norm)])


def test_unsplit_pre_ln_keeps_the_residual_in_the_gemm_epilogue(monkeypatch):
    """Without the split the residual add joins its GEMM (producers first) and the norm reads
    the stored sum: the side output is not needed and not made (3 kernels either way)."""
    monkeypatch.setenv(split_k.ENV, "off")
    mod = _pre_ln()
    assert compile_with(mod, OPENCL, "smartmem")[1].kernels == 3
    assert RULE not in _rules(mod, OPENCL).values()


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 50), n=st.integers(1, 700), lead=st.sampled_from([(1,), (3,)]),
       norm=st.sampled_from(["layer_norm", "rms_norm", "rms_decomposed", "softmax"]))
def test_random_rows_match_numpy(dev, monkeypatch, m, n, lead, norm):
    """Odd row lengths (not a multiple of the threads, shorter than a warp, longer than a
    block), several leading axes: every element of both outputs lands where it should."""
    monkeypatch.setenv(split_k.ENV, "2")
    k = 256
    mod = _pre_ln(m, k, n, norm, lead)
    ex = tvm.compile(mod, OPENCL, relax_pipeline=smartmem_pipeline(OPENCL))
    inputs, params = _data(m, k, n, lead, seed=m * 1000 + n)
    assert_matches(run_vm(ex, inputs, dev, params), [_reference(*inputs, *params, norm)])


def test_the_cpu_build_matches_numpy(monkeypatch):
    """The planner makes the same two-output kernel for the CPU (unscheduled there)."""
    monkeypatch.setenv(split_k.ENV, "4")
    mod = _pre_ln()
    ex = tvm.compile(mod, LLVM, relax_pipeline=smartmem_pipeline(LLVM))
    inputs, params = _data(40, 512, 256)
    assert_matches(run_vm(ex, inputs, None, params), [_reference(*inputs, *params, "layer_norm")])


def test_cuda_schedules_the_kernel_with_the_rule(monkeypatch):
    """The 256-wide layernorm stays a row reduction here: CUDA's default glue (``short``)
    would compute it inside the GEMM after it instead (``test_norm_matmul.py``)."""
    monkeypatch.setenv(split_k.ENV, "4")
    monkeypatch.setenv(NORM_ENV, "off")
    assert list(_rules(_pre_ln(), targets.get("cuda")).values()).count(RULE) == 1


def test_texture_targets_keep_one_output_per_normalisation(monkeypatch):
    """The texture rules write one image per kernel: no side outputs are planned there."""
    monkeypatch.setenv(split_k.ENV, "4")
    assert RULE not in _rules(_pre_ln(), targets.get("opencl-texture")).values()


def _side_output_kernel(transposed: bool):
    """``side = 2a`` stored row-major or transposed, ``out = side / rowsum(side)``."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def row_major(a: T.Buffer((8, 64), "float32"), side: T.Buffer((8, 64), "float32"),
                  out: T.Buffer((8, 64), "float32")):
        total = T.sblock_alloc_buffer((8,))
        for i, j in T.grid(8, 64):
            with T.sblock("side"):
                vi, vj = T.axis.remap("SS", [i, j])
                side[vi, vj] = a[vi, vj] * T.float32(2.0)
        for i, j in T.grid(8, 64):
            with T.sblock("total"):
                vi, vj = T.axis.remap("SR", [i, j])
                with T.init():
                    total[vi] = T.float32(0.0)
                total[vi] = total[vi] + side[vi, vj]
        for i, j in T.grid(8, 64):
            with T.sblock("out"):
                vi, vj = T.axis.remap("SS", [i, j])
                out[vi, vj] = side[vi, vj] / total[vi]

    if not transposed:
        return row_major
    # the same kernel with ``side`` stored as its transpose: every access goes through the map
    sch = tvm.s_tir.Schedule(row_major)
    sch.transform_layout("side", ("write", 0), lambda i, j: (j, i))
    return sch.mod["main"]


def test_the_rule_takes_row_major_side_outputs_and_declines_the_rest():
    """A side output stored in the row's own layout is scheduled on GPU targets; one stored
    transposed (a copy per row would not be one row of it), or any kernel on a CPU target,
    is left to the rules after it."""
    rule = RowReductionWithSideOutputs()
    cuda = targets.get("cuda")
    assert rule.apply(_side_output_kernel(False), cuda, False) is not None
    assert rule.apply(_side_output_kernel(True), cuda, False) is None
    assert rule.apply(_side_output_kernel(False), LLVM, False) is None


def test_threads_cover_the_row_between_a_warp_and_the_widest_block():
    assert [_row_threads(r, 1024, 256) for r in (1, 32, 33, 384, 768, 5000)] == \
        [32, 32, 64, 256, 256, 256]
    assert _row_threads(5000, 128, 256) == 128


def test_the_ablation_names_the_rule():
    assert RULE in SMARTMEM_PASSES


def test_at_most_two_side_outputs_per_normalisation_and_values_kept():
    """Three prologue tensors read elsewhere: no kernel stores more than the normalisation's
    result and two of them (``MAX_SIDE_OUTPUTS``), and the CPU build still matches numpy."""
    from tvm_smartmem.transform.fuse import MAX_SIDE_OUTPUTS

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.add(x, relax.const(1.0, "float32")))
            b = bb.emit(relax.op.multiply(a, relax.const(2.0, "float32")))
            c = bb.emit(relax.op.add(b, relax.const(3.0, "float32")))
            z = bb.emit(relax.op.nn.softmax(c, axis=-1))
            out = bb.emit_output(relax.Tuple([z, a, b, c]))
        bb.emit_func_output(out)
    mod = bb.get()
    widths = _output_widths(mod, targets.get("cuda"))
    assert max(widths) == 1 + MAX_SIDE_OUTPUTS  # the limit is reached, not exceeded
    xs = np.random.default_rng(3).standard_normal((4, 64)).astype("float32")
    ex = tvm.compile(mod, LLVM, relax_pipeline=smartmem_pipeline(LLVM))
    a_, c_ = xs + 1, (xs + 1) * 2 + 3
    e = np.exp(c_ - c_.max(-1, keepdims=True))
    assert_matches(run_vm(ex, [xs]), [e / e.sum(-1, keepdims=True), a_, a_ * 2, c_])


def _output_widths(mod, target) -> list[int]:
    with target:
        lowered = smartmem_pipeline(target, phases=UP_TO_KERNELS)(mod)
    widths = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and \
                e.op.name == "relax.call_tir":
            widths.append(len(e.ty.fields) if isinstance(e.ty, relax.TupleType) else 1)

    relax.analysis.post_order_visit(lowered["main"].body, visit)
    return widths


def test_a_reduction_that_shrinks_its_rows_never_stores_its_prologue():
    """An SE block's squeeze: ``s = x * sigmoid(x)`` and the channel means of ``s``, both read
    later.  Storing ``s`` from the squeeze's kernel would be legal for the rule but is not a
    normalisation's residual stream: in a network the swish belongs in its producer's epilogue
    (EfficientNet's depthwise convolutions lost it to the squeeze, one more pass over ``s``),
    so no kernel here has two outputs."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 32, 7, 7), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            s = bb.emit(relax.op.multiply(x, relax.op.sigmoid(x)))
            m = bb.emit(relax.op.mean(s, axis=[2, 3], keepdims=True))
            out = bb.emit_output(relax.Tuple([m, s]))
        bb.emit_func_output(out)
    assert max(_output_widths(bb.get(), targets.get("cuda"))) == 1


def test_rows_too_long_for_shared_memory_are_not_planned_with_side_outputs(monkeypatch):
    """A pre-LN block whose rows (16384 floats) would not fit the rule's shared-memory cache:
    the sum stays a kernel of its own on GPU targets rather than falling to ``Fallback``."""
    monkeypatch.setenv(split_k.ENV, "4")
    mod = _pre_ln(m=8, k=512, n=16384)
    assert max(_output_widths(mod, OPENCL)) == 1
    assert max(_output_widths(_pre_ln(m=8, k=512, n=1024), OPENCL)) == 2


@pytest.mark.parametrize("target_name", ["cuda", "opencl"])
def test_a_grid_of_rows_caches_one_row_in_shared_memory(monkeypatch, target_name):
    """Swin-T's second stage: rows on a 28 x 28 token grid, 192 wide.  The row loop fuses the
    grid; the copy of the cached row must index it through that loop, else the region
    analysis loses the row and the cache grows to the whole tensor (623,696 bytes before the
    fix: ``ptxas error: uses too much shared data`` on the H100, CUDA and OpenCL).  Now one
    row (768 bytes), the statistics and, on OpenCL (no warp shuffles), the reduction's
    buffers of 256 lanes: a few KB."""
    from tvm_smartmem.analysis.shared_memory import device_sources, shared_bytes

    monkeypatch.setenv(split_k.ENV, "4")
    target = targets.get(target_name)
    mod = _pre_ln(28, 512, 192, "layer_norm", (1, 28))
    with target:
        ex = tvm.compile(mod, target, relax_pipeline=smartmem_pipeline(target))
    assert RULE in _rules(mod, target).values()
    sizes = shared_bytes(device_sources(ex))
    norm = [b for k, b in sizes.items() if "add" in k and "matmul" not in k]
    assert norm and max(norm) <= 192 * 4 + 2 * 256 * 4 + 256
    assert max(sizes.values()) <= int(target.attrs["max_shared_memory_per_block"])


def test_a_grid_of_rows_matches_numpy(dev, monkeypatch):
    monkeypatch.setenv(split_k.ENV, "4")
    mod = _pre_ln(9, 512, 96, "layer_norm", (1, 7))
    ex = tvm.compile(mod, OPENCL, relax_pipeline=smartmem_pipeline(OPENCL))
    inputs, params = _data(9, 512, 96, (1, 7), seed=11)
    assert_matches(run_vm(ex, inputs, dev, params),
                   [_reference(*inputs, *params, "layer_norm")])

"""CombineParallelMatmuls + LiftWeightTransforms: sibling projections by weights become one GEMM
whose concatenated weight is built once at load time; numerics (fp32, scale-normalised error
<= 1e-4 against numpy / ONNX Runtime) and exact counts on hand-built graphs, random groups by
hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import LLVM, assert_matches, run_vm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tvm import relax

from tvm_smartmem import frontend, models, numerics
from tvm_smartmem.analysis.stats import collect
from tvm_smartmem.errors import ShapeMismatchError
from tvm_smartmem.measure import LocalRunner
from tvm_smartmem.pipeline import UP_TO_KERNELS, smartmem_pipeline
from tvm_smartmem.transform.combine_parallel_matmul import (
    CombineParallelMatmuls,
    combined_of,
    find_groups,
)
from tvm_smartmem.transform.lift_weight_transforms import LIFTED_ATTR, LiftWeightTransforms

F32 = "float32"


def _function(inputs: dict, weights: dict, body, num_input: bool = True) -> tvm.IRModule:
    """``main(inputs..., weights...)``; with ``num_input`` the weights are marked as such."""
    bb = relax.BlockBuilder()
    vs = {n: relax.Var(n, relax.TensorType(s, F32)) for n, s in {**inputs, **weights}.items()}
    attrs = {"num_input": len(inputs)} if num_input else {}
    with bb.function("main", list(vs.values()), attrs=attrs):
        with bb.dataflow():
            out = body(vs, bb.emit)
            out = bb.emit_output(relax.Tuple(out) if isinstance(out, list) else out)
        bb.emit_func_output(out)
    return bb.get()


def _ops(func: relax.Function) -> list[str]:
    return [b.value.op.name.removeprefix("relax.") for blk in func.body.blocks
            for b in blk.bindings
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]


def _run(mod: tvm.IRModule, inputs: list, weights: list) -> list[np.ndarray]:
    return run_vm(tvm.compile(mod, LLVM), inputs, params=weights)


def _qkv(v, e):
    """BERT's projections: q scaled after its bias, k and v plain, all reading x."""
    x = v["x"]
    q = e(relax.op.multiply(e(relax.op.add(e(relax.op.matmul(x, v["wq"])), v["bq"])),
                            relax.const(0.125, F32)))
    k = e(relax.op.add(e(relax.op.matmul(x, v["wk"])), v["bk"]))
    vv = e(relax.op.add(e(relax.op.matmul(x, v["wv"])), v["bv"]))
    return [e(relax.op.matmul(q, e(relax.op.permute_dims(k, [0, 2, 1])))), vv]


QKV_IN = {"x": (2, 8, 16)}
QKV_W = {"wq": (16, 12), "bq": (12,), "wk": (16, 12), "bk": (12,), "wv": (16, 20), "bv": (20,)}


def _arrays(shapes: dict, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, s).astype(F32) for s in shapes.values()]


def _qkv_reference(x, wq, bq, wk, bk, wv, bv):
    q = (x @ wq + bq) * 0.125
    return [q @ (x @ wk + bk).transpose(0, 2, 1), x @ wv + bv]


def test_qkv_become_one_gemm_with_the_scale_in_the_weight():
    mod = _function(QKV_IN, QKV_W, _qkv)
    combined = CombineParallelMatmuls()(mod)
    ops = _ops(combined["main"])
    # one GEMM by weights + the scores GEMM; the scale went into the (lifted) weights
    assert ops.count("matmul") == 2 and ops.count("strided_slice") == 3
    assert combined_of(combined["main"]) == 2
    lifted = LiftWeightTransforms()(combined)
    main_ops = _ops(lifted["main"])
    assert "concat" not in main_ops and main_ops.count("multiply") == 0, main_ops
    assert main_ops.count("add") == 1  # one bias add: the concatenated biases
    assert int(lifted["main"].attrs[LIFTED_ATTR]) >= 4  # 2 concats, 2 scaled operands
    data = _arrays({**QKV_IN, **QKV_W}, seed=1)
    assert_matches(_run(lifted, data[:1], data[1:]), _qkv_reference(*data))


def test_runtime_inputs_never_combine():
    """Without ``num_input`` the 'weights' are inputs: concatenating them would be a copy per
    inference, so nothing changes."""
    mod = _function(QKV_IN, QKV_W, _qkv, num_input=False)
    assert find_groups(mod["main"]) == []
    assert _ops(CombineParallelMatmuls()(mod)["main"]).count("matmul") == 4


def test_different_inputs_or_reductions_stay_apart():
    def body(v, e):
        a = e(relax.op.matmul(v["x"], v["w1"]))  # x, K=16
        b = e(relax.op.matmul(v["y"], v["w2"]))  # another input
        c = e(relax.op.matmul(v["x2"], v["w3"]))  # K=8
        return [a, b, c]

    mod = _function({"x": (4, 16), "y": (4, 16), "x2": (4, 8)},
                    {"w1": (16, 6), "w2": (16, 6), "w3": (8, 6)}, body)
    assert find_groups(mod["main"]) == []


def test_outputs_and_shared_intermediates_keep_their_values():
    """A branch whose matmul is itself a function output, one whose biased value has two readers
    (its scale then stays outside), one without bias next to ones with bias (zeros fill in)."""
    def body(v, e):
        x = v["x"]
        a = e(relax.op.matmul(x, v["w1"]))  # returned as is
        b = e(relax.op.add(e(relax.op.matmul(x, v["w2"])), v["b2"]))
        b2 = e(relax.op.multiply(b, relax.const(3.0, F32)))
        c = e(relax.op.add(e(relax.op.matmul(x, v["w3"])), v["b3"]))
        return [a, e(relax.op.add(b, b2)), c]

    shapes_in, shapes_w = {"x": (3, 5, 16)}, {"w1": (16, 4), "w2": (16, 7), "b2": (7,),
                                               "w3": (16, 9), "b3": (1, 9)}
    mod = _function(shapes_in, shapes_w, body)
    out = LiftWeightTransforms()(CombineParallelMatmuls()(mod))
    assert _ops(out["main"]).count("matmul") == 1
    x, w1, w2, b2, w3, b3 = _arrays({**shapes_in, **shapes_w}, seed=2)
    b = x @ w2 + b2
    assert_matches(_run(out, [x], [w1, w2, b2, w3, b3]), [x @ w1, b + 3 * b, x @ w3 + b3])


def test_bert_layer_loses_two_kernels_and_matches_onnxruntime():
    model = models.bert_layer()
    mod, params = frontend.from_onnx(model)
    with LLVM:
        on = collect(smartmem_pipeline(LLVM, phases=UP_TO_KERNELS)(mod))
        off = collect(smartmem_pipeline(LLVM, phases=UP_TO_KERNELS,
                                        disable=("CombineParallelMatmuls",))(mod))
    assert on.kernels == off.kernels - 2
    assert on.load_time_kernels > 0 and on.data_movement_kernels == 0
    ex = tvm.compile(mod, LLVM, relax_pipeline=smartmem_pipeline(LLVM))
    inputs = models.random_inputs(model, seed=3)
    assert_matches(run_vm(ex, list(inputs.values()), params=params),
                   numerics.onnxruntime_reference(model, inputs))


def test_wrong_number_of_weights_is_a_clear_error():
    model = models.bert_layer()
    mod, params = frontend.from_onnx(model)
    ex = tvm.compile(mod, LLVM, relax_pipeline=smartmem_pipeline(LLVM))
    inputs = list(models.random_inputs(model).values())
    with pytest.raises(ShapeMismatchError, match=f"takes {len(params)} weights, got "
                       f"{len(params) - 1}"):
        LocalRunner("cpu").outputs(ex, inputs, params[:-1])


def test_transposed_weights_are_transposed_once_at_load_time():
    """ONNX Gemm(transB=1) weights: the transpose leaves the inference path."""
    def body(v, e):
        return e(relax.op.matmul(v["x"], e(relax.op.permute_dims(v["w"], [1, 0]))))

    mod = _function({"x": (4, 16)}, {"w": (6, 16)}, body)
    lifted = LiftWeightTransforms()(mod)
    assert _ops(lifted["main"]) == ["matmul"]
    assert _ops(lifted["main_transform_params"]) == ["permute_dims"]
    x, w = _arrays({"x": (4, 16), "w": (6, 16)}, seed=4)
    assert_matches(_run(lifted, [x], [w]), [x @ w.T])


@st.composite
def groups(draw):
    """2-4 branches on one input: random widths, bias (1-D, broadcast 3-D or none), scale,
    extra readers of the intermediate values, and weights transposed or not."""
    n = draw(st.integers(2, 4))
    return [dict(width=draw(st.integers(1, 9)), bias=draw(st.sampled_from([None, "1d", "3d"])),
                 scale=draw(st.sampled_from([None, 0.5, -2.0])),
                 extra=draw(st.booleans()), transposed=draw(st.booleans())) for _ in range(n)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups())
def test_random_groups_keep_their_values(branches):
    k = 8
    shapes_w: dict = {}
    for i, br in enumerate(branches):
        shapes_w[f"w{i}"] = (br["width"], k) if br["transposed"] else (k, br["width"])
        if br["bias"]:
            shapes_w[f"b{i}"] = (br["width"],) if br["bias"] == "1d" else (1, 1, br["width"])

    def body(v, e):
        outs = []
        for i, br in enumerate(branches):
            w = v[f"w{i}"]
            w = e(relax.op.permute_dims(w, [1, 0])) if br["transposed"] else w
            y = e(relax.op.matmul(v["x"], w))
            if br["bias"]:
                y = e(relax.op.add(y, v[f"b{i}"]))
            if br["extra"]:
                outs.append(e(relax.op.exp(y)))
            if br["scale"] is not None:
                y = e(relax.op.multiply(y, relax.const(br["scale"], F32)))
            outs.append(y)
        return outs

    def reference(x, *ws):
        ws = dict(zip(shapes_w, ws, strict=True))
        outs = []
        for i, br in enumerate(branches):
            w = ws[f"w{i}"].T if br["transposed"] else ws[f"w{i}"]
            y = x @ w + (ws[f"b{i}"] if br["bias"] else 0)
            if br["extra"]:
                outs.append(np.exp(y))
            outs.append(y * br["scale"] if br["scale"] is not None else y)
        return outs

    shapes_in = {"x": (2, 3, k)}
    mod = _function(shapes_in, shapes_w, body)
    out = LiftWeightTransforms()(CombineParallelMatmuls()(mod))
    assert _ops(out["main"]).count("matmul") == 1
    data = _arrays({**shapes_in, **shapes_w}, seed=5)
    assert_matches(_run(out, data[:1], data[1:]), reference(*data))

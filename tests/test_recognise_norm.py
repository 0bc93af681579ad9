"""RecogniseNormalization: decomposed instance / group norms become one layer_norm."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import LLVM, assert_matches, run_vm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tvm import relax

from tvm_smartmem import frontend, numerics
from tvm_smartmem.analysis.stats import collect
from tvm_smartmem.pipeline import smartmem_pipeline
from tvm_smartmem.transform.recognise_norm import NORMS_ATTR, RecogniseNormalization


def _decomposed(shape, axes, eps=1e-6, other=False, keepdims=True, eps_input=False):
    """main(x[, e]) = (x - mean(x)) / sqrt(variance(y) + eps) as TVM's ONNX importer writes
    InstanceNormalization; ``other`` takes the variance of another tensor (not a norm)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    y = relax.Var("y", relax.TensorType(shape, "float32"))
    e = relax.Var("e", relax.TensorType((), "float32"))
    params = [x] + ([y] if other else []) + ([e] if eps_input else [])
    with bb.function("main", params):
        with bb.dataflow():
            m = bb.emit(relax.op.mean(x, axes, keepdims=keepdims))
            d = bb.emit(relax.op.subtract(x, m))
            v = bb.emit(relax.op.variance(y if other else x, axes, keepdims=keepdims))
            s = bb.emit(relax.op.sqrt(relax.op.add(v, e if eps_input else
                                                   relax.const(eps, "float32"))))
            out = bb.emit_output(relax.op.divide(d, s))
        bb.emit_func_output(out)
    return bb.get()


def _ops(mod) -> list[str]:
    return [b.value.op.name for b in mod["main"].body.blocks[0].bindings
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]


def _reference(x, axes, eps):
    m = x.mean(axis=tuple(axes), keepdims=True)
    v = x.var(axis=tuple(axes), keepdims=True)
    return (x - m) / np.sqrt(v + eps)


def test_instance_norm_becomes_one_layer_norm_kernel():
    mod = _decomposed((1, 32, 40), [2])
    out = RecogniseNormalization()(mod)
    assert _ops(out) == ["relax.nn.layer_norm"] and int(out["main"].attrs[NORMS_ATTR]) == 1
    assert collect(smartmem_pipeline(LLVM)(mod)).kernels == 1
    x = np.random.default_rng(0).standard_normal((1, 32, 40)).astype("float32") * 3 + 5
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    assert_matches(run_vm(ex, [x]), [_reference(x, [2], 1e-6)])


@pytest.mark.parametrize("kwargs", [{"other": True}, {"keepdims": False}, {"eps_input": True}])
def test_lookalikes_are_left_alone(kwargs):
    """The variance of another tensor, statistics without keepdims (the division would not
    broadcast like a norm), a runtime epsilon: not a normalisation we rewrite."""
    if kwargs.get("keepdims") is False:
        with pytest.raises(Exception):  # noqa: B017 -- the graph itself does not type-check
            _decomposed((2, 6, 8), [2], **kwargs)
        return
    mod = _decomposed((2, 6, 8), [2], **kwargs)
    assert "relax.nn.layer_norm" not in _ops(RecogniseNormalization()(mod))


def _group_norm_onnx(n=1, c=64, h=6, w=6, groups=8):
    """GroupNorm + SiLU as diffusion exporters write it: Reshape to groups,
    InstanceNormalization, Reshape back, per-channel Mul / Add, Sigmoid * x."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(np.array([n, groups, -1], "int64"), "grouped"),
        numpy_helper.from_array(np.array([n, c, h, w], "int64"), "back"),
        numpy_helper.from_array(np.ones(groups, "float32"), "ones"),
        numpy_helper.from_array(np.zeros(groups, "float32"), "zeros"),
        numpy_helper.from_array(rng.standard_normal((c, 1, 1)).astype("float32"), "gamma"),
        numpy_helper.from_array(rng.standard_normal((c, 1, 1)).astype("float32"), "beta"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "grouped"], ["g"]),
        helper.make_node("InstanceNormalization", ["g", "ones", "zeros"], ["gn"],
                         epsilon=1e-6),
        helper.make_node("Reshape", ["gn", "back"], ["b"]),
        helper.make_node("Mul", ["b", "gamma"], ["s"]),
        helper.make_node("Add", ["s", "beta"], ["a"]),
        helper.make_node("Sigmoid", ["a"], ["sg"]),
        helper.make_node("Mul", ["a", "sg"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "group_norm_silu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, c, h, w])], inits)
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_group_norm_as_exported_matches_onnxruntime_in_fewer_kernels():
    """The diffusion models' GroupNorm: three kernels (mean, variance, normalise) become one
    layer_norm and the affine + SiLU after it; outputs still match ONNX Runtime."""
    model = _group_norm_onnx()
    mod, params = frontend.from_onnx(model)
    without = collect(smartmem_pipeline(LLVM, disable=("RecogniseNormalization",))(mod))
    ours = collect(smartmem_pipeline(LLVM)(mod))
    assert ours.kernels == without.kernels - 1
    x = np.random.default_rng(3).standard_normal((1, 64, 6, 6)).astype("float32") * 4 + 2
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    assert_matches(run_vm(ex, [x], params=params),
                   numerics.onnxruntime_reference(model, {"x": x}))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(2, 6), min_size=2, max_size=4), st.data(),
       st.sampled_from([1e-5, 1e-6, 1e-3]))
def test_random_normalisations_match_numpy(shape, data, eps):
    """Any set of reduced axes, any epsilon: rewritten into layer_norm with numpy's values."""
    axes = sorted(data.draw(st.sets(st.integers(0, len(shape) - 1), min_size=1)))
    mod = _decomposed(tuple(shape), axes, eps)
    assert "relax.nn.layer_norm" in _ops(RecogniseNormalization()(mod))
    x = np.random.default_rng(1).standard_normal(shape).astype("float32") * 2 - 1
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    ok, err = numerics.compare(run_vm(ex, [x]), [_reference(x, axes, eps)])
    assert ok, err

"""The ONNX frontend: numerics against ONNX Runtime, params handling, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import tvm
from conftest import LLVM, assert_matches, run_vm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from tvm_smartmem import errors, frontend, models, numerics
from tvm_smartmem.pipeline import baseline


def _compile(mod):
    return tvm.compile(mod, LLVM, relax_pipeline=baseline(LLVM))


@pytest.mark.parametrize("name", sorted(models.BUILTIN))
def test_builtin_models_match_onnxruntime(name):
    model = models.get(name)
    mod, params = frontend.from_onnx(model)
    inputs = models.random_inputs(model, seed=1)
    ref = numerics.onnxruntime_reference(model, inputs)
    outs = run_vm(_compile(mod), list(inputs.values()), params=params)
    assert_matches(outs, ref)


def _float_weights(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [i for i in model.graph.initializer
            if i.data_type == TensorProto.FLOAT and int(np.prod(i.dims)) > 1]


@pytest.mark.parametrize("name", sorted(models.BUILTIN))
def test_params_are_the_float_weights_in_argument_order(name):
    model = models.get(name)
    mod, params = frontend.from_onnx(model)
    weights = _float_weights(model)
    assert len(params) == len(weights)
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    assert len(main.params) == num_input + len(params)
    for var, arr, init in zip(main.params[num_input:], params, weights, strict=True):
        assert [int(d) for d in var.ty.shape.values] == list(arr.shape)
        np.testing.assert_array_equal(arr, numpy_helper.to_array(init))
    # no int64 tensor (shape, index) is a parameter
    assert all(p.dtype == np.float32 for p in params)
    # weights stay out of the module: no large constant is bound inside main
    consts = []
    relax.analysis.post_order_visit(
        main.body, lambda e: consts.append(e) if isinstance(e, tvm.ir.GenericConst) else None
    )
    assert all(np.asarray(c.value.numpy()).size <= 4096 for c in consts)


def test_swin_shape_arithmetic_fails_in_stock_importer_but_not_here():
    """The exporters' runtime shape arithmetic (Shape -> Gather -> Div -> Concat -> Reshape)."""
    from tvm.relax.frontend.onnx import from_onnx as stock

    model = models.swin_block()
    with warnings.catch_warnings(), pytest.raises(Exception, match="Reshape"):
        warnings.simplefilter("ignore")
        stock(model, keep_params_in_input=True)
    _, params = frontend.from_onnx(model)
    assert len(params) == len(_float_weights(model))


def test_keep_params_false_binds_weights_and_matches():
    model = models.bert_layer()
    mod, params = frontend.from_onnx(model, keep_params_in_input=False)
    assert params == []
    inputs = models.random_inputs(model)
    assert_matches(run_vm(_compile(mod), list(inputs.values())),
                   numerics.onnxruntime_reference(model, inputs))


def test_symbolic_batch_from_file_runs_several_batch_sizes():
    model = models.bert_layer(batch="batch")
    mod, params = frontend.from_onnx(model)
    sig = frontend.input_signature(mod)
    assert sig == [{"name": "x", "shape": ["batch", 32, 64], "dtype": "float32"}]
    ex = _compile(mod)
    for batch in (1, 3):
        inputs = models.random_inputs(model, seed=batch, dims={"batch": batch})
        ref = numerics.onnxruntime_reference(model, inputs)
        assert ref[0].shape[0] == batch
        assert_matches(run_vm(ex, list(inputs.values()), params=params), ref)


def test_shape_dict_makes_a_static_dim_symbolic_and_validates():
    model = models.bert_layer()
    mod, _ = frontend.from_onnx(model, shape_dict={"x": ["b", 32, 64]})
    assert frontend.input_signature(mod)[0]["shape"] == ["b", 32, 64]
    with pytest.raises(errors.ShapeMismatchError, match="rank 3"):
        frontend.from_onnx(model, shape_dict={"x": [1, 32]})
    with pytest.raises(errors.ShapeMismatchError, match="not a model input"):
        frontend.from_onnx(model, shape_dict={"y": [1, 32, 64]})
    with pytest.raises(errors.ShapeMismatchError, match="declared"):
        frontend.from_onnx(model, shape_dict={"x": [1, 16, 64]})


def test_input_check_names_the_problem():
    sig = [{"name": "x", "shape": ["b", 4], "dtype": "float32"},
           {"name": "y", "shape": ["b", 2], "dtype": "float32"}]
    frontend.check_inputs(sig, [np.zeros((3, 4), "float32"), np.zeros((3, 2), "float32")])
    with pytest.raises(errors.ShapeMismatchError, match="'y' must have shape"):
        frontend.check_inputs(sig, [np.zeros((3, 4), "float32"), np.zeros((2, 2), "float32")])
    with pytest.raises(errors.ShapeMismatchError, match="must be float32"):
        frontend.check_inputs(sig, [np.zeros((3, 4), "int64"), np.zeros((3, 2), "float32")])
    with pytest.raises(errors.ShapeMismatchError, match="takes 2 input"):
        frontend.check_inputs(sig, [np.zeros((3, 4), "float32")])


# -- bad input ------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(errors.ModelLoadError, match="not found"):
        frontend.from_onnx(tmp_path / "nope.onnx")


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"\x00\x01 this is not protobuf \xff" * 10)
    with pytest.raises(errors.ModelLoadError, match="not a valid ONNX"):
        frontend.from_onnx(path)


def test_malformed_graph():
    node = helper.make_node("Relu", ["undefined_tensor"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(errors.ModelLoadError, match="malformed ONNX"):
        frontend.from_onnx(model)


def _single_node_model(op_type: str, domain: str = "") -> onnx.ModelProto:
    node = helper.make_node(op_type, ["x"], ["y"], domain=domain)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    opsets = [helper.make_opsetid("", 17)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    return helper.make_model(graph, opset_imports=opsets)


def test_unsupported_operator_is_named():
    # a custom-domain op: valid ONNX (the checker cannot know it), unknown to every importer
    model = _single_node_model("FancyAttention", domain="com.example")
    with pytest.raises(errors.UnsupportedOperatorError, match=r"com\.example\.FancyAttention"):
        frontend.from_onnx(model)


def test_unsupported_standard_operator_is_named():
    # a standard ONNX op that TVM 0.27's importer does not convert
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    assert "STFT" not in _get_convert_map()
    node = helper.make_node("STFT", ["x", "step"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "f", "k", 2])],
        initializer=[numpy_helper.from_array(np.array(8, np.int64), "step")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(errors.UnsupportedOperatorError, match="STFT"):
        frontend.from_onnx(model)


def test_empty_graph():
    graph = helper.make_graph([], "g", [], [])
    with pytest.raises(errors.ModelLoadError, match="empty graph"):
        frontend.from_onnx(helper.make_model(graph))


def test_errors_are_one_line():
    try:
        frontend.from_onnx(_single_node_model("FancyAttention", domain="com.example"))
    except errors.SmartMemError as err:
        assert "\n" not in str(err)


def test_resize_scales_are_constants_not_weights():
    """A float initializer a Resize reads as its scales decides the output shape: it must stay a
    constant, while a float tensor used as data is a weight."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], "float32"), "scales"),
             numpy_helper.from_array(np.ones((1, 3, 4, 4), "float32"), "bias")]
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="nearest"),
             helper.make_node("Add", ["r", "bias"], ["y"])]
    graph = helper.make_graph(
        nodes, "up", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert frontend.weight_names(model.graph) == {"bias"}
    mod, params = frontend.from_onnx(model)
    assert len(params) == 1 and params[0].shape == (1, 3, 4, 4)
    x = np.random.default_rng(0).standard_normal((1, 3, 2, 2)).astype("float32")
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    assert_matches(run_vm(ex, [x], params=params),
                   numerics.onnxruntime_reference(model, {"x": x}))

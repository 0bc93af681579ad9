"""SelectLayouts: weights stored in the layout chosen per target (reduction dimension
contiguous = NK, or as imported = KN), the choice read from the measured table, numerics kept
(fp32 against ONNX Runtime / numpy), copies of weights with other readers reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from conftest import LLVM, assert_matches, run_vm
from tvm import relax

from tvm_smartmem import frontend, models, numerics, targets
from tvm_smartmem.analysis.stats import collect
from tvm_smartmem.pipeline import UP_TO_KERNELS, smartmem_pipeline
from tvm_smartmem.transform.lift_weight_transforms import (
    WEIGHT_BYTES_ATTR,
    LiftWeightTransforms,
)
from tvm_smartmem.transform.select_layout import (
    SelectLayouts,
    layout_selection_of,
    weight_layout,
)

F32 = "float32"


@pytest.fixture
def nk_table(tmp_path, monkeypatch):
    """A measured table that says NK for every buffer target kind."""
    path = tmp_path / "configs.json"
    path.write_text(json.dumps({k: {"weight_layout": "NK"} for k in ("llvm", "cuda", "opencl")}))
    monkeypatch.setenv("TVM_SMARTMEM_MATMUL_CONFIGS", str(path))
    return path


def test_the_choice_per_target(tmp_path, monkeypatch):
    assert weight_layout(targets.get("opencl-texture")) == "NK"  # RGBA lanes along k
    monkeypatch.setenv("TVM_SMARTMEM_MATMUL_CONFIGS", str(tmp_path / "none.json"))
    assert weight_layout(targets.get("cuda")) == "KN"  # never measured: as imported
    (tmp_path / "odd.json").write_text(json.dumps({"cuda": {"weight_layout": "KNX"}}))
    monkeypatch.setenv("TVM_SMARTMEM_MATMUL_CONFIGS", str(tmp_path / "odd.json"))
    assert weight_layout(targets.get("cuda")) == "KN"
    with pytest.raises(ValueError, match="unknown weight layout 'XY'"):
        SelectLayouts(layout="XY")(frontend.from_onnx(models.bert_layer())[0])


def test_measured_table_says_kn_for_the_h100_buffers():
    """The committed table: dlight's GEMM schedule is faster with B[k, n] on both buffer
    targets (benchmarks/results/weight_layout_h100.md)."""
    assert weight_layout(targets.get("cuda")) == "KN"
    assert weight_layout(targets.get("opencl")) == "KN"


def test_nk_weights_keep_counts_and_numerics(nk_table):
    model = models.bert_layer()
    mod, params = frontend.from_onnx(model)
    with LLVM:
        ours = smartmem_pipeline(LLVM, phases=UP_TO_KERNELS)(mod)
    # 4 weight GEMMs re-laid (q/k/v combined, output projection, two FFN layers)
    assert layout_selection_of(ours["main"]) == {"layout": "NK", "relaid": 4, "kept": 0,
                                                 "copy_bytes": 0}
    stats = collect(ours)
    assert (stats.kernels, stats.data_movement_kernels) == (9, 0)  # transposes folded
    # main takes the weights stored [n, k]: the combined q/k/v weight is (3 * 64, 64)
    shapes = [tuple(int(d) for d in p.ty.shape.values) for p in ours["main"].params[1:]]
    assert (192, 64) in shapes and (256, 64) in shapes
    ex = tvm.compile(mod, LLVM, relax_pipeline=smartmem_pipeline(LLVM))
    inputs = models.random_inputs(model, seed=7)
    assert_matches(run_vm(ex, list(inputs.values()), params=params),
                   numerics.onnxruntime_reference(model, inputs))


def _tied():
    """An embedding gathered by token ids and reused, transposed, as the output projection
    (GPT-2's tied weights), plus a plain projection."""
    bb = relax.BlockBuilder()
    ids = relax.Var("ids", relax.TensorType((5,), "int64"))
    emb = relax.Var("emb", relax.TensorType((11, 8), F32))
    w = relax.Var("w", relax.TensorType((8, 8), F32))
    with bb.function("main", [ids, emb, w], attrs={"num_input": 1}):
        with bb.dataflow():
            h = bb.emit(relax.op.matmul(bb.emit(relax.op.take(emb, ids, axis=0)), w))
            out = bb.emit_output(relax.op.matmul(h, bb.emit(relax.op.permute_dims(emb))))
        bb.emit_func_output(out)
    return bb.get()


def test_a_weight_with_other_readers_gets_a_reported_copy():
    mod = _tied()
    selected = SelectLayouts(layout="NK")(mod)
    record = layout_selection_of(selected["main"])
    # permute_dims(emb) is a weight of its own (the LM head's B), re-laid; emb itself is still
    # gathered, so after lifting main holds it twice (once per layout) -- the memory grows
    assert record["relaid"] == 2 and record["copy_bytes"] == 0
    lifted = LiftWeightTransforms()(selected)
    sizes = lifted["main"].attrs[WEIGHT_BYTES_ATTR]
    assert int(sizes["after"]) - int(sizes["before"]) == 11 * 8 * 4
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 11, (5,)).astype("int64")
    emb, w = (rng.uniform(-1, 1, s).astype(F32) for s in [(11, 8), (8, 8)])
    assert_matches(run_vm(tvm.compile(lifted, LLVM), [ids], params=[emb, w]),
                   [(emb[ids] @ w) @ emb.T])


def test_a_shared_weight_read_elsewhere_is_a_copy():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8, 8), F32))
    w = relax.Var("w", relax.TensorType((8, 8), F32))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, w))
            out = bb.emit_output(relax.op.add(y, w))  # w read as it is too
        bb.emit_func_output(out)
    selected = SelectLayouts(layout="NK")(bb.get())
    assert layout_selection_of(selected["main"])["copy_bytes"] == 8 * 8 * 4
    xs, ws = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8)).astype(F32)
    lifted = LiftWeightTransforms()(selected)
    assert_matches(run_vm(tvm.compile(lifted, LLVM), [xs], params=[ws]), [xs @ ws + ws])


def test_functions_without_weights_are_left_alone():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), F32))
    w = relax.Var("w", relax.TensorType((8, 8), F32))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(out)
    mod = bb.get()
    assert SelectLayouts(layout="NK")(mod)["main"].same_as(mod["main"])

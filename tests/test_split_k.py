"""SplitKMatmul: GEMMs with too few output tiles are split along the reduction, exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tvm
from conftest import assert_matches, run_vm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tvm import relax

from tvm_smartmem import targets
from tvm_smartmem.pipeline import SMARTMEM_PASSES, smartmem_pipeline
from tvm_smartmem.tir import matmul
from tvm_smartmem.tir.matmul import load_table
from tvm_smartmem.transform import split_k
from tvm_smartmem.transform.split_k import SplitKMatmul, SplitPolicy, policy_for

OPENCL = targets.get("opencl")


def _linear(m=64, k=256, n=96, lead=(1,), epilogue="gelu"):
    """``epilogue(x @ w + b)`` with the weights as parameters (as the frontend makes them)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((*lead, m, k), "float32"))
    w = relax.Var("w", relax.TensorType((k, n), "float32"))
    b = relax.Var("b", relax.TensorType((n,), "float32"))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(relax.op.matmul(x, w), b))
            if epilogue == "gelu":
                y = bb.emit(relax.op.nn.gelu(y))
            elif epilogue == "residual_layernorm":  # BERT's post-LN block (n == k)
                y = bb.emit(relax.op.nn.layer_norm(
                    relax.op.add(y, x), relax.const(np.ones(n, "float32")),
                    relax.const(np.zeros(n, "float32")), axes=[-1]))
            elif epilogue == "layernorm":
                y = bb.emit(relax.op.nn.layer_norm(
                    relax.op.add(y, relax.op.mean(x, axis=[-1], keepdims=True)),
                    relax.const(np.ones(n, "float32")), relax.const(np.zeros(n, "float32")),
                    axes=[-1]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("num_input", 1)
    return mod


def _reference(x, w, b, epilogue):
    y = x.astype("float64") @ w.astype("float64") + b
    if epilogue == "gelu":
        return 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))
    if epilogue == "residual_layernorm":
        y = y + x
        mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
        return (y - mu) / np.sqrt(var + 1e-5)
    if epilogue == "layernorm":
        y = y + x.mean(axis=-1, keepdims=True)
        mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
        return (y - mu) / np.sqrt(var + 1e-5)
    return y


def _data(m, k, n, lead=(1,), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((*lead, m, k)).astype("float32"),
            (rng.standard_normal((k, n)) / math.sqrt(k)).astype("float32"),
            rng.standard_normal(n).astype("float32"))


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A knob table with a split policy (the shipped one may have none for a target)."""
    def write(min_blocks=132, min_chunk=128):
        shipped = load_table()
        own = {key: dict(entry) for key, entry in shipped.items()}
        own["opencl"]["split_k"] = {"min_blocks": min_blocks, "min_chunk": min_chunk}
        path = tmp_path / "table.json"
        path.write_text(json.dumps(own))
        monkeypatch.setenv(matmul.ENV, str(path))
        monkeypatch.delenv(split_k.ENV, raising=False)
        load_table.cache_clear()
        return path

    yield write
    monkeypatch.delenv(matmul.ENV, raising=False)
    load_table.cache_clear()


# -- the policy (pure) -------------------------------------------------------------------------


def test_the_factor_is_the_smallest_that_fills_the_gpu():
    p = SplitPolicy(tile=(32, 64), step=16, min_blocks=132, min_chunk=128)
    assert p.factor(128, 768, 3072) == 4      # 48 blocks -> 96 (x2) -> 192 (x4)
    assert p.factor(128, 3072, 768) == 1      # 192 blocks already
    assert p.factor(197, 384, 1536) == 4      # 7 x 6 = 42 -> 168; chunks of 384
    assert p.factor(197, 384, 384) == 2       # chunks of 192; x4 would give 96 < 128
    assert p.factor(3136, 288, 96) == 1       # plenty of rows
    assert p.factor(128, 768, 1000) == 1      # 1000 is no multiple of 2 x 16
    assert p.factor(1, 1000, 2048) == 1       # a GEMV (ResNet's classifier, LLM decode)


def test_a_forced_factor_applies_where_it_divides():
    p = SplitPolicy(tile=(32, 64), step=16, min_blocks=0, min_chunk=0, force=8)
    assert p.factor(4096, 4096, 1024) == 8
    assert p.factor(64, 64, 96) == 1          # 96 is no multiple of 8 x 16


def test_no_policy_without_a_measurement(monkeypatch):
    """The shipped table decides; a target without a config (llvm, Adreno) never splits."""
    monkeypatch.delenv(split_k.ENV, raising=False)
    assert policy_for(targets.get("llvm")) is None
    assert policy_for(targets.get("adreno")) is None
    monkeypatch.setenv(split_k.ENV, "off")
    assert policy_for(OPENCL) is None
    monkeypatch.setenv(split_k.ENV, "lots")
    with pytest.raises(ValueError, match="TVM_SMARTMEM_SPLIT_K='lots'"):
        policy_for(OPENCL)


# -- the rewrite ---------------------------------------------------------------------------------


def _matmuls(mod) -> list[list[str]]:
    found = []  # the callback must not raise (tvm-ffi): shapes as text

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) \
                and e.op.name == "relax.matmul":
            found.append([str(getattr(d, "value", d)) for d in e.ty.shape])

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return found


def test_the_rewrite_records_what_it_split(table):
    table(min_blocks=132, min_chunk=128)
    mod = SplitKMatmul(OPENCL)(_linear(m=128, k=3072, n=768))
    assert [list(map(int, r)) for r in mod.attrs["smartmem.split_k"]] == [[128, 768, 3072, 4]]
    assert _matmuls(mod) == [["4", "128", "768"]]
    whole = SplitKMatmul(OPENCL)(_linear(m=128, k=768, n=3072))  # 192 blocks: left alone
    assert _matmuls(whole) == [["1", "128", "3072"]]
    assert whole.attrs is None or "smartmem.split_k" not in whole.attrs


def test_batched_and_dynamic_products_are_left_alone(table, monkeypatch):
    monkeypatch.setenv(split_k.ENV, "4")
    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")
    a = relax.Var("a", relax.TensorType((12, 64, 256), "float32"))
    b = relax.Var("b", relax.TensorType((12, 256, 64), "float32"))
    x = relax.Var("x", relax.TensorType((n, 256), "float32"))
    w = relax.Var("w", relax.TensorType((256, 64), "float32"))
    with bb.function("main", [a, b, x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.Tuple([bb.emit(relax.op.matmul(a, b)),
                                              bb.emit(relax.op.matmul(x, w))]))
        bb.emit_func_output(out)
    before = bb.get()
    assert _matmuls(SplitKMatmul(OPENCL)(before)) == _matmuls(before)


@pytest.mark.parametrize("epilogue,lead,factor,n,extra", [("gelu", (1,), 4, 96, 1),
                                                          ("none", (2,), 2, 96, 1),
                                                          ("gelu", (1,), 4, 72, 1),
                                                          ("layernorm", (1,), 8, 72, 0),
                                                          ("residual_layernorm", (1,), 4, 0, 0)])
def test_split_gemms_match_numpy_on_opencl(monkeypatch, epilogue, lead, factor, n, extra):
    """Forced factors on PoCL, no kernel that only moves data: the sum of the partial products
    is a kernel with the element-wise epilogue, or none where it becomes the prologue of
    a normalisation that reads it (with the bias and the residual: BERT's post-LN block is
    two kernels split as whole, the GEMM with its residual epilogue then the layernorm, or the
    batched product then partial sum + bias + residual + layernorm).  (On CUDA the element-wise
    sum joins the GEMM: ``FuseSplitKReduction``, tested in its own file.)"""
    from tvm_smartmem.report import compile_with
    from tvm_smartmem.runtime import opencl

    dev = opencl.require_device()
    m, k = 40, 512
    if epilogue == "residual_layernorm":
        n = k
    mod = _linear(m, k, n, lead, epilogue)
    monkeypatch.setenv(split_k.ENV, "off")
    _, whole, _ = compile_with(mod, OPENCL, "smartmem")
    monkeypatch.setenv(split_k.ENV, str(factor))
    ex, stats, _ = compile_with(mod, OPENCL, "smartmem")
    assert stats.kernels == whole.kernels + extra
    assert stats.data_movement_kernels == 0
    lowered = smartmem_pipeline(OPENCL)(mod)
    assert [list(map(int, r)) for r in lowered.attrs["smartmem.split_k"]] == [
        [m * math.prod(lead), n, k, factor]]
    x, w, b = _data(m, k, n, lead)
    out = run_vm(ex, [x], dev, [w, b])
    assert_matches(out, [_reference(x, w, b, epilogue).astype("float32")])


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 70), chunks=st.integers(1, 6), n=st.integers(1, 80),
       factor=st.sampled_from([2, 4, 8]))
def test_random_split_gemms_match_numpy(monkeypatch, m, chunks, n, factor):
    from tvm_smartmem.runtime import opencl

    dev = opencl.require_device()
    k = 16 * factor * chunks
    monkeypatch.setenv(split_k.ENV, str(factor))
    mod = _linear(m, k, n, (1,), "none")
    ex = tvm.compile(mod, OPENCL, relax_pipeline=smartmem_pipeline(OPENCL))
    x, w, b = _data(m, k, n)
    assert_matches(run_vm(ex, [x], dev, [w, b]), [_reference(x, w, b, "none").astype("float32")])


def test_the_pipeline_splits_from_the_table_and_the_ablation_can_switch_it_off(table):
    table(min_blocks=132, min_chunk=128)
    mod = _linear(m=128, k=3072, n=768, epilogue="none")
    assert "SplitKMatmul" in SMARTMEM_PASSES
    assert smartmem_pipeline(OPENCL)(mod).attrs["smartmem.split_k"]
    off = smartmem_pipeline(OPENCL, disable=("SplitKMatmul",))(mod)
    assert off.attrs is None or "smartmem.split_k" not in off.attrs


def test_the_report_counts_the_split_gemms(monkeypatch):
    from tvm_smartmem.report import compile_with_facts

    mod = _linear(40, 512, 72, (1,), "gelu")
    monkeypatch.setenv(split_k.ENV, "4")
    assert compile_with_facts(mod, OPENCL, "smartmem")[3]["split_gemms"] == 1
    monkeypatch.setenv(split_k.ENV, "off")
    assert compile_with_facts(mod, OPENCL, "smartmem")[3]["split_gemms"] == 0

"""The registered smartmem pipeline, its per-target pass lists and the baseline helper."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tvm
from conftest import LLVM, assert_matches, run_vm
from tvm import relax

from tvm_smartmem import errors, frontend, models, numerics, pipeline, targets
from tvm_smartmem.analysis.stats import collect


def _in_fresh_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_import_tvm_registers_the_pipeline_through_the_entry_point():
    code = ("import tvm\nfrom tvm.relax.pipeline import PIPELINE_MAP\n"
            "import sys\nprint('smartmem' in PIPELINE_MAP, 'tvm_smartmem' in sys.modules)")
    assert _in_fresh_python(code).stdout.split() == ["True", "True"]
    # with TVM's autoload switched off nothing registers it: it is the entry point doing it
    off = _in_fresh_python(code, TVM_DEVICE_BACKEND_AUTOLOAD="0")
    assert off.stdout.split() == ["False", "False"]


def test_importing_the_pipeline_module_first_registers_it_without_a_warning():
    """``from tvm_smartmem.pipeline import ...`` before ``import tvm``: TVM's entry point then
    runs inside this module's own ``import tvm``, on a half-built module; it used to fail
    there (a UserWarning, and no "smartmem" pipeline)."""
    code = ("import warnings\nwarnings.simplefilter('error')\n"
            "from tvm_smartmem.pipeline import smartmem_pipeline\n"
            "from tvm.relax.pipeline import PIPELINE_MAP\nprint('smartmem' in PIPELINE_MAP)")
    done = _in_fresh_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True"]


def test_tvm_compile_with_the_registered_name_matches_onnxruntime():
    model = models.swin_block()
    mod, params = frontend.from_onnx(model)
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    inputs = models.random_inputs(model, seed=3)
    assert_matches(run_vm(ex, list(inputs.values()), params=params),
                   numerics.onnxruntime_reference(model, inputs))


def test_baseline_is_tvms_fused_default():
    """Same kernels as relax.get_default_pipeline, and far fewer than unfused tvm.compile."""
    mod, _ = frontend.from_onnx(models.bert_layer())
    ours = collect(pipeline.baseline(LLVM)(mod))
    with LLVM:
        tvms = collect(relax.get_default_pipeline(LLVM)(mod))
    assert ours.summary() == tvms.summary()
    unfused = collect(relax.get_pipeline("default")(relax.transform.LegalizeOps()(mod)))
    assert ours.kernels < unfused.kernels


@pytest.mark.parametrize("name", ["llvm", "cuda", "opencl", "opencl-texture", "adreno"])
def test_every_named_target_compiles_with_smartmem(name):
    """Code generation only (no device needed): every target kind has a working pass list."""
    tgt = targets.get(name)
    mod, _ = frontend.from_onnx(models.bert_layer())
    lowered = pipeline.smartmem_pipeline(tgt)(mod)
    s = collect(lowered)
    assert s.stage == "lowered" and s.kernels > 0
    if name != "adreno":  # adreno's host is aarch64: no linking here, only the Relax part
        tvm.compile(lowered, tgt, relax_pipeline=None)


def test_target_kinds():
    assert [pipeline.target_kind(targets.get(n)) for n in targets.names()] == [
        "llvm", "cuda", "opencl", "opencl-texture", "opencl-texture"
    ]
    with pytest.raises(errors.UnknownTargetError, match="vulkan"):
        pipeline.target_kind(tvm.target.Target("vulkan"))


def test_phases_can_be_selected_and_are_validated():
    mod, _ = frontend.from_onnx(models.bert_layer())
    fused = pipeline.smartmem_pipeline(LLVM, phases=pipeline.UP_TO_KERNELS)(mod)
    assert collect(fused).stage == "legalized"
    with pytest.raises(ValueError, match="unknown phase"):
        pipeline.phase_passes(LLVM, phases=("legalize", "bogus"))


def test_pipeline_without_target_says_so():
    mod, _ = frontend.from_onnx(models.bert_layer())
    with pytest.raises(errors.UnknownTargetError, match="needs a target"):
        pipeline.smartmem_pipeline()(mod)
    with LLVM:  # the way tvm.compile calls it
        assert collect(pipeline.smartmem_pipeline()(mod)).kernels == 9


def test_report_shows_fusion_rate_rewrites_and_opaque_operators():
    """``tvm-smartmem report``'s DNNFusion columns: the BERT layer's attention scale is moved
    (FLOPs removed), more operators per kernel than TVM's, no opaque operator; a graph with an
    operator the classifier does not know lists it."""
    from tvm_smartmem.report import compare_pipelines, pipeline_facts

    reports = compare_pipelines(models.bert_layer(), "llvm", check=False)
    base, ours = reports["baseline"].to_dict(), reports["smartmem"].to_dict()
    assert base["flops_removed"] == 0 and base["rewrites"] == {}
    assert ours["flops_removed"] > 0 and ours["rewrites"]["scalar_through_matmul"] == 2
    assert ours["fusion_rate"] > base["fusion_rate"] > 1
    assert ours["opaque_ops"] == []

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8,), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            u = bb.emit(relax.op.unique(relax.op.exp(x), sorted=True))
            out = bb.emit_output(u)
        bb.emit_func_output(out)
    lowered = pipeline.smartmem_pipeline(LLVM, phases=pipeline.UP_TO_KERNELS)(bb.get())
    assert pipeline_facts(lowered)["opaque_ops"] == ["relax.unique"]


def _kernel_calls(func: relax.Function) -> int:
    calls = []
    relax.analysis.post_order_visit(
        func.body, lambda e: calls.append(1) if isinstance(e, relax.Call)
        and getattr(e.op, "name", "") in ("relax.call_tir", "relax.call_tir_inplace") else None)
    fused = []
    relax.analysis.post_order_visit(
        func.body, lambda e: fused.append(1) if isinstance(e, relax.Call)
        and isinstance(e.op, relax.GlobalVar) else None)
    return len(calls) + len(fused)


def test_every_graph_function_is_optimised_not_only_main():
    """A module with several entry points (an LLM's prefill and decode, a sweep's variants)
    gets the whole pipeline in each: the second copy of the BERT layer is fused exactly as
    ``main`` is alone, and both match ONNX Runtime."""
    from tvm_smartmem.measure.runner import flatten_outputs, prepare_weights

    model = models.bert_layer()
    mod, params = frontend.from_onnx(model)
    two = mod.clone()
    two["second"] = mod["main"].with_attr("global_symbol", "second")
    upto = pipeline.UP_TO_KERNELS
    alone = _kernel_calls(pipeline.smartmem_pipeline(LLVM, phases=upto)(mod)["main"])
    both = pipeline.smartmem_pipeline(LLVM, phases=upto)(two)
    assert {n: _kernel_calls(both[n]) for n in ("main", "second")} == \
        {"main": alone, "second": alone}
    assert alone == collect(pipeline.smartmem_pipeline(LLVM, phases=upto)(mod)).kernels

    ex = tvm.compile(two, LLVM, relax_pipeline="smartmem")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    inputs = models.random_inputs(model, seed=5)
    ref = numerics.onnxruntime_reference(model, inputs)
    up = [tvm.runtime.tensor(a) for a in params]
    for name in ("main", "second"):
        weights = prepare_weights(vm, up, name)
        args = [tvm.runtime.tensor(a) for a in inputs.values()]
        assert_matches(flatten_outputs(vm[name](*args, *weights)), ref)


def test_a_function_with_control_flow_is_left_to_tvm_and_its_neighbours_still_fused():
    """``main`` with an ``if`` (no dataflow block: TVM's FuseOps' business, run on it alone)
    next to a dataflow function the planner fuses into one kernel; both compute right."""
    import numpy as np
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((8, 16), "float32"), c: R.Tensor((), "bool")
                 ) -> R.Tensor((8, 16), "float32"):
            if c:
                y = R.exp(R.add(x, x))
                z = R.multiply(y, y)
            else:
                z = R.nn.relu(x)
            return z

        @R.function
        def second(x: R.Tensor((8, 16), "float32")) -> R.Tensor((8, 16), "float32"):
            with R.dataflow():
                y = R.exp(R.add(x, x))
                z = R.multiply(y, y)
                R.output(z)
            return z

    lowered = pipeline.smartmem_pipeline(LLVM, phases=pipeline.UP_TO_KERNELS)(Mod)
    assert _kernel_calls(lowered["second"]) == 1
    ex = tvm.compile(Mod, LLVM, relax_pipeline="smartmem")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = np.random.default_rng(0).random((8, 16)).astype("float32")
    ref = (np.exp(2 * x.astype("float64")) ** 2).astype("float32")
    for c, want in ((True, ref), (False, np.maximum(x, 0))):
        got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.array(c))).numpy()
        assert_matches([got], [want])
    assert_matches([vm["second"](tvm.runtime.tensor(x)).numpy()], [ref])

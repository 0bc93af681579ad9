"""Materialising fusion partitions (transform.partition): structure, numerics, legality."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import LLVM, assert_matches, run_vm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tvm import relax, topi

from tvm_smartmem import frontend, models, numerics
from tvm_smartmem.analysis.stats import collect
from tvm_smartmem.transform.partition import Block, fuse_groups

LEGALIZE = tvm.transform.Sequential([
    relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
    relax.transform.FoldConstant(),
])


def _bert():
    model = models.bert_layer()
    mod, params = frontend.from_onnx(model)
    return model, LEGALIZE(mod), params


# bert_layer after legalisation: lv..lv2 Q/K/V matmuls, lv3/lv5/lv7 bias adds, lv4/lv6/lv8 head
# reshapes, lv9/lv10/lv15 head transposes, lv11 QK^T, lv12 scale, lv13 mask, lv14 softmax,
# lv16 PV, lv17/lv18 head merge, lv19.. out-projection, FFN, layernorms.
BERT_GROUPS = [
    ["lv", "lv3"], ["lv1", "lv5"], ["lv2", "lv7"],
    ["lv4", "lv9", "lv6", "lv10", "lv11", "lv12", "lv13"],
    ["lv8", "lv15", "lv16"],
    ["lv17", "lv18", "lv19", "lv20", "lv21"],
    ["lv23", "lv24", "lv25", "lv26", "lv27", "lv28", "lv29"],
    ["lv30", "lv31", "lv32"],
]


def _vars(mod, names):
    by_name = {b.var.name: b.var for b in Block.of(mod["main"]).bindings}
    return [[by_name[n] for n in g] for g in names]


def test_groups_become_primitive_functions_and_one_kernel_each():
    model, mod, params = _bert()
    fused = fuse_groups(mod, _vars(mod, BERT_GROUPS), attrs={"smartmem.planner": "test"})
    prim = {gv.name_hint: f for gv, f in fused.functions_items()
            if isinstance(f, relax.Function) and f.attrs and "Primitive" in f.attrs}
    # the Q, K and V projection groups are the same function: BlockBuilder shares it
    assert len(prim) == len(BERT_GROUPS) - 2
    assert all(str(f.attrs["smartmem.planner"]) == "test" for f in prim.values())
    s = collect(relax.transform.FuseTIR()(fused))
    # 8 groups + 2 layernorms + softmax = 11 launches, none of them only moves data
    assert (s.kernels, s.data_movement_kernels) == (11, 0)
    inputs = models.random_inputs(model, seed=2)
    lowered = tvm.compile(relax.transform.FuseTIR()(fused), LLVM)
    assert_matches(run_vm(lowered, list(inputs.values()), params=params),
                   numerics.onnxruntime_reference(model, inputs))


def test_illegal_groups_are_rejected():
    _, mod, _ = _bert()
    # lv3 -> lv4 -> lv9 -> lv11: grouping lv3 with lv11 but not the path between is a cycle
    with pytest.raises(ValueError, match="not convex"):
        fuse_groups(mod, _vars(mod, [["lv3", "lv11"]]))
    with pytest.raises(ValueError, match="two fusion groups"):
        fuse_groups(mod, _vars(mod, [["lv", "lv3"], ["lv3", "lv4"]]))


def test_group_with_several_outputs():
    """a = relu(x); b = a + 1; c = a * b: grouping {a, b} leaves `a` needed outside."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit_te(topi.nn.relu, x)
            b = bb.emit_te(topi.add, a, 1.0)
            c = bb.emit_te(topi.multiply, a, b)
            out = bb.emit_output(bb.emit_te(topi.exp, c))
        bb.emit_func_output(out)
    mod = bb.get()
    fused = fuse_groups(mod, [[a, b]])
    data = np.random.randn(4, 8).astype("float32")
    relu = np.maximum(data, 0)
    ref = np.exp(relu * (relu + 1))
    assert_matches(run_vm(tvm.compile(relax.transform.FuseTIR()(fused), LLVM), [data]), [ref])


# -- random graphs ---------------------------------------------------------------------------

UNARY = [topi.nn.relu, topi.exp, topi.sigmoid, lambda t: topi.multiply(t, 0.5)]


@st.composite
def graphs_and_groups(draw):
    """A random DAG of elementwise ops on [4, 8] tensors and random contiguous groups."""
    n = draw(st.integers(3, 9))
    ops = []
    for i in range(n):
        if i >= 1 and draw(st.booleans()):
            a = draw(st.integers(-1, i - 1))
            b = draw(st.integers(-1, i - 1))
            ops.append(("add", a, b))
        else:
            ops.append(("unary", draw(st.integers(0, len(UNARY) - 1)),
                        draw(st.integers(-1, i - 1))))
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=4))))
    bounds = [0, *cuts, n]
    groups = [list(range(bounds[k], bounds[k + 1])) for k in range(len(bounds) - 1)]
    return ops, groups


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs_and_groups())
def test_random_partitions_preserve_numerics(case):
    """Contiguous ranges of a topological order are always convex: every partition into such
    ranges must compile and compute what the unfused graph computes."""
    ops, groups = case
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    vals = []
    with bb.function("main", [x]):
        with bb.dataflow():
            def pick(k):
                return x if k < 0 else vals[k]

            for op in ops:
                if op[0] == "add":
                    vals.append(bb.emit_te(topi.add, pick(op[1]), pick(op[2])))
                else:
                    vals.append(bb.emit_te(UNARY[op[1]], pick(op[2])))
            out = bb.emit_output(relax.Tuple(vals))
        bb.emit_func_output(out)
    mod = bb.get()
    data = np.random.default_rng(0).standard_normal((4, 8)).astype("float32") * 0.5
    ref = run_vm(tvm.compile(mod, LLVM), [data])
    fused = fuse_groups(mod, [[vals[i] for i in g] for g in groups])
    outs = run_vm(tvm.compile(relax.transform.FuseTIR()(fused), LLVM), [data])
    assert_matches(outs, ref)

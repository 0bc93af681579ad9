"""Layout-transform elimination end to end: decisions, kernels, index folding, numerics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from conftest import LLVM, assert_matches, run_vm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from tvm_smartmem import frontend, models, numerics
from tvm_smartmem.analysis.stats import collect
from tvm_smartmem.pipeline import UP_TO_KERNELS, baseline, smartmem_pipeline
from tvm_smartmem.tir.index_simplify import count_div_mod
from tvm_smartmem.transform.eliminate_layout import (
    CONSUMER,
    KEEP,
    PRODUCER,
    EliminateLayoutTransforms,
    layout_plan,
)

LEGALIZE = tvm.transform.Sequential([
    relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
    relax.transform.FoldConstant(),
])

# model: (baseline kernels, baseline data-movement kernels, smartmem kernels).  Baseline data
# movement: bert 4 = Q/K/V head splits + head merge; swin 7 = roll + partition, bias gather and
# its reshape/transpose, Q/K/V splits, merge; vit 4 = Q/K/V splits + merge (the patch flatten is
# a view); convnext 1 = the NCHW -> NHWC permute before layernorm (the one back fuses into the
# residual add); mobilevit 6 = unfold, Q/K/V splits, merge, fold; llm 2 = the grouped K/V head
# expansions; small_cnn 1 = the classifier weight's transpose.  Smartmem folds every one of them
# into a neighbour's loads; a layout map that follows a matmul / conv goes into the *next*
# kernel's loads, never into the matmul's epilogue, which is why e.g. swin keeps 13, not 12.
# Then CombineParallelMatmuls merges the separate Q / K / V projections (bert, swin, vit,
# mobilevit: -2; llm: q/k/v and gate/up, -3 GEMMs, +1 for silu(gate) * up, which no longer
# rides in the up projection's epilogue) and
# LiftWeightTransforms moves swin's relative-position-bias gather (a weight gathered at
# constant indices) to load time (-1).  The llm's two residual adds go into the preceding
# GEMMs' epilogues and the squares into the RMSNorm reductions, which read each element once
# (-2: a cheap prologue of a reduction is not recomputed per reuse the way a matmul operand's is).
# A layernorm that also stores its prologue (``RowReductionWithSideOutputs``) takes the
# residual stream's first add with it: vit's patch embedding + class token + position embedding
# and swin's shifted-window reverse + residual add join the next layernorm (-1 each).
EXPECTED = {
    "bert_layer": (15, 4, 9),
    "swin_block": (19, 7, 9),
    "vit_block": (17, 4, 10),
    "convnext_block": (6, 1, 5),
    "mobilevit_block": (16, 6, 8),
    "llm_block": (18, 2, 12),
    "small_cnn": (8, 1, 6),
}


def _compile(model, pipeline):
    mod, params = frontend.from_onnx(model)
    return mod, params, tvm.compile(mod, LLVM, relax_pipeline=pipeline(LLVM))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_counts_and_numerics(name):
    """Every data-movement kernel is gone, the kernel count drops as stated, and both builds
    still match ONNX Runtime."""
    model = models.get(name)
    mod, params = frontend.from_onnx(model)
    base = collect(baseline(LLVM)(mod))
    ours = collect(smartmem_pipeline(LLVM)(mod))
    kernels, dm, smart = EXPECTED[name]
    assert (base.kernels, base.data_movement_kernels) == (kernels, dm)
    assert (ours.kernels, ours.data_movement_kernels) == (smart, 0)
    inputs = models.random_inputs(model, seed=11)
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    assert_matches(run_vm(ex, list(inputs.values()), params=params),
                   numerics.onnxruntime_reference(model, inputs))


def test_bert_decisions():
    """Head splits (reshape + transpose) fold into the attention matmuls' reads; the head merge
    (transpose + reshape) into the output projection's reads."""
    mod, _ = frontend.from_onnx(models.bert_layer())
    mod = EliminateLayoutTransforms()(LEGALIZE(mod))
    plan = layout_plan(mod["main"])
    assert len(plan) == 8 and set(plan.values()) == {CONSUMER}


def test_fold_into_producer_when_the_consumer_is_a_graph_output():
    """x -> exp -> transpose -> (output): no consumer to fold into, so exp writes through the
    transpose's map (reverse_compute_inline), in one kernel."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            e = bb.emit(relax.op.exp(x))
            out = bb.emit_output(relax.op.permute_dims(e, [1, 0]))
        bb.emit_func_output(out)
    mod = bb.get()
    planned = EliminateLayoutTransforms()(LEGALIZE(mod))
    assert set(layout_plan(planned["main"]).values()) == {PRODUCER}
    s = collect(smartmem_pipeline(LLVM)(mod))
    assert (s.kernels, s.data_movement_kernels) == (1, 0)
    data = np.random.rand(4, 6).astype("float32")
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    assert_matches(run_vm(ex, [data]), [np.exp(data).T])


@pytest.mark.parametrize("then_transpose", [False, True])
def test_a_reshape_read_by_a_convolution_stays_a_view(then_transpose):
    """x -> exp -> reshape -> conv: the reshape of a materialised tensor is a zero-copy view
    (a conv reading through the fold pays index arithmetic in its inner loop: 21% on the
    H100); a transpose before it is real data movement and still folds into the conv."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 8, 36), "float32"))
    w = relax.const(np.random.default_rng(0).standard_normal((8, 8, 3, 3)).astype("float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            e = bb.emit(relax.op.exp(x))
            if then_transpose:
                e = bb.emit(relax.op.permute_dims(e, [0, 2, 1, 3]))
            r = bb.emit(relax.op.reshape(e, (1, 8, 6, 24) if then_transpose else (1, 8, 12, 12)))
            out = bb.emit_output(relax.op.nn.conv2d(r, w, padding=1))
        bb.emit_func_output(out)
    mod = bb.get()
    plan = layout_plan(EliminateLayoutTransforms()(LEGALIZE(mod))["main"])
    s = collect(smartmem_pipeline(LLVM)(mod))
    assert (s.kernels, s.data_movement_kernels) == (2, 0)
    assert s.zero_copy_views == (0 if then_transpose else 1)
    assert (KEEP in plan.values()) != then_transpose
    data = np.random.default_rng(1).standard_normal((1, 4, 8, 36)).astype("float32") * 0.3
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    e = np.exp(data.astype("float64"))
    e = e.transpose(0, 2, 1, 3) if then_transpose else e
    r = np.pad(e.reshape((1, 8, 6, 24) if then_transpose else (1, 8, 12, 12)),
               ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(r, (3, 3), axis=(2, 3))
    ref = np.einsum("nchwyx,ocyx->nohw", windows, w.value.numpy().astype("float64"))
    assert_matches(run_vm(ex, [data]), [ref.astype("float32")])


def _conv3x3(x, w):
    padded = np.pad(x.astype("float64"), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    return np.einsum("nchwyx,ocyx->nohw", windows, w.astype("float64"))


@pytest.mark.parametrize("target_name", ["llvm", "opencl"])
def test_a_concatenation_folds_into_the_convolution_that_reads_it(target_name, request):
    """MobileViT's fusion step: conv -> SiLU, concatenated with the block input over channels,
    -> conv3x3.  The concatenation becomes a select on the second conv's input channel (one
    uniform branch per channel step), so SiLU joins the first conv's epilogue and no kernel
    is left for the concatenation: 2 kernels, no data movement (3 before: the concatenation
    never folded into a many-to-many consumer)."""
    from tvm_smartmem import targets

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 4, 1, 1)).astype("float32") * 0.5
    w2 = rng.standard_normal((5, 10, 3, 3)).astype("float32") * 0.2
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 7, 7), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.nn.conv2d(x, relax.const(w1)))
            s = bb.emit(relax.op.multiply(c, relax.op.sigmoid(c)))
            cat = bb.emit(relax.op.concat([s, x], axis=1))
            out = bb.emit_output(relax.op.nn.conv2d(cat, relax.const(w2), padding=1))
        bb.emit_func_output(out)
    mod = bb.get()
    stats = collect(smartmem_pipeline(LLVM)(mod))
    assert (stats.kernels, stats.data_movement_kernels) == (2, 0)
    assert collect(smartmem_pipeline(LLVM, disable=("EliminateLayoutTransforms",))(mod)).kernels \
        == 3
    target = targets.get(target_name)
    dev = request.getfixturevalue("dev") if target_name == "opencl" else None
    data = rng.standard_normal((1, 4, 7, 7)).astype("float32")
    conv1 = np.einsum("nchw,oc->nohw", data.astype("float64"), w1[:, :, 0, 0])
    silu = conv1 / (1 + np.exp(-conv1))
    expected = _conv3x3(np.concatenate([silu, data], axis=1), w2)
    ex = tvm.compile(mod, target, relax_pipeline=smartmem_pipeline(target))
    assert_matches(run_vm(ex, [data], dev=dev), [expected.astype("float32")])


def test_shared_tensor_gets_one_map_per_consumer():
    """t = transpose(x) feeds two matmuls: each reads x through its own copy of the map."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8, 4), "float32"))
    w = relax.Var("w", relax.TensorType((8, 5), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            t = bb.emit(relax.op.permute_dims(x, [1, 0]))  # [4, 8]
            a = bb.emit(relax.op.matmul(t, w))
            b = bb.emit(relax.op.matmul(t, relax.op.exp(w)))
            out = bb.emit_output(relax.op.add(a, b))
        bb.emit_func_output(out)
    mod = bb.get()
    base, ours = collect(baseline(LLVM)(mod)), collect(smartmem_pipeline(LLVM)(mod))
    assert base.data_movement_kernels == 1 and ours.data_movement_kernels == 0
    xs, ws = np.random.rand(8, 4).astype("float32"), np.random.rand(8, 5).astype("float32")
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    assert_matches(run_vm(ex, [xs, ws]), [xs.T @ ws + xs.T @ np.exp(ws)])


def test_beats_tvms_own_layout_passes():
    """TVM's OptimizeLayoutTransform, RemoveRedundantReshape and FuseTransposeMatmul (with its
    fused default pipeline) still leave data-movement kernels in the BERT layer; ours none."""
    mod, _ = frontend.from_onnx(models.bert_layer())
    tvm_passes = tvm.transform.Sequential([
        relax.transform.FuseTransposeMatmul(),
        relax.transform.RemoveRedundantReshape(),
        relax.transform.OptimizeLayoutTransform(),
    ])
    theirs = collect(baseline(LLVM)(tvm_passes(mod)))
    ours = collect(smartmem_pipeline(LLVM)(mod))
    assert theirs.data_movement_kernels >= 3
    assert ours.data_movement_kernels == 0 and ours.kernels < theirs.kernels


def test_index_simplification_removes_the_div_mod_folding_leaves():
    """Folded head splits read lv[(h * 16 + k) // 64 + i) % 32, (h * 16 + k) % 64]; with the
    block ranges that is lv[i, h * 16 + k]."""
    mod, _ = frontend.from_onnx(models.bert_layer())
    before = smartmem_pipeline(LLVM, phases=UP_TO_KERNELS, disable=("SimplifyIndices",))(mod)
    after = smartmem_pipeline(LLVM, phases=UP_TO_KERNELS)(mod)

    def total(m):
        return sum(count_div_mod(f) for _, f in m.functions_items()
                   if isinstance(f, tvm.tirx.PrimFunc))

    assert total(before) == 14
    assert total(after) == 2  # the head merge's reads keep one split each: // 16 and % 16


def test_every_pass_can_be_switched_off():
    model = models.swin_block()
    mod, params = frontend.from_onnx(model)
    inputs = models.random_inputs(model, seed=4)
    ref = numerics.onnxruntime_reference(model, inputs)
    for off in ("EliminateLayoutTransforms", "FusePlan", "InlineDataMovement",
                "SimplifyIndices"):
        ex = tvm.compile(mod, LLVM, relax_pipeline=smartmem_pipeline(LLVM, disable=(off,)))
        assert_matches(run_vm(ex, list(inputs.values()), params=params), ref)


# -- random chains of layout operators around matmul / conv / softmax -----------------------

LAYOUT_OPS = ["reshape_split", "reshape_merge", "transpose", "slice"]


@st.composite
def layout_chains(draw):
    consumer = draw(st.sampled_from(["matmul", "conv", "softmax"]))
    ops = draw(st.lists(st.sampled_from(LAYOUT_OPS), min_size=1, max_size=4))
    tail = draw(st.lists(st.sampled_from(LAYOUT_OPS), max_size=2))
    return consumer, ops, tail


def _chain_model(consumer: str, ops: list[str], tail: list[str]) -> onnx.ModelProto:
    """x:[2, 6, 8] -> layout ops -> (back to rank 3) -> consumer -> layout ops -> y."""
    rng = np.random.default_rng(len(ops) * 7 + len(tail))
    nodes, inits = [], []
    counter = [0]

    def name(p):
        counter[0] += 1
        return f"{p}{counter[0]}"

    def const(arr):
        n = name("c")
        inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def apply(t, shape, op):
        out = name("t")
        if op == "reshape_split" and shape[-1] % 2 == 0:
            shape = [*shape[:-1], 2, shape[-1] // 2]
            nodes.append(helper.make_node("Reshape", [t, const(np.array(shape, np.int64))], [out]))
        elif op == "reshape_merge" and len(shape) > 2:
            shape = [*shape[:-2], shape[-2] * shape[-1]]
            nodes.append(helper.make_node("Reshape", [t, const(np.array(shape, np.int64))], [out]))
        elif op == "transpose" and len(shape) >= 2:
            perm = list(range(len(shape)))
            perm[-1], perm[-2] = perm[-2], perm[-1]
            shape = [shape[p] for p in perm]
            nodes.append(helper.make_node("Transpose", [t], [out], perm=perm))
        elif op == "slice" and shape[-1] > 2:
            shape = [*shape[:-1], shape[-1] - 1]
            nodes.append(helper.make_node(
                "Slice", [t, const(np.array([1], np.int64)), const(np.array([shape[-1] + 1],
                                                                             np.int64)),
                          const(np.array([len(shape) - 1], np.int64))], [out]))
        else:
            return t, shape
        return out, shape

    t, shape = "x", [2, 6, 8]
    for op in ops:
        t, shape = apply(t, shape, op)
    n = int(np.prod(shape))
    flat = [2, n // (2 * shape[-1]), shape[-1]] if n % (2 * shape[-1]) == 0 else [1, n // shape[-1],
                                                                                  shape[-1]]
    out = name("t")
    nodes.append(helper.make_node("Reshape", [t, const(np.array(flat, np.int64))], [out]))
    t, shape = out, flat
    out = name("t")
    if consumer == "matmul":
        w = const(rng.standard_normal((shape[-1], 5)).astype(np.float32))
        nodes.append(helper.make_node("MatMul", [t, w], [out]))
        shape = [*shape[:-1], 5]
    elif consumer == "softmax":
        nodes.append(helper.make_node("Softmax", [t], [out], axis=-1))
    else:  # conv over [N, C, L] as a 1-d conv
        w = const(rng.standard_normal((4, shape[1], 1)).astype(np.float32))
        nodes.append(helper.make_node("Conv", [t, w], [out]))
        shape = [shape[0], 4, shape[2]]
    t = out
    for op in tail:
        t, shape = apply(t, shape, op)
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 8])],
        [helper.make_tensor_value_info(t, TensorProto.FLOAT, shape)], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout_chains())
def test_random_layout_chains_fold_and_match(case):
    """Layout operators before the consumer always fold into it.  A tail of layout operators
    after a matmul / conv that is the graph's output cannot (no consumer, and the schedule rules
    need the matmul unpermuted): a pure reshape becomes a view, a transpose or slice stays a
    kernel -- never more data movement than TVM's own pipeline leaves."""
    model = _chain_model(*case)
    mod, params = frontend.from_onnx(model)
    ours = collect(smartmem_pipeline(LLVM)(mod))
    base = collect(baseline(LLVM)(mod))
    _, _, tail = case
    if all(op.startswith("reshape") for op in tail):
        assert ours.data_movement_kernels == 0
    assert ours.data_movement_kernels <= base.data_movement_kernels
    x = np.random.default_rng(0).standard_normal((2, 6, 8)).astype("float32")
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    assert_matches(run_vm(ex, [x], params=params),
                   numerics.onnxruntime_reference(model, {"x": x}))


def test_split_fields_become_slices_that_fold():
    """q, k = split(x): one multi-output kernel in TVM; here two slices folded into the matmul."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((6, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            parts = bb.emit(relax.op.split(x, 2, axis=1))
            q = bb.emit(relax.TupleGetItem(parts, 0))
            k = bb.emit(relax.TupleGetItem(parts, 1))
            out = bb.emit_output(relax.op.matmul(q, relax.op.permute_dims(k)))
        bb.emit_func_output(out)
    mod = bb.get()
    from tvm_smartmem.transform.split_to_slices import SplitToSlices

    ops = collect(SplitToSlices()(mod)).op_histogram
    assert "relax.split" not in ops and ops["relax.strided_slice"] == 2
    base, ours = collect(baseline(LLVM)(mod)), collect(smartmem_pipeline(LLVM)(mod))
    assert base.kernels == 3 and (ours.kernels, ours.data_movement_kernels) == (1, 0)
    data = np.random.rand(6, 8).astype("float32")
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    assert_matches(run_vm(ex, [data]), [data[:, :4] @ data[:, 4:].T])


@pytest.mark.parametrize("consumer", ["matmul", "exp"])
def test_a_roll_folds_into_elementwise_reads_but_not_into_a_matmul(consumer):
    """roll = concat(slice, slice) is a select between two sources per element.  An element-wise
    consumer absorbs it; a matmul must not (swin on the H100: its QKV projection with the roll
    folded fell off the dlight Matmul rule and ran 6x slower), so the concatenate stays a kernel
    there and only the reshape after it folds into the matmul."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((6, 4, 8), "float32"))
    w = relax.Var("w", relax.TensorType((32, 5), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            tail = bb.emit(relax.op.strided_slice(x, [0], [4], [6]))
            head = bb.emit(relax.op.strided_slice(x, [0], [0], [4]))
            rolled = bb.emit(relax.op.concat([tail, head], axis=0))
            flat = bb.emit(relax.op.reshape(rolled, (6, 32)))
            out = bb.emit_output(relax.op.matmul(flat, w) if consumer == "matmul"
                                 else relax.op.exp(flat))
        bb.emit_func_output(out)
    mod = bb.get()
    plan = layout_plan(EliminateLayoutTransforms()(LEGALIZE(mod))["main"])
    # bindings in order: lv, lv1 = the slices, lv2 = the concatenate, lv3 = the reshape
    assert plan == {"lv": CONSUMER, "lv1": CONSUMER, "lv3": CONSUMER,
                    "lv2": KEEP if consumer == "matmul" else CONSUMER}
    rng = np.random.default_rng(3)
    data, weight = rng.standard_normal((6, 4, 8)).astype("float32"), \
        rng.standard_normal((32, 5)).astype("float32")
    rolled_np = np.roll(data, -4, axis=0).reshape(6, 32)
    expected = rolled_np @ weight if consumer == "matmul" else np.exp(rolled_np)
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    assert_matches(run_vm(ex, [data, weight]), [expected])


def test_a_gather_with_constant_indices_still_folds_into_a_matmul():
    """take(x, [0]) reads one data tensor (the indices are a constant): it is a pure index map
    and folds into the matmul after it, unlike a concatenate (DeiT's class-token select)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 6, 8), "float32"))
    w = relax.Var("w", relax.TensorType((8, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            first = bb.emit(relax.op.take(x, relax.const(np.array([0], "int64")), axis=1))
            out = bb.emit_output(relax.op.matmul(first, w))
        bb.emit_func_output(out)
    mod = bb.get()
    plan = layout_plan(EliminateLayoutTransforms()(LEGALIZE(mod))["main"])
    assert plan == {"lv": CONSUMER}
    s = collect(smartmem_pipeline(LLVM)(mod))
    assert (s.kernels, s.data_movement_kernels) == (1, 0)
    rng = np.random.default_rng(4)
    data, weight = rng.standard_normal((4, 6, 8)).astype("float32"), \
        rng.standard_normal((8, 3)).astype("float32")
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    assert_matches(run_vm(ex, [data, weight]), [data[:, [0], :] @ weight])


def _embedding_rmsnorm(vocab: int = 50, dim: int = 16, seq: int = 8) -> onnx.ModelProto:
    """LLaMA's opening: ids normalised (``where(ids < 0, ids + V, ids)``), gathered, RMS-normed,
    projected, and the gathered rows added back as the residual."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Less", ["ids", "zero"], ["neg"]),
        helper.make_node("Add", ["ids", "vocab"], ["wrapped"]),
        helper.make_node("Where", ["neg", "wrapped", "ids"], ["idx"]),
        helper.make_node("Gather", ["emb", "idx"], ["x"]),
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Div", ["x", "rms"], ["xn"]),
        helper.make_node("Mul", ["xn", "g"], ["xg"]),
        helper.make_node("MatMul", ["xg", "w"], ["h"]),
        helper.make_node("Add", ["h", "x"], ["y"]),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("emb", rng.standard_normal((vocab, dim)).astype("float32")),
        ("w", rng.standard_normal((dim, dim)).astype("float32")),
        ("g", rng.standard_normal((dim,)).astype("float32")),
        ("zero", np.array(0, "int64")), ("vocab", np.array(vocab, "int64")),
        ("eps", np.array(1e-6, "float32")), ("axes", np.array([-1], "int64"))]]
    graph = helper.make_graph(
        nodes, "embedding_rmsnorm",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, seq])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def test_an_index_computation_is_recomputed_by_each_reader(monkeypatch):
    """The ids' ``less`` / ``add`` are read by two gathers of the same rows (the RMSNorm's and
    the residual's).  Stored, they keep a kernel of their own that writes them and the first
    gather; recomputed per reader, the gathers fold into the RMSNorm and the residual add: two
    kernels instead of three, the same values as ONNX Runtime, negative ids included."""
    from tvm_smartmem.transform import eliminate_layout

    model = _embedding_rmsnorm()
    mod, params = frontend.from_onnx(model)
    ours = smartmem_pipeline(LLVM)(mod)
    assert collect(ours).kernels == 2
    planned = EliminateLayoutTransforms()(LEGALIZE(mod))
    plan = layout_plan(planned["main"])
    index_ops = [b.var.name for b in planned["main"].body.blocks[0].bindings
                 if b.var.ty.dtype in ("bool", "int64") and b.var.name in plan]
    # a less / add / where for each operand that reads the gathered rows, each folded into it
    assert len(index_ops) > 3 and len(index_ops) % 3 == 0
    assert {plan[n] for n in index_ops} == {CONSUMER}
    ids = np.array([[3, -1, 0, 49, -50, 7, 7, 12]], "int64")
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    assert_matches(run_vm(ex, [ids], params=params),
                   numerics.onnxruntime_reference(model, {"ids": ids}))
    monkeypatch.setattr(eliminate_layout, "RECOMPUTE_ELEMENTS", 0)
    assert collect(smartmem_pipeline(LLVM)(mod)).kernels == 3

"""The DNNFusion planner (FusePlan), its fusion table, and the cost layer behind yellow cells."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import LLVM, assert_matches, run_vm
from tvm import relax

from tvm_smartmem.analysis.classify import MappingType as M
from tvm_smartmem.analysis.stats import collect
from tvm_smartmem.cost import CostLayer, Verdict
from tvm_smartmem.cost.db import ProfileDB
from tvm_smartmem.cost.features import candidate_key, numeric_features
from tvm_smartmem.cost.model import MIN_ROWS, LatencyModel
from tvm_smartmem.pipeline import baseline, smartmem_pipeline
from tvm_smartmem.transform.fuse import DECISIONS_ATTR, FusePlan, G, R, Y, relation

LEGALIZE = tvm.transform.Sequential([
    relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
])


def test_fusion_table_cells():
    assert relation(M.ONE_TO_ONE, M.MANY_TO_MANY) == (M.MANY_TO_MANY, G)
    assert relation(M.MANY_TO_MANY, M.ONE_TO_ONE) == (M.MANY_TO_MANY, G)
    assert relation(M.MANY_TO_MANY, M.MANY_TO_MANY) == (None, R)
    assert relation(M.ONE_TO_MANY, M.MANY_TO_MANY) == (None, R)
    assert relation(M.SHUFFLE, M.MANY_TO_MANY) == (M.MANY_TO_MANY, Y)
    assert relation(M.REORGANIZE, M.SHUFFLE) == (M.REORGANIZE, G)
    assert relation(M.OPAQUE, M.ONE_TO_ONE) == (None, R)
    colours = [relation(a, b)[1] for a in M if a != M.OPAQUE for b in M if b != M.OPAQUE]
    assert colours.count(G) == 13 and colours.count(Y) == 10 and colours.count(R) == 2


def _module(build, *shapes):
    bb = relax.BlockBuilder()
    params = [relax.Var(f"p{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def test_elementwise_chain_is_one_kernel():
    mod = _module(lambda bb, x: relax.op.sigmoid(relax.op.exp(relax.op.multiply(x, x))), (4, 8))
    assert collect(smartmem_pipeline(LLVM)(mod)).kernels == 1


def test_matmul_chain_is_red_and_epilogues_fuse():
    """matmul -> add -> relu -> matmul: the second matmul never joins the first (red);
    add and relu join the first as its epilogue."""

    def build(bb, x, w1, w2):
        h = bb.emit(relax.op.nn.relu(relax.op.add(relax.op.matmul(x, w1), x)))
        return relax.op.matmul(h, w2)

    mod = _module(build, (8, 8), (8, 8), (8, 8))
    s = collect(smartmem_pipeline(LLVM)(mod))
    assert s.kernels == 2
    data = [np.random.rand(8, 8).astype("float32") for _ in range(3)]
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    ref = np.maximum(data[0] @ data[1] + data[0], 0) @ data[2]
    assert_matches(run_vm(ex, data), [ref])


def test_computing_prologue_stays_out_of_a_matmul_but_layout_joins_it():
    """exp(x) @ w: the exp would be recomputed per reuse inside the matmul (yellow, split);
    transpose(x) @ w: the transpose becomes the matmul's read pattern (one kernel)."""
    exp_first = _module(lambda bb, x, w: relax.op.matmul(relax.op.exp(x), w), (8, 8), (8, 8))
    planned = FusePlan(LLVM)(LEGALIZE(exp_first))
    decisions = [str(d) for d in planned["main"].attrs[DECISIONS_ATTR]]
    assert decisions == ["tir_exp->matmul: split (analytic)"]  # legalised exp is "tir_exp"
    assert collect(smartmem_pipeline(LLVM)(exp_first)).kernels == 2
    transposed = _module(lambda bb, x, w: relax.op.matmul(relax.op.permute_dims(x), w),
                         (8, 8), (8, 8))
    base, ours = collect(baseline(LLVM)(transposed)), collect(smartmem_pipeline(LLVM)(transposed))
    assert (base.kernels, ours.kernels) == (2, 1)  # FuseOps cannot do this one


def test_layout_after_a_matmul_goes_to_the_next_kernel():
    """matmul -> transpose -> add: the transpose is folded into the add's loads, not into the
    matmul's epilogue (a matmul writing through a permutation is a kernel the schedule rules
    no longer recognise), so the matmul kernel stays a plain matmul."""

    def build(bb, x, w, r):
        return relax.op.add(relax.op.permute_dims(relax.op.matmul(x, w), [1, 0]), r)

    mod = _module(build, (6, 8), (8, 4), (4, 6))
    ours = smartmem_pipeline(LLVM)(mod)
    s = collect(ours)
    assert (s.kernels, s.data_movement_kernels) == (2, 0)
    matmul_kernel = next(f for gv, f in ours.functions_items()
                         if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint)
    assert "transpose" not in matmul_kernel.script()
    data = [np.random.rand(*s).astype("float32") for s in ((6, 8), (8, 4), (4, 6))]
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    assert_matches(run_vm(ex, data), [(data[0] @ data[1]).T + data[2]])


@pytest.mark.parametrize("target_name", ["llvm", "opencl"])
def test_unit_axis_reshape_after_a_matmul_stays_in_its_epilogue(target_name, request):
    """LeViT's residual: ``(x @ w + b)`` reshaped ``[196, 64] -> [1, 196, 64]``, then added to
    the residual stream.  Inserting an extent-1 axis is not a layout change -- the epilogue
    reads the matmul result at its own indices -- so it is one kernel (the GEMM rule still
    schedules it on GPUs); a reshape that regroups elements stays out (the test above)."""

    def build(bb, x, w, r):
        y = relax.op.add(relax.op.matmul(x, w), relax.const(np.arange(64, dtype="float32")))
        return relax.op.add(relax.op.reshape(y, (1, 196, 64)), r)

    mod = _module(build, (196, 32), (32, 64), (1, 196, 64))
    s = collect(smartmem_pipeline(LLVM)(mod))
    assert (s.kernels, s.data_movement_kernels) == (1, 0)
    from tvm_smartmem import targets
    from tvm_smartmem.pipeline import UP_TO_KERNELS

    target = targets.get(target_name)
    if target_name == "opencl":
        cuda = targets.get("cuda")
        with cuda:
            kernels = smartmem_pipeline(cuda, phases=UP_TO_KERNELS)(mod)
        (rule,) = [str(f.attrs["smartmem.schedule_rule"]) for _, f in kernels.functions_items()
                   if isinstance(f, tvm.tirx.PrimFunc)]
        assert rule == "TunedMatmul"
    dev = request.getfixturevalue("dev") if target_name == "opencl" else None
    data = [np.random.default_rng(i).standard_normal(shape).astype("float32")
            for i, shape in enumerate(((196, 32), (32, 64), (1, 196, 64)))]
    ex = tvm.compile(mod, target, relax_pipeline=smartmem_pipeline(target))
    expected = (data[0] @ data[1] + np.arange(64, dtype="float32"))[None] + data[2]
    assert_matches(run_vm(ex, data, dev=dev), [expected])


def test_opaque_operators_stay_alone():
    def build(bb, x):
        e = bb.emit(relax.op.exp(x))
        u = bb.emit(relax.call_dps_packed("my_vendor_op", (e,), relax.TensorType((8,),
                                                                                  "float32")))
        return relax.op.sigmoid(u)

    mod = _module(build, (8,))
    fused = FusePlan(LLVM)(LEGALIZE(mod))
    calls = [b.value for b in fused["main"].body.blocks[0].bindings
             if isinstance(b.value, relax.Call)]
    assert any(isinstance(c.op, tvm.ir.Op) and c.op.name == "relax.call_dps_packed"
               for c in calls)


# -- cost layer ------------------------------------------------------------------------------


class _FakePlanner:
    """Enough of a planner for candidate keys: one producer unit and one consumer unit."""

    def __init__(self):
        from tvm_smartmem.analysis.ecg import build_ecg
        from tvm_smartmem.transform.fuse import build_units

        mod = LEGALIZE(_module(lambda bb, x: relax.op.matmul(relax.op.permute_dims(x), x),
                               (8, 8)))
        self.ecg = build_ecg(mod["main"], mod)
        self.units, _ = build_units(self.ecg, {})

    def _prologue_compute(self, producers, consumers):
        return False


def test_profile_db_measured_then_model_then_analytic(tmp_path):
    planner = _FakePlanner()
    key = candidate_key(planner, {0}, 1, True, LLVM)
    assert len(numeric_features(key)) == 17
    db = ProfileDB(tmp_path / "profile.sqlite")
    layer = CostLayer.of(db)
    assert layer.should_fuse(planner, {0}, 1, True, LLVM) == Verdict(True, "analytic")
    db.record(key, fused_ms=2.0, parts_ms=1.5, device="test")
    assert layer.should_fuse(planner, {0}, 1, True, LLVM) == Verdict(False, "measured")
    # persistence: a new connection sees the row
    again = ProfileDB(tmp_path / "profile.sqlite")
    assert len(again) == 1 and again.lookup(key).gain == pytest.approx(-1 / 3)


def test_latency_model_learns_the_sign_of_the_gain(tmp_path):
    rng = np.random.default_rng(0)
    keys, gains = [], []
    for i in range(40):
        n = int(rng.integers(1, 64))
        big = bool(i % 2)
        shape = [n, 4096 if big else 4]
        key = {"producer": [{"op": "matmul", "mapping": "MtM", "shape": shape, "dtype": "f"}],
               "consumer": [{"op": "transpose", "mapping": "Shuffle", "shape": shape,
                             "dtype": "f"}], "target": "llvm", "id": str(i)}
        keys.append(key)
        gains.append(0.3 if big else -0.3)  # fusing pays off for big tensors only
    model = LatencyModel.train(keys, gains, rounds=50)
    assert model.predict_gain(keys[1]) > 0 > model.predict_gain(keys[0])
    model.save(tmp_path / "model.json")
    assert LatencyModel.load(tmp_path / "model.json").predict_gain(keys[1]) > 0
    db = ProfileDB(tmp_path / "small.sqlite")
    assert not LatencyModel.from_db(db).ready  # fewer than MIN_ROWS rows: it declines
    assert MIN_ROWS > 1



def test_operand_reuse_tells_matmuls_from_row_reductions():
    """A matmul reads each operand element n (or m) times, a row mean once: only the first
    makes an inlined computing prologue expensive."""
    from tvm import te, topi

    from tvm_smartmem.transform.fuse import REUSE_LIMIT, operand_reuse

    a = te.placeholder((8, 32), name="a")
    b = te.placeholder((32, 16), name="b")
    assert operand_reuse(te.create_prim_func([a, b, topi.matmul(a, b)])) == 16
    x = te.placeholder((4, 64), name="x")
    assert operand_reuse(te.create_prim_func([x, topi.sum(x, axis=1)])) == 1
    assert operand_reuse(te.create_prim_func([x, topi.exp(x)])) == 0  # no reduction
    assert 1 <= REUSE_LIMIT < 16
    # a layernorm's variance block reads its own row mean once per element: that buffer is
    # computed in the kernel, not an input a prologue would be inlined into
    g, be = te.placeholder((64,), name="g"), te.placeholder((64,), name="be")
    norm = te.create_prim_func([x, g, be, topi.nn.layer_norm(x, g, be, axis=[1])])
    assert operand_reuse(norm) <= 2


def test_a_computing_prologue_fuses_into_a_layernorm():
    """x + h feeding a layernorm is one kernel: the add is recomputed at most once per
    statistic, cheaper than a kernel and a round trip (a matmul operand would not take it)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8, 64), "float32"))
    h = relax.Var("h", relax.TensorType((8, 64), "float32"))
    g, be = (relax.Var(n, relax.TensorType((64,), "float32")) for n in ("g", "be"))
    with bb.function("main", [x, h, g, be]):
        with bb.dataflow():
            r = bb.emit(relax.op.exp(relax.op.add(x, h)))
            out = bb.emit_output(relax.op.nn.layer_norm(r, g, be, axes=[-1]))
        bb.emit_func_output(out)
    mod = bb.get()
    lowered = smartmem_pipeline(LLVM)(mod)
    assert collect(lowered).kernels == 1
    ex = tvm.compile(mod, LLVM, relax_pipeline=smartmem_pipeline(LLVM))
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype("float32") for s in ((8, 64), (8, 64), (64,), (64,))]
    y = np.exp(args[0].astype("float64") + args[1])
    ref = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5)
    assert_matches(run_vm(ex, args), [(ref * args[2] + args[3]).astype("float32")])


def test_a_bias_add_joins_a_layernorm_but_not_a_matmul():
    """A broadcast (one-to-many: the bias read by every row) into a many-to-many consumer is
    red in DNNFusion's table, which holds for a matmul (each element re-read per output
    column) but not for a normalisation that reads each element a few times: there it is
    one kernel, and numerics hold."""
    def build(consumer):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((8, 64), "float32"))
        b = relax.Var("b", relax.TensorType((64,), "float32"))
        w = relax.Var("w", relax.TensorType((64, 64), "float32"))
        with bb.function("main", [x, b, w]):
            with bb.dataflow():
                r = bb.emit(relax.op.add(relax.op.exp(x), b))
                if consumer == "layernorm":
                    y = relax.op.nn.layer_norm(r, relax.const(np.ones(64, "float32")),
                                               relax.const(np.zeros(64, "float32")), axes=[-1])
                else:
                    y = relax.op.matmul(r, w)
                out = bb.emit_output(y)
            bb.emit_func_output(out)
        return bb.get()

    assert collect(smartmem_pipeline(LLVM)(build("layernorm"))).kernels == 1
    assert collect(smartmem_pipeline(LLVM)(build("matmul"))).kernels == 2
    rng = np.random.default_rng(1)
    x, b, w = (rng.standard_normal(s).astype("float32") for s in ((8, 64), (64,), (64, 64)))
    ex = tvm.compile(build("layernorm"), LLVM, relax_pipeline=smartmem_pipeline(LLVM))
    y = np.exp(x.astype("float64")) + b
    ref = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5)
    assert_matches(run_vm(ex, [x, b, w]), [ref.astype("float32")])


def test_square_fuses_into_a_row_reduction_and_the_residual_into_the_gemm():
    """RMSNorm after a residual: x + h @ W goes into the GEMM's epilogue, x * x into the mean
    (a reduction reading each element once), so no kernel is left for the add / square."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8, 32), "float32"))
    h = relax.Var("h", relax.TensorType((8, 32), "float32"))
    w = relax.Var("w", relax.TensorType((32, 32), "float32"))
    with bb.function("main", [x, h, w]):
        with bb.dataflow():
            r = bb.emit(relax.op.add(x, relax.op.matmul(h, w)))
            ms = bb.emit(relax.op.mean(relax.op.multiply(r, r), axis=[-1], keepdims=True))
            n = bb.emit(relax.op.multiply(r, relax.op.rsqrt(relax.op.add(
                ms, relax.const(1e-6, "float32")))))
            out = bb.emit_output(relax.op.add(n, r))
        bb.emit_func_output(out)
    mod = bb.get()
    assert collect(smartmem_pipeline(LLVM)(mod)).kernels == 2  # GEMM+add, norm+residual
    rng = np.random.default_rng(9)
    xv, hv, wv = (rng.standard_normal(s).astype("float32") for s in ((8, 32), (8, 32), (32, 32)))
    rv = xv + hv @ wv
    expected = rv / np.sqrt((rv * rv).mean(-1, keepdims=True) + 1e-6) + rv
    ex = tvm.compile(mod, LLVM, relax_pipeline="smartmem")
    assert_matches(run_vm(ex, [xv, hv, wv]), [expected])

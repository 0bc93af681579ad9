"""One kernel for softmax(Q K^T * s + mask) V: FusePlan's attention chains and the
FusedAttention schedule rule, run on PoCL against ONNX Runtime and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import LLVM, assert_matches, run_vm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tvm import relax

from tvm_smartmem import frontend, models, numerics, targets
from tvm_smartmem.analysis.stats import collect
from tvm_smartmem.pipeline import UP_TO_KERNELS, smartmem_pipeline
from tvm_smartmem.tir.attention import (
    MAX_KEYS,
    attention_fits,
    attention_pays,
    rows_per_block,
    shared_budget,
)

OPENCL = targets.get("opencl")
CUDA = targets.get("cuda")


def _lowered(mod, target, disable=()):
    with target:
        return smartmem_pipeline(target, phases=UP_TO_KERNELS, disable=disable)(mod)


def _rules(lowered) -> dict[str, str]:
    return {gv.name_hint: str(f.attrs["smartmem.schedule_rule"])
            for gv, f in lowered.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
            and "smartmem.schedule_rule" in f.attrs}


def _softmax_rules(lowered) -> list[str]:
    """The rule of every kernel that computes a softmax (holds its normalising block)."""
    import tvm_ffi
    from tvm import s_tir

    out = []
    for _, f in lowered.functions_items():
        if not isinstance(f, tvm.tirx.PrimFunc):
            continue
        blocks: list = []
        tvm_ffi.structural_walk(f.body, (s_tir.SBlock, blocks.append))
        if any(b.name_hint.startswith("T_softmax_norm") for b in blocks):
            out.append(str(f.attrs["smartmem.schedule_rule"]) if f.attrs is not None and
                       "smartmem.schedule_rule" in f.attrs else "none")
    return out


# model: attentions in it (each one kernel after the pass)
ATTENTIONS = {"bert_layer": 1, "vit_block": 1, "swin_block": 1, "llm_block": 1,
              "mobilevit_block": 1}


@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_models_get_one_attention_kernel_that_matches_onnxruntime(name, dev):
    """BERT (additive padding mask), ViT (17 tokens: a prime, so row tiles are partial),
    Swin (window bias + shift mask added on a 5-D view), the LLaMA-like block (rotary
    embedding, grouped KV heads expanded, causal mask) and MobileViT (unfolded patches):
    every softmax lives in a FusedAttention kernel, the kernel count drops by two per
    attention, and the values on PoCL match ONNX Runtime."""
    model = models.get(name)
    mod, params = frontend.from_onnx(model)
    fused, split = _lowered(mod, OPENCL), _lowered(mod, OPENCL, disable=("FusedAttention",))
    assert _softmax_rules(fused) == ["FusedAttention"] * ATTENTIONS[name]
    assert collect(split).kernels - collect(fused).kernels == 2 * ATTENTIONS[name]
    assert "FusedAttention" not in _rules(split).values()
    inputs = models.random_inputs(model, seed=3)
    ex = tvm.compile(mod, OPENCL, relax_pipeline=smartmem_pipeline(OPENCL))
    assert_matches(run_vm(ex, list(inputs.values()), dev=dev, params=params),
                   numerics.onnxruntime_reference(model, inputs))


def test_cuda_schedules_the_same_kernel():
    mod, _ = frontend.from_onnx(models.get("bert_layer"))
    assert _softmax_rules(_lowered(mod, CUDA)) == ["FusedAttention"]


def test_cpu_keeps_three_kernels():
    """On llvm the kernels stay unscheduled; an attention is not glued there (no rule makes
    it one loop nest worth having), so the CPU build is what it was."""
    mod, _ = frontend.from_onnx(models.get("bert_layer"))
    with LLVM:
        ours = smartmem_pipeline(LLVM, phases=UP_TO_KERNELS)(mod)
        off = smartmem_pipeline(LLVM, phases=UP_TO_KERNELS, disable=("FusedAttention",))(mod)
    assert collect(ours).kernels == collect(off).kernels


# -- hand-built attentions ------------------------------------------------------------------

def _attention_module(b, h, sq, sk, d, dv, mask: str, scale: float, unit_view: bool,
                      softmax_axis: int = -1, scores_out: bool = False):
    """q [b,h,sq,d], k [b,h,sk,d], v [b,h,sk,dv] (+ mask input); returns (module, names)."""
    f32 = "float32"
    q = relax.Var("q", relax.TensorType((b, h, sq, d), f32))
    k = relax.Var("k", relax.TensorType((b, h, sk, d), f32))
    v = relax.Var("v", relax.TensorType((b, h, sk, dv), f32))
    params = [q, k, v]
    m = None
    if mask == "add":
        m = relax.Var("m", relax.TensorType((1, 1, sq, sk), f32))
        params.append(m)
    elif mask == "keys":
        m = relax.Var("m", relax.TensorType((1, 1, 1, sk), f32))
        params.append(m)
    elif mask == "where":
        m = relax.Var("m", relax.TensorType((1, 1, sq, sk), "bool"))
        params.append(m)
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            s = bb.emit(relax.op.matmul(q, relax.op.permute_dims(k, [0, 1, 3, 2])))
            s = bb.emit(relax.op.multiply(s, relax.const(scale, f32)))
            if unit_view:  # Swin's mask is added on a view with one more (unit) axis
                s = bb.emit(relax.op.reshape(s, (1, b, h, sq, sk)))
            if mask in ("add", "keys"):
                s = bb.emit(relax.op.add(s, m))
            elif mask == "where":
                s = bb.emit(relax.op.where(m, s, relax.const(-1e4, f32)))
            if unit_view:
                s = bb.emit(relax.op.reshape(s, (b, h, sq, sk)))
            p = bb.emit(relax.op.nn.softmax(s, axis=softmax_axis))
            o = relax.op.matmul(p, v)
            if scores_out:
                out = bb.emit_output(relax.Tuple([bb.emit(o), s]))
            else:
                out = bb.emit_output(o)
        bb.emit_func_output(out)
    return bb.get(), [p.name for p in params]


def _reference(arrays: dict, mask: str, scale: float, softmax_axis: int = -1) -> np.ndarray:
    q, k, v = (arrays[n].astype(np.float64) for n in "qkv")
    s = q @ np.swapaxes(k, -1, -2) * scale
    if mask in ("add", "keys"):
        s = s + arrays["m"]
    elif mask == "where":
        s = np.where(arrays["m"], s, -1e4)
    s = s - s.max(axis=softmax_axis, keepdims=True)
    p = np.exp(s)
    p = p / p.sum(axis=softmax_axis, keepdims=True)
    return (p @ v).astype("float32")


def _inputs(b, h, sq, sk, d, dv, mask: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {"q": rng.standard_normal((b, h, sq, d)), "k": rng.standard_normal((b, h, sk, d)),
           "v": rng.standard_normal((b, h, sk, dv))}
    if mask in ("add", "keys"):
        shape = (1, 1, sq, sk) if mask == "add" else (1, 1, 1, sk)
        out["m"] = np.where(rng.random(shape) < 0.2, -1e4, 0.0)
        # every row keeps a key, as padding masks do: a row with all keys at -1e4 softmaxes
        # (s1 - 1e4) - (s2 - 1e4), which float32 knows only to ~1e-3 in any implementation
        # (ONNX Runtime's too) -- the float64 reference would measure the input, not the kernel
        out["m"][..., 0] = 0.0
    elif mask == "where":
        out["m"] = np.tril(np.ones((sq, sk), bool))[None, None]  # causal
    return {n: a.astype("bool" if a.dtype == bool else "float32") for n, a in out.items()}


def _run(mod, names, arrays, dev) -> list[np.ndarray]:
    ex = tvm.compile(mod, OPENCL, relax_pipeline=smartmem_pipeline(OPENCL))
    return run_vm(ex, [arrays[n] for n in names], dev=dev)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), h=st.integers(1, 3), sq=st.integers(1, 40), sk=st.integers(2, 70),
       d=st.sampled_from([1, 8, 17, 32, 48, 64]), dv=st.sampled_from([8, 32, 40]),
       mask=st.sampled_from(["none", "add", "keys", "where"]), unit_view=st.booleans(),
       seed=st.integers(0, 99))
def test_random_attentions_match_numpy(b, h, sq, sk, d, dv, mask, unit_view, seed, dev):
    """Random batch / heads / query and key lengths (partial row tiles, keys beyond one warp,
    two keys), head widths below, at and above one warp, each mask form, with or without
    the unit-axis view: one FusedAttention kernel, values within float32 tolerance of a
    float64 numpy reference."""
    scale = 0.9 / np.sqrt(d)  # (a multiply by exactly 1 is a copy, not on the scores)
    mod, names = _attention_module(b, h, sq, sk, d, dv, mask, scale, unit_view)
    assert _softmax_rules(_lowered(mod, OPENCL)) == ["FusedAttention"]
    arrays = _inputs(b, h, sq, sk, d, dv, mask, seed)
    assert_matches(_run(mod, names, arrays, dev), [_reference(arrays, mask, scale)])


def _shared_buffers(lowered) -> set[str]:
    """Names of the attention kernel's shared-memory buffers."""
    import tvm_ffi
    from tvm import s_tir

    (func,) = [f for _, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
               and f.attrs is not None and
               str(f.attrs.get("smartmem.schedule_rule", "")) == "FusedAttention"]
    blocks: list = []
    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, blocks.append))
    return {buf.name for b in blocks for buf in b.alloc_buffers if buf.scope() == "shared"}


@pytest.mark.parametrize("sq,sk,d,dv,mask", [(50, 100, 32, 64, "keys"), (9, 33, 32, 32, "where"),
                                             (3, 70, 16, 32, "none")])
def test_staged_values_match_numpy(sq, sk, d, dv, mask, dev):
    """Heads a multiple of 32 wide take V through shared memory, 32 keys at a time, each lane
    accumulating dv / 32 consecutive outputs (a partial last key tile, a key count of one
    tile plus one, fewer queries than rows): values within float32 tolerance, and the
    kernel really holds the V tile."""
    mod, names = _attention_module(1, 2, sq, sk, d, dv, mask, 0.3, False)
    lowered = _lowered(mod, OPENCL)
    assert _softmax_rules(lowered) == ["FusedAttention"]
    assert {"k_shared", "v_shared"} <= _shared_buffers(lowered)
    arrays = _inputs(1, 2, sq, sk, d, dv, mask, 3)
    assert_matches(_run(mod, names, arrays, dev), [_reference(arrays, mask, 0.3)])


def test_values_stay_in_global_memory_where_no_tile_fits():
    """A head width that is not a multiple of 32, or a V tile that does not fit beside the
    scores in PoCL's 16 KiB: V read from global memory as before."""
    for d, dv, sk in ((16, 40, 64), (64, 64, 150)):
        mod, _ = _attention_module(1, 1, 8, sk, d, dv, "none", 0.3, False)
        assert "v_shared" not in _shared_buffers(_lowered(mod, OPENCL))
    mod, _ = _attention_module(1, 1, 8, 150, 64, 64, "none", 0.3, False)
    assert "v_shared" in _shared_buffers(_lowered(mod, CUDA))  # 32 KiB hold it


def test_stage_values_knob_builds_the_earlier_kernel():
    """FusedAttention(stage_values=False) -- the kernel the H100 measured -- reads V from global
    memory; the default stages it (CUDA's 32 KiB hold the tile)."""
    import tvm_ffi
    from tvm import s_tir

    from tvm_smartmem.tir.attention import FusedAttention

    mod, _ = _attention_module(1, 2, 8, 100, 64, 64, "none", 0.3, False)
    with CUDA:
        fused = smartmem_pipeline(CUDA, phases=("library_dispatch", "graph", "legalize",
                                                 "layout", "fuse"))(mod)
    (func,) = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]

    def shared(rule) -> set[str]:
        scheduled = rule.apply(func, CUDA, False).mod["main"]
        blocks: list = []
        tvm_ffi.structural_walk(scheduled.body, (s_tir.SBlock, blocks.append))
        return {buf.name for b in blocks for buf in b.alloc_buffers if buf.scope() == "shared"}

    assert "v_shared" in shared(FusedAttention())
    assert "v_shared" not in shared(FusedAttention(stage_values=False))
    assert "k_shared" in shared(FusedAttention(stage_values=False))


def _wide_opencl():
    """PoCL's OpenCL device with the thread and shared-memory limits of a desktop GPU (PoCL
    has 4096 work-items and 1 MiB of local memory), so the two-warp kernel's 48 KiB fit."""
    from tvm.target import Target

    attrs = dict(OPENCL.export())
    attrs.pop("host", None)
    attrs.update(max_num_threads=1024, max_threads_per_block=1024,
                 max_shared_memory_per_block=48 * 1024)
    return Target(attrs, host=OPENCL.host)


def _thread_x(lowered) -> set:
    from tvm_smartmem.analysis.thread_extents import kernel_thread_extents

    (func,) = [f for _, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
               and f.attrs is not None and
               str(f.attrs.get("smartmem.schedule_rule", "")) == "FusedAttention"]
    return {x for kernel in kernel_thread_extents(func) for x in kernel.get("threadIdx.x", ())}


@pytest.mark.parametrize("sq,sk,d,dv,mask", [(37, 197, 64, 64, "keys"), (9, 70, 32, 128, "where"),
                                             (3, 64, 16, 64, "none")])
def test_two_warps_a_row_match_numpy(monkeypatch, sq, sk, d, dv, mask, dev):
    """TVM_SMARTMEM_ATTENTION_LANES=64: a query row gets 64 threads (K and V tiles of 64 keys,
    the row statistics reduced across two warps; 197 keys: a partial last tile; 128-wide
    values: two outputs a lane; 64 keys: exactly one tile) -- one kernel of 64 lanes whose
    values on PoCL are within float32 tolerance of numpy."""
    from tvm_smartmem.tir import attention

    monkeypatch.setenv(attention.LANES_ENV, "64")
    monkeypatch.setenv(attention.KEYS_ENV, "256")
    target = _wide_opencl()
    mod, names = _attention_module(1, 2, sq, sk, d, dv, mask, 0.3, False)
    lowered = _lowered(mod, target)
    assert _softmax_rules(lowered) == ["FusedAttention"]
    assert _thread_x(lowered) == {64}
    assert {"k_shared", "v_shared"} <= _shared_buffers(lowered)
    ex = tvm.compile(mod, target, relax_pipeline=smartmem_pipeline(target))
    arrays = _inputs(1, 2, sq, sk, d, dv, mask, 5)
    assert_matches(run_vm(ex, [arrays[n] for n in names], dev=dev),
                   [_reference(arrays, mask, 0.3)])


def test_two_warps_fall_back_to_one_where_they_cannot_apply(monkeypatch):
    """Two warps a row need whole outputs per lane of the staged V loop: a 40-wide head, or
    PoCL's 16 KiB that hold no 64-key tile, keep one warp (32 lanes) -- still one kernel.
    A lane count the rule does not know is a clear error."""
    from tvm_smartmem.errors import SmartMemError
    from tvm_smartmem.tir import attention

    monkeypatch.setenv(attention.LANES_ENV, "64")
    for target, dv in ((_wide_opencl(), 40), (OPENCL, 64)):
        mod, _ = _attention_module(1, 1, 8, 100, 64, dv, "none", 0.3, False)
        lowered = _lowered(mod, target)
        assert _softmax_rules(lowered) == ["FusedAttention"]
        assert _thread_x(lowered) == {32}
    monkeypatch.setenv(attention.LANES_ENV, "48")
    with pytest.raises(SmartMemError, match="LANES"):
        attention.lanes_for()
    with pytest.raises(SmartMemError, match="lanes=16"):
        attention.FusedAttention(lanes=16)


def test_epilogue_reading_the_output_twice_matches_numpy(dev):
    """A hardswish on the attention output (LeViT, once SinkLayoutThroughElementwise moves it
    above the head merge) reads PV's result twice: one kernel that builds for CUDA and OpenCL
    (it failed both with 'used before its definition') and matches numpy on PoCL."""
    b, h, s, d = 1, 2, 16, 32
    q, k, v = (relax.Var(n, relax.TensorType((b, h, s, d), "float32")) for n in "qkv")
    bb = relax.BlockBuilder()
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            sc = bb.emit(relax.op.matmul(q, relax.op.permute_dims(k, [0, 1, 3, 2])))
            p = bb.emit(relax.op.nn.softmax(bb.emit(relax.op.multiply(
                sc, relax.const(0.3, "float32"))), axis=-1))
            o = bb.emit(relax.op.matmul(p, v))
            gate = bb.emit(relax.op.divide(bb.emit(relax.op.clip(bb.emit(relax.op.add(
                o, relax.const(3.0, "float32"))), 0, 6)), relax.const(6.0, "float32")))
            out = bb.emit_output(bb.emit(relax.op.multiply(o, gate)))
        bb.emit_func_output(out)
    mod = bb.get()
    assert _softmax_rules(_lowered(mod, CUDA)) == ["FusedAttention"]
    tvm.compile(mod, CUDA, relax_pipeline=smartmem_pipeline(CUDA))  # source only: no nvcc
    arrays = {n: a * 2 for n, a in _inputs(b, h, s, s, d, d, "none", 5).items()}
    o = _reference(arrays, "none", 0.3)
    assert_matches(_run(mod, list("qkv"), arrays, dev), [o * np.clip(o + 3, 0, 6) / 6])


def test_softmax_over_another_axis_is_not_glued(dev):
    """softmax over the query axis is not an attention: three kernels, still right."""
    mod, names = _attention_module(1, 2, 12, 12, 8, 8, "none", 0.5, False, softmax_axis=2)
    lowered = _lowered(mod, OPENCL)
    assert "FusedAttention" not in _rules(lowered).values()
    arrays = _inputs(1, 2, 12, 12, 8, 8, "none", 0)
    assert_matches(_run(mod, names, arrays, dev), [_reference(arrays, "none", 0.5, 2)])


def test_scores_read_elsewhere_are_not_glued():
    """The scores are also an output: they must reach memory, so no attention kernel."""
    mod, _ = _attention_module(1, 2, 12, 12, 8, 8, "add", 0.5, False, scores_out=True)
    assert "FusedAttention" not in _rules(_lowered(mod, OPENCL)).values()


def test_long_sequences_stay_three_kernels():
    """More keys than the rule's shared-memory tile holds: FusePlan leaves the three kernels
    to the GEMM and reduction rules."""
    keys = MAX_KEYS + 1
    assert not attention_fits(keys, 64)
    mod, _ = _attention_module(1, 1, 4, keys, 16, 16, "none", 0.25, False)
    assert _softmax_rules(_lowered(mod, CUDA)) == ["GeneralReduction"]


def test_key_limits_follow_the_measurements():
    """197 keys (ViT-B / DeiT-S): the H100 measured one kernel faster on CUDA, so FusePlan
    fuses up to 256 keys there; a target kind never measured at that length (OpenCL) keeps
    them split, fusing 128."""
    opencl = OPENCL
    assert attention_fits(197, 64)
    assert attention_pays(197, CUDA) and not attention_pays(257, CUDA)
    assert not attention_pays(197, opencl) and attention_pays(128, opencl)
    assert not attention_pays(197) and attention_pays(160)
    for target, keys, fused in ((CUDA, 197, True), (CUDA, 300, False), (opencl, 197, False),
                                (opencl, 128, True)):
        mod, _ = _attention_module(1, 2, 8, keys, 16, 16, "none", 0.25, False)
        rules = _softmax_rules(_lowered(mod, target))
        assert rules == (["FusedAttention"] if fused else ["GeneralReduction"]), (target, keys)


def test_key_limit_override(monkeypatch):
    """TVM_SMARTMEM_ATTENTION_KEYS moves the measured limit (for building other choices to
    measure); a value that is not a number is a clear error."""
    from tvm_smartmem.errors import SmartMemError

    monkeypatch.setenv("TVM_SMARTMEM_ATTENTION_KEYS", "100")
    assert attention_pays(100, CUDA) and not attention_pays(128, CUDA)
    mod, _ = _attention_module(1, 2, 8, 128, 16, 16, "none", 0.25, False)
    assert _softmax_rules(_lowered(mod, CUDA)) == ["GeneralReduction"]
    monkeypatch.setenv("TVM_SMARTMEM_ATTENTION_KEYS", "many")
    with pytest.raises(SmartMemError, match="TVM_SMARTMEM_ATTENTION_KEYS='many'"):
        attention_pays(10)


def test_rows_per_block_respects_shared_memory():
    assert rows_per_block(128) == 8
    assert rows_per_block(1024) == 4  # 2 buffers x 4 rows x 1024 keys x 4 bytes = 32 KiB
    assert rows_per_block(1024, shared=16384) == 2  # PoCL's OpenCL target
    assert rows_per_block(2048) == 2
    assert rows_per_block(197, max_threads=64) == 2  # 2 rows x 32 lanes
    assert attention_fits(2048, 256) and not attention_fits(128, 257)
    assert attention_fits(1024, 64, shared=8192) and not attention_fits(1025, 64, shared=8192)
    assert shared_budget(OPENCL) == 16384 and shared_budget(CUDA) == 32768


def test_ablation_switch_keeps_the_split_kernels():
    mod, _ = frontend.from_onnx(models.get("bert_layer"))
    on = _lowered(mod, CUDA)
    off = _lowered(mod, CUDA, disable=("FusedAttention",))
    assert _softmax_rules(on) == ["FusedAttention"]
    assert _softmax_rules(off) == ["GeneralReduction"]
    assert collect(off).kernels == collect(on).kernels + 2


def test_planner_glues_attentions_by_target_unless_told():
    """``tune`` and ``FusePlan`` share ``make_planner``: by default attentions are one unit on
    GPU targets only, so tuning on a CPU asks the questions the CPU build will ask."""
    from tvm_smartmem.cost import CostLayer
    from tvm_smartmem.transform.fuse import make_planner

    mod, _ = _attention_module(1, 2, 8, 16, 8, 8, "add", 0.5, False)
    with OPENCL:
        planned = smartmem_pipeline(OPENCL, phases=("library_dispatch", "graph", "legalize",
                                                    "layout"))(mod)

    def units(target, attention=None) -> int:
        return len(make_planner(planned["main"], planned, CostLayer.of(None), target,
                                attention).units)

    assert units(CUDA) == units(OPENCL) < units(LLVM)
    assert units(LLVM, attention=True) == units(CUDA)
    assert units(CUDA, attention=False) == units(LLVM)

"""A layernorm computed inside the GEMM that reads it: FusePlan's norm -> matmul glue and the
NormalisedMatmul schedule rule (``TVM_SMARTMEM_NORM_PROLOGUE=on``), run on PoCL against numpy
and ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import assert_matches, build_function, run_vm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tvm import relax

from tvm_smartmem import frontend, models, numerics, targets
from tvm_smartmem.analysis.stats import collect
from tvm_smartmem.analysis.thread_extents import kernel_launch_sizes
from tvm_smartmem.errors import SmartMemError
from tvm_smartmem.pipeline import UP_TO_KERNELS, smartmem_pipeline
from tvm_smartmem.tir.matmul import SMALL_GRID_ENV
from tvm_smartmem.tir.norm_matmul import (
    ENV,
    SHORT_ROW,
    glued_row_limit,
    norm_prologue_enabled,
    norm_prologue_fits,
    norm_prologue_mode,
)
from tvm_smartmem.transform.split_k import SplitKMatmul

OPENCL = targets.get("opencl")
CUDA = targets.get("cuda")
F32 = "float32"


@pytest.fixture
def on(monkeypatch):
    """The glue on, split-K off: a GEMM split over K reads the norm through a reshape of its
    partial operands, which is not glued (``test_split_gemms_are_left_alone``)."""
    monkeypatch.setenv(ENV, "on")
    monkeypatch.setenv("TVM_SMARTMEM_SPLIT_K", "off")


def _lowered(mod, target, disable=()):
    with target:
        return smartmem_pipeline(target, phases=UP_TO_KERNELS, disable=disable)(mod)


def _rules(lowered) -> list[str]:
    return sorted(str(f.attrs["smartmem.schedule_rule"]) for _, f in lowered.functions_items()
                  if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
                  and "smartmem.schedule_rule" in f.attrs)


def _norm_matmul(rows: tuple, k: int, n: int, rms: bool = False, second_reader: bool = False,
                 epilogue: bool = True, channels_first: bool = False):
    """x [*rows, k] -> layernorm (or RMSNorm) -> matmul w [k, n] (+ bias, GELU).  With
    ``channels_first`` x is [rows[0], k, *rows[1:]] and is transposed channels-last first
    (ConvNeXt's NCHW -> NHWC before each block's layernorm)."""
    def body(v, emit):
        x = v["x"]
        if channels_first:
            x = emit(relax.op.permute_dims(x, [0, *range(2, len(rows) + 1), 1]))
        if rms:
            y = emit(relax.op.nn.rms_norm(x, v["g"], axes=[-1], epsilon=1e-5))
        else:
            y = emit(relax.op.nn.layer_norm(x, v["g"], v["b"], axes=[-1], epsilon=1e-5))
        out = emit(relax.op.matmul(y, v["w"]))
        if epilogue:
            out = emit(relax.op.nn.gelu(emit(relax.op.add(out, v["bias"]))))
        if second_reader:  # the normalised tensor is read twice: it must be written
            out = relax.Tuple([out, emit(relax.op.multiply(y, relax.const(2.0, F32)))])
        return out

    x = (rows[0], k, *rows[1:]) if channels_first else (*rows, k)
    params = {"x": x, "g": (k,), "b": (k,), "w": (k, n), "bias": (n,)}
    return build_function(params, body), list(params)


def _arrays(rows, k, n, seed) -> dict:
    rng = np.random.default_rng(seed)
    # a non-zero mean and a spread of scales per row: the statistics matter
    x = rng.standard_normal((*rows, k)) * rng.uniform(0.5, 4.0, (*rows, 1)) + 1.5
    return {"x": x.astype(F32), "g": rng.standard_normal(k).astype(F32),
            "b": rng.standard_normal(k).astype(F32),
            "w": (rng.standard_normal((k, n)) / np.sqrt(k)).astype(F32),
            "bias": rng.standard_normal(n).astype(F32)}


def _reference(a: dict, rms: bool = False, epilogue: bool = True) -> np.ndarray:
    from scipy.special import erf

    x = a["x"].astype(np.float64)
    if rms:
        y = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * a["g"]
    else:
        y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * \
            a["g"] + a["b"]
    out = y @ a["w"]
    if epilogue:
        out = out + a["bias"]
        out = 0.5 * out * (1 + erf(out / np.sqrt(2)))
    return out.astype(F32)


def _run(mod, names, arrays, dev):
    ex = tvm.compile(mod, OPENCL, relax_pipeline=smartmem_pipeline(OPENCL))
    return run_vm(ex, [arrays[n] for n in names], dev=dev)


def test_switch_defaults_per_target_and_rejects_other_values(monkeypatch):
    """Unset: ``short`` on CUDA (measured, ``gpu_h100_norm_short_7ea0a97.md``), off on OpenCL,
    texture and CPU targets and without a target; set, the switch wins everywhere."""
    monkeypatch.delenv(ENV, raising=False)
    assert not norm_prologue_enabled() and glued_row_limit() is None
    assert norm_prologue_mode(CUDA) == "short" and glued_row_limit(target=CUDA) == SHORT_ROW
    for target in (OPENCL, targets.get("opencl-texture"), targets.get("llvm")):
        assert not norm_prologue_enabled(target)
    monkeypatch.setenv(ENV, "off")
    assert not norm_prologue_enabled(CUDA)
    monkeypatch.setenv(ENV, "short")
    assert norm_prologue_enabled() and glued_row_limit() == SHORT_ROW == 256
    assert norm_prologue_mode(OPENCL) == "short"
    monkeypatch.setenv(ENV, "on")
    assert glued_row_limit() > 4096
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(SmartMemError, match=ENV):
        norm_prologue_enabled()


def test_rows_must_split_evenly_over_the_lanes_and_batches_over_the_tiles():
    """The GEMM's threadIdx.x extent (8 in the measured CUDA / OpenCL configurations) must
    divide the normalised axis; batches folded into the GEMM's rows must fill its 32-row
    tiles; CPU and texture targets never glue."""
    assert norm_prologue_fits((197, 384), CUDA) and norm_prologue_fits((1, 50, 144), OPENCL)
    assert norm_prologue_fits((1, 4, 16, 144), CUDA)  # MobileViT: 64 folded rows
    assert not norm_prologue_fits((2, 9, 48), CUDA)  # 18 folded rows: a padded tile
    assert not norm_prologue_fits((197, 20), CUDA)
    assert not norm_prologue_fits((197, 384), targets.get("llvm"))
    assert not norm_prologue_fits((197, 384), targets.get("opencl-texture"))


@pytest.mark.parametrize("rows,k,n,rms", [((197,), 384, 96, False), ((1, 9), 48, 48, False),
                                          ((1, 40), 16, 80, True)])
def test_one_kernel_that_matches_numpy(rows, k, n, rms, on, dev):
    """DeiT-S-sized rows (a partial last row tile), a unit batch axis, RMSNorm: the norm, the
    GEMM and its bias + GELU epilogue are one NormalisedMatmul kernel (two without the
    switch), values within float32 tolerance of a float64 reference."""
    mod, names = _norm_matmul(rows, k, n, rms=rms)
    fused = _lowered(mod, OPENCL)
    assert _rules(fused) == ["NormalisedMatmul"]
    assert collect(_lowered(mod, OPENCL, disable=("NormalisedMatmul",))).kernels == 2
    assert_matches(_run(mod, names, _arrays(rows, k, n, 1), dev),
                   [_reference(_arrays(rows, k, n, 1), rms=rms)])


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 70), k=st.sampled_from([8, 24, 64, 136]),
       n=st.one_of(st.sampled_from([16, 48, 96]), st.integers(1, 100)),
       rms=st.booleans(), epilogue=st.booleans(), seed=st.integers(0, 99))
def test_random_sizes_match_numpy(m, k, n, rms, epilogue, seed, on, dev):
    """Random row counts (one row, partial tiles), widths and output widths (partial column
    tiles), with and without an epilogue: values within tolerance whatever the planner and
    the rule decide.  Where the glue is off -- one row (a GEMV), a width that is not a
    multiple of 16 -- nothing is glued; where it is on, the rule may still decline a shape
    whose padded tiles ``compute_at`` rejects (seen with a single row tile and a narrow K,
    e.g. 6 x 8 -> 16): the kernel is then scheduled by the fallback rules, slower but exact
    (the switches of ``on`` hold for every example)."""
    mod, names = _norm_matmul((m,), k, n, rms=rms, epilogue=epilogue)
    if m < 2 or n % 16:
        assert "NormalisedMatmul" not in _rules(_lowered(mod, OPENCL))
    arrays = _arrays((m,), k, n, seed)
    assert_matches(_run(mod, names, arrays, dev), [_reference(arrays, rms, epilogue)])


def test_not_glued_where_the_normalised_tensor_is_read_elsewhere(on):
    mod, _ = _norm_matmul((17,), 32, 32, second_reader=True)
    assert "NormalisedMatmul" not in _rules(_lowered(mod, OPENCL))


def test_batches_that_fill_row_tiles(on, dev):
    """MobileViT's layout: patch pixels as a batch axis before the patches, folded by the GEMM
    into its rows (4 x 16 = two row tiles): one kernel, values within tolerance."""
    mod, names = _norm_matmul((1, 4, 16), 48, 64)
    assert _rules(_lowered(mod, OPENCL)) == ["NormalisedMatmul"]
    arrays = _arrays((1, 4, 16), 48, 64, 6)
    assert_matches(_run(mod, names, arrays, dev), [_reference(arrays)])


@pytest.mark.parametrize("channels_first", [False, True])
def test_batches_whose_rows_straddle_a_row_tile(channels_first, on, dev):
    """ConvNeXt's layout: pixels folded into the GEMM's rows (here 8 x 12 = three 32-row
    tiles, the second starting in the middle of a 12-pixel row), the channels read through
    a folded NCHW -> NHWC transpose.  A tile's statistics are then computed flat (not as a
    box over whole pixel rows, which ``bind`` refused, so the kernel fell to the fallback
    rule): one NormalisedMatmul kernel, values within tolerance."""
    mod, names = _norm_matmul((1, 8, 12), 48, 64, channels_first=channels_first)
    assert _rules(_lowered(mod, OPENCL)) == ["NormalisedMatmul"]
    assert _rules(_lowered(mod, CUDA)) == ["NormalisedMatmul"]
    arrays = _arrays((1, 8, 12), 48, 64, 8)
    reference = _reference(arrays)
    if channels_first:
        arrays["x"] = np.ascontiguousarray(arrays["x"].transpose(0, 3, 1, 2))
    assert_matches(_run(mod, names, arrays, dev), [reference])


def test_not_glued_over_batches_that_pad_a_tile(on, dev):
    """Two batches of nine rows: folded, they would pad a row tile; two kernels, and the
    values still match."""
    mod, names = _norm_matmul((2, 9), 48, 32)
    assert "NormalisedMatmul" not in _rules(_lowered(mod, OPENCL))
    arrays = _arrays((2, 9), 48, 32, 4)
    assert_matches(_run(mod, names, arrays, dev), [_reference(arrays)])


def test_not_glued_where_the_lanes_do_not_divide_the_rows(on):
    mod, _ = _norm_matmul((17,), 20, 32)
    assert "NormalisedMatmul" not in _rules(_lowered(mod, CUDA))


def test_split_gemms_are_left_alone(monkeypatch, dev):
    """With split-K on, a few-column GEMM over a long K is split (its partial sums read the
    norm through a reshape): no glue, the measured split stays, and the values still match."""
    monkeypatch.setenv(ENV, "on")
    mod, names = _norm_matmul((197,), 384, 96)
    lowered = _lowered(mod, OPENCL)
    assert "NormalisedMatmul" not in _rules(lowered)
    arrays = _arrays((197,), 384, 96, 2)
    assert_matches(_run(mod, names, arrays, dev), [_reference(arrays)])


def _split(mod, mode: str, monkeypatch) -> list:
    """The GEMMs CUDA's measured split-K policy (792 blocks / 64-long chunks) splits."""
    monkeypatch.setenv(ENV, mode)
    out = SplitKMatmul(CUDA)(mod)
    return [list(map(int, r)) for r in out.attrs["smartmem.split_k"]] \
        if out.attrs is not None and "smartmem.split_k" in out.attrs else []


@pytest.mark.parametrize("k,glued", [(192, True), (384, False)])
def test_short_glues_short_rows_and_keeps_their_gemms_whole(k, glued, monkeypatch, dev):
    """``short``: a 192-wide norm feeding a GEMM that CUDA's policy splits keeps the GEMM
    whole and is glued into it -- one kernel where there were two; a 384-wide one is split as
    measured and not glued.  The values on PoCL stay within tolerance of float64 numpy."""
    mod, names = _norm_matmul((256,), k, 64)
    split = _split(mod, "off", monkeypatch)
    assert [r[:3] for r in split] == [[256, 64, k]]
    assert _split(mod, "short", monkeypatch) == ([] if glued else split)
    kept = SplitKMatmul(CUDA)(mod).attrs  # the switch is still "short"
    assert (kept is not None and "smartmem.split_k_kept_for_norm" in kept) == glued
    if glued:
        assert [list(map(int, r)) for r in kept["smartmem.split_k_kept_for_norm"]] == \
            [[256, 64, k]]
    monkeypatch.setenv(ENV, "off")
    assert collect(_lowered(mod, CUDA)).kernels == 2
    monkeypatch.setenv(ENV, "short")
    assert collect(_lowered(mod, CUDA)).kernels == (1 if glued else 2)
    assert ("NormalisedMatmul" in _rules(_lowered(mod, CUDA))) == glued
    arrays = _arrays((256,), k, 64, 5)
    assert_matches(_run(mod, names, arrays, dev), [_reference(arrays)])


def test_short_does_not_keep_whole_a_gemm_whose_norm_is_read_twice(monkeypatch):
    """A 192-wide norm read by something else as well cannot be a prologue: its GEMM is split
    exactly as without the switch."""
    mod, _ = _norm_matmul((256,), 192, 64, second_reader=True)
    assert _split(mod, "short", monkeypatch) == _split(mod, "off", monkeypatch) != []


@pytest.mark.parametrize("rows,k,n", [((1, 4, 16), 240, 720), ((64,), 240, 480)])
def test_small_grids_keep_the_rule_on_cuda(rows, k, n, on, dev, monkeypatch):
    """MobileViT-S's last stage: 64 rows, 240 wide.  CUDA's GEMM rule shrinks the tiles of so
    small a grid (alone: 8 x 16 outputs a thread block), and glued it keeps them -- also where
    the rows are folded from batch axes (MobileViT's patch pixels), since the statistics are
    computed over flat rows.  Before, an 8-row tile of batch-folded rows could not host them:
    first the glued kernel went to the fallback rule (the build where ``short`` cost
    MobileViT-S a fifth of its time on the H100), then to 16 x 32 tiles.  Values checked on
    PoCL with the small-grid tiles switched on there too, so the kernel that runs has the
    tiles asserted for CUDA."""
    tile = (8, 16)
    monkeypatch.setenv(SMALL_GRID_ENV, "on")
    mod, names = _norm_matmul(rows, k, n)
    expected = [(64 // tile[0]) * -(-n // tile[1])]
    for target in (CUDA, OPENCL):
        lowered = _lowered(mod, target)
        assert _rules(lowered) == ["NormalisedMatmul"]
        glued = [f for _, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
        assert [kernel_launch_sizes(f)[0][1] for f in glued] == expected
    arrays = _arrays(rows, k, n, 8)
    assert_matches(_run(mod, names, arrays, dev), [_reference(arrays)])


def test_cuda_schedules_the_same_kernel(on):
    mod, _ = _norm_matmul((197,), 384, 64)
    assert _rules(_lowered(mod, CUDA)) == ["NormalisedMatmul"]


@pytest.mark.parametrize("name,saved", [("vit_block", 1), ("swin_block", 0)])
def test_models_match_onnxruntime(name, saved, on, dev):
    """A pre-LN ViT block and a Swin block: the layernorms that feed a projection alone are
    computed in it.  A layernorm already in the residual add's kernel (which stores the stream
    besides) only moves, so ViT saves one kernel and Swin none; the values on PoCL match
    ONNX Runtime either way."""
    model = models.get(name)
    mod, params = frontend.from_onnx(model)
    glued = _lowered(mod, OPENCL)
    assert "NormalisedMatmul" in _rules(glued)
    alone = _lowered(mod, OPENCL, disable=("NormalisedMatmul",))
    assert collect(alone).kernels - collect(glued).kernels == saved
    inputs = models.random_inputs(model, seed=5)
    ex = tvm.compile(mod, OPENCL, relax_pipeline=smartmem_pipeline(OPENCL))
    assert_matches(run_vm(ex, list(inputs.values()), dev=dev, params=params),
                   numerics.onnxruntime_reference(model, inputs))


def test_short_on_a_mobilevit_block_matches_onnxruntime(monkeypatch, dev):
    """MobileViT's transformer (rows 64 wide, patch pixels as a batch axis) with ``short`` and
    split-K as shipped: a layernorm goes into the GEMM after it (one kernel fewer), and the
    values on PoCL match ONNX Runtime."""
    model = models.get("mobilevit_block")
    mod, params = frontend.from_onnx(model)
    monkeypatch.setenv(ENV, "off")
    plain = collect(_lowered(mod, OPENCL)).kernels
    monkeypatch.setenv(ENV, "short")
    glued = _lowered(mod, OPENCL)
    assert "NormalisedMatmul" in _rules(glued) and collect(glued).kernels == plain - 1
    inputs = models.random_inputs(model, seed=9)
    ex = tvm.compile(mod, OPENCL, relax_pipeline=smartmem_pipeline(OPENCL))
    assert_matches(run_vm(ex, list(inputs.values()), dev=dev, params=params),
                   numerics.onnxruntime_reference(model, inputs))


def test_results_files_record_the_switches(monkeypatch):
    """A figure taken with a switch on says so in its reproduce command."""
    from tvm_smartmem.bench import env_prefix

    monkeypatch.setenv(ENV, "on")
    monkeypatch.setenv("TVM_SMARTMEM_PROFILE_DB", "none")
    monkeypatch.setenv("TVM_SMARTMEM_ZOO", "/somewhere")
    assert f"{ENV}=on " in env_prefix()
    assert "PROFILE_DB" not in env_prefix() and "ZOO" not in env_prefix()

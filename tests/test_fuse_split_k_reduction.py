"""FuseSplitKReduction: a split-K GEMM sums its own partial products (one kernel, not two)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from conftest import assert_matches
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_split_k import _data, _linear, _reference
from tvm import tirx

from tvm_smartmem import targets
from tvm_smartmem.analysis.shared_memory import device_sources
from tvm_smartmem.report import compile_with
from tvm_smartmem.transform import split_k
from tvm_smartmem.transform.fuse_split_k_reduction import _unfuse

OPENCL = targets.get("opencl")


@pytest.fixture(autouse=True)
def _opencl_too(monkeypatch):
    """By default the pass runs on CUDA only (OpenCL C 1.2 has no device-wide fence); PoCL's
    CPU device has coherent caches, so here it runs on OpenCL too and the
    transformation's numerics are checked by running it."""
    from tvm_smartmem.transform import fuse_split_k_reduction

    monkeypatch.setenv(fuse_split_k_reduction.ENV, "all")


def _vm_calls(ex, dev, inputs: list, params: list) -> list[np.ndarray]:
    """Call ``main`` once per input on ONE virtual machine: the counters the fused kernel
    keeps in its constant must be back at zero after every launch for the next to sum."""
    from tvm_smartmem.measure.runner import flatten_outputs, prepare_weights

    vm = tvm.relax.VirtualMachine(ex, dev)

    def up(arrays):
        return [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]

    weights = prepare_weights(vm, up(params))
    return [flatten_outputs(vm["main"](*up([x]), *weights))[0] for x in inputs]


def _compile(mod, disable: bool = False):
    """(executable, statistics) of the smartmem OpenCL build, with or without the fusion."""
    from tvm_smartmem.analysis.stats import collect
    from tvm_smartmem.pipeline import smartmem_pipeline

    skip = ("FuseSplitKReduction",) if disable else ()
    with OPENCL:
        lowered = smartmem_pipeline(OPENCL, disable=skip)(mod)
    return tvm.compile(lowered, OPENCL, relax_pipeline=None), collect(lowered)


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(2, 70), k_steps=st.integers(1, 6), n=st.sampled_from([32, 64, 96, 160]),
       lead=st.sampled_from([(1,), (2,), (3,)]), factor=st.sampled_from([2, 4, 8]),
       epilogue=st.sampled_from(["none", "gelu"]))
def test_fused_split_gemms_match_numpy_call_after_call(monkeypatch, m, k_steps, n, lead,
                                                        factor, epilogue):
    """Random GEMM shapes (rows not a multiple of the tile, several row tiles, leading batch
    axes folded into the rows) on PoCL: one kernel where the unfused build has two, the
    outputs of three successive calls with different inputs each match numpy (a counter left
    non-zero by a call would leave the next call's output unwritten)."""
    from tvm_smartmem.runtime import opencl

    dev = opencl.require_device()
    k = k_steps * factor * 32
    monkeypatch.setenv(split_k.ENV, str(factor))
    mod = _linear(m, k, n, lead, epilogue)
    ex, stats = _compile(mod)
    _, unfused = _compile(mod, disable=True)
    assert stats.kernels == 1 and unfused.kernels == 2
    assert any(kt.name.endswith("_splitk") for kt in stats.kernel_table)
    _, w, b = _data(m, k, n, lead)
    xs = [_data(m, k, n, lead, seed=s)[0] for s in (1, 2, 3)]
    for x, out in zip(xs, _vm_calls(ex, dev, xs, [w, b]), strict=True):
        assert_matches([out], [_reference(x, w, b, epilogue).astype("float32")])


def test_the_sum_is_the_unfused_kernels_sum(monkeypatch):
    """The last block adds the partial products in the order 0 .. S-1, as the separate
    kernel did: on PoCL the two builds agree to the last bit."""
    from tvm_smartmem.runtime import opencl

    dev = opencl.require_device()
    monkeypatch.setenv(split_k.ENV, "4")
    mod = _linear(48, 512, 96, (1,), "gelu")
    x, w, b = _data(48, 512, 96)
    fused = _vm_calls(_compile(mod)[0], dev, [x], [w, b])[0]
    unfused = _vm_calls(_compile(mod, disable=True)[0], dev, [x], [w, b])[0]
    np.testing.assert_array_equal(fused, unfused)


@pytest.mark.parametrize("batch", [3, 64])
def test_batched_tail_loads_give_the_same_bits(monkeypatch, batch):
    """TVM_SMARTMEM_SPLIT_K_TAIL_BATCH: the last block loads the partial products of several
    outputs a thread before summing any (3: not a divisor of the tile's steps, so the last
    group has slots past the tile; 64: more than the steps, all loads first).  The sums keep
    their order: on PoCL the build agrees to the last bit with the unfused one, call after
    call."""
    from tvm_smartmem.runtime import opencl
    from tvm_smartmem.transform import fuse_split_k_reduction

    dev = opencl.require_device()
    monkeypatch.setenv(split_k.ENV, "4")
    monkeypatch.setenv(fuse_split_k_reduction.TAIL_ENV, str(batch))
    mod = _linear(45, 512, 96, (1,), "gelu")
    xs = [_data(45, 512, 96, seed=s)[0] for s in (1, 2)]
    _, w, b = _data(45, 512, 96)
    ex, stats = _compile(mod)
    assert stats.kernels == 1
    fused = _vm_calls(ex, dev, xs, [w, b])
    unfused = _vm_calls(_compile(mod, disable=True)[0], dev, xs, [w, b])
    for f, u in zip(fused, unfused, strict=True):
        np.testing.assert_array_equal(f, u)


def test_cuda_fuses_by_default_opencl_does_not(monkeypatch):
    """With no switch set, a split GEMM is one kernel on CUDA (measured at par with the
    separate sum on the H100) and stays two on OpenCL (no device-wide fence there)."""
    from tvm_smartmem.transform import fuse_split_k_reduction

    monkeypatch.delenv(fuse_split_k_reduction.ENV)
    monkeypatch.setenv(split_k.ENV, "4")
    mod = _linear(48, 512, 96, (1,), "gelu")
    _, cuda, _ = compile_with(mod, targets.get("cuda"), "smartmem")
    _, opencl = _compile(mod)
    assert cuda.kernels == 1 and opencl.kernels == 2


def test_batched_tail_issues_its_loads_first(monkeypatch):
    """In the default CUDA kernel (a batch of 4) each group's 4 x S partial products are
    loaded (__ldcg into registers) before the first output of the group is written; a batch
    that is not a positive integer is a clear error."""
    import re

    from tvm_smartmem.transform import fuse_split_k_reduction

    monkeypatch.delenv(fuse_split_k_reduction.ENV)
    monkeypatch.delenv(fuse_split_k_reduction.TAIL_ENV, raising=False)
    monkeypatch.setenv(split_k.ENV, "8")
    ex, stats, _ = compile_with(_linear(128, 768, 768, (1,), "none"), targets.get("cuda"),
                                "smartmem")
    assert stats.kernels == 1
    src = device_sources(ex)
    tail = src[src.index("atomicAdd("):]
    loads = [m.start() for m in re.finditer(r"splitk_partials_ptr\[\d+\] = __ldcg", tail)]
    stores = [m.start() for m in re.finditer(r"\n\s*T_\w+_ptr\[", tail)]
    assert len(loads) % 32 == 0 and loads and stores
    # the first group's 32 loads all precede the group's first store
    assert loads[31] < stores[0]
    monkeypatch.setenv(fuse_split_k_reduction.TAIL_ENV, "0")
    with pytest.raises(ValueError, match="TAIL_BATCH"):
        fuse_split_k_reduction.tail_batch()


def test_a_normalising_sum_keeps_its_kernel(monkeypatch):
    """A partial sum the planner fused with a layernorm is a row reduction, not an
    element-wise block: it stays a kernel of its own (the pass declines, the counts of the
    unfused build are kept)."""
    monkeypatch.setenv(split_k.ENV, "4")
    mod = _linear(40, 512, 512, (1,), "residual_layernorm")
    _, stats = _compile(mod)
    _, unfused = _compile(mod, disable=True)
    assert stats.kernels == unfused.kernels == 2
    assert not any(kt.name.endswith("_splitk") for kt in stats.kernel_table)


def test_cuda_code_counts_fences_and_reads_past_l1(monkeypatch):
    """The CUDA kernel: a device-wide fence before the count, an atomic count, partial
    products read with __ldcg (from L2: other multiprocessors wrote them)."""
    monkeypatch.setenv(split_k.ENV, "8")
    cuda = targets.get("cuda")
    ex, stats, _ = compile_with(_linear(128, 768, 768, (1,), "gelu"), cuda, "smartmem")
    assert stats.kernels == 1
    src = device_sources(ex)
    assert src.count("atomicAdd(") == 1 and src.count("__threadfence()") == 2
    # the 8 partial products of each output a thread writes, each read once (into a
    # variable: GELU reads the sum twice, and the compiler does not merge __ldcg calls)
    reads = src.count("__ldcg(")
    assert reads and reads % 8 == 0 and src.count(" = __ldcg(") == reads


def test_opencl_declines_partials_sharing_cache_lines(monkeypatch):
    """OpenCL C has no load past L1: where a cache line would hold two tiles' partials (72
    columns: rows of 288 bytes) the sum stays a kernel of its own."""
    monkeypatch.setenv(split_k.ENV, "4")
    _, stats = _compile(_linear(40, 512, 72, (1,), "gelu"))
    assert stats.kernels == 2


def _ivs(*extents):
    return [tirx.IterVar(tvm.ir.Range.from_min_extent(0, e), tirx.Var(f"v{k}", "int32"),
                         tirx.IterVar.DataPar) for k, e in enumerate(extents)]


def test_unfuse_recovers_row_major_fusions():
    v0, v1, v2 = _ivs(2, 40, 96)
    assert [(str(v), s, e) for v, s, e in _unfuse(v0.var * 40 + v1.var, [v0, v1, v2], 80)] \
        == [("v0", 40, 2), ("v1", 1, 40)]
    assert [(str(v), s, e) for v, s, e in _unfuse(v2.var, [v0, v1, v2], 96)] == [("v2", 1, 96)]
    assert _unfuse(v1.var * 2 + v0.var, [v0, v1, v2], 80) is None  # column-major: refused
    assert _unfuse(v0.var * 40 + v1.var, [v0, v1, v2], 96) is None  # wrong extent
    u0, u1 = _ivs(1, 40)
    assert [(str(v), s, e) for v, s, e in _unfuse(u0.var * 40 + u1.var, [u0, u1], 40)] == \
        [("v1", 1, 40)]


@pytest.mark.parametrize("m", [1, 33])
def test_split_factor_and_tiles_cover_every_output(monkeypatch, m):
    """Fewer rows than one tile and a partial second tile: every output still written."""
    from tvm_smartmem.runtime import opencl

    dev = opencl.require_device()
    monkeypatch.setenv(split_k.ENV, "2")
    mod = _linear(m, 256, 160, (1,), "none")
    ex, stats = _compile(mod)
    assert stats.kernels == 1 or m == 1  # a single row is a GEMV: never split
    x, w, b = _data(m, 256, 160)
    out = _vm_calls(ex, dev, [x], [w, b])[0]
    assert_matches([out], [_reference(x, w, b, "none").astype("float32")])
    assert math.isfinite(float(np.abs(out).max()))


def test_the_environment_switch_and_the_default_targets(monkeypatch):
    """``off`` leaves the pairs apart, ``on`` (the default) fuses on CUDA only (OpenCL has no
    device-wide fence), ``all`` on OpenCL too; anything else is an error naming the values."""
    from tvm_smartmem.transform import fuse_split_k_reduction

    monkeypatch.setenv(split_k.ENV, "4")
    mod = _linear(40, 512, 96, (1,), "gelu")
    cuda = targets.get("cuda")
    monkeypatch.setenv(fuse_split_k_reduction.ENV, "off")
    assert _compile(mod)[1].kernels == 2
    assert compile_with(mod, cuda, "smartmem")[1].kernels == 2
    monkeypatch.setenv(fuse_split_k_reduction.ENV, "on")
    assert _compile(mod)[1].kernels == 2
    assert compile_with(mod, cuda, "smartmem")[1].kernels == 1
    monkeypatch.setenv(fuse_split_k_reduction.ENV, "all")
    assert _compile(mod)[1].kernels == 1
    monkeypatch.setenv(fuse_split_k_reduction.ENV, "sometimes")
    with pytest.raises(Exception, match="on, all, off"):
        _compile(mod)

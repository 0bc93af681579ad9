"""TunedMatmul: the GEMM knobs come from the measured table, per target, and stay correct."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from conftest import assert_matches
from tvm import relax
from tvm.s_tir.dlight import gpu

from tvm_smartmem import targets
from tvm_smartmem.pipeline import SMARTMEM_PASSES, smartmem_pipeline
from tvm_smartmem.tir import matmul
from tvm_smartmem.tir.matmul import TunedMatmul, load_table, target_key


def _gemm(m=48, k=40, n=24, batch=()):
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((*batch, m, k), "float32"))
    b = relax.Var("b", relax.TensorType((*batch, k, n), "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.gelu(relax.op.matmul(a, b)))
        bb.emit_func_output(out)
    return bb.get()


def test_the_shipped_table_names_its_measurement():
    table = load_table()
    assert set(table) == {"cuda", "opencl", "opencl-texture"}
    for key in ("cuda", "opencl"):
        assert table[key]["measured"] == "benchmarks/results/matmul_sweep_h100.json"
        gpu.Matmul.Config(**table[key]["config"])  # every knob is one dlight knows
    texture = table["opencl-texture"]
    assert texture["measured"] == "benchmarks/results/texture_matmul_h100.json"
    assert texture["texture_weights"] in ("image", "buffer")


def test_each_target_gets_its_own_knobs():
    rule = TunedMatmul()
    table = load_table()
    opencl = rule.get_configs(targets.get("opencl"))
    assert opencl == gpu.Matmul.Config(**table["opencl"]["config"])
    assert opencl != gpu.Matmul().get_configs(targets.get("opencl"))  # not dlight's generic one
    # a phone keeps dlight's mobile setting: the table was measured on a desktop GPU
    adreno = targets.get("adreno")
    assert target_key(adreno) is None
    assert rule.get_configs(adreno) == gpu.Matmul().get_configs(adreno)


def test_a_table_of_your_own(tmp_path, monkeypatch):
    own = tmp_path / "mine.json"
    config = dict(load_table()["opencl"]["config"], micro_size_k=8)
    own.write_text(json.dumps({"opencl": {"config": config, "measured": "here"}}))
    monkeypatch.setenv(matmul.ENV, str(own))
    load_table.cache_clear()
    try:
        assert TunedMatmul().get_configs(targets.get("opencl")).micro_size_k == 8
        own.write_text(json.dumps({"opencl": {"config": {"tile": 3}}}))
        load_table.cache_clear()
        with pytest.raises(ValueError, match="unknown matmul knob"):
            TunedMatmul().get_configs(targets.get("opencl"))
    finally:
        monkeypatch.delenv(matmul.ENV)
        load_table.cache_clear()


@pytest.mark.parametrize("batch", [(), (3,)])
def test_tuned_gemm_with_an_epilogue_matches_numpy_on_opencl(batch):
    """Odd sizes (not multiples of the 64 x 32 tile) and a fused gelu, run on PoCL."""
    from tvm_smartmem.runtime import opencl

    dev = opencl.require_device()
    mod = _gemm(batch=batch)
    tgt = targets.get("opencl")
    ex = tvm.compile(mod, tgt, relax_pipeline=smartmem_pipeline(tgt))
    rules = [f.attrs["smartmem.schedule_rule"] for f in
             smartmem_pipeline(tgt)(mod).functions.values()
             if isinstance(f, tvm.tirx.PrimFunc)]
    assert rules == ["TunedMatmul"]
    rng = np.random.default_rng(0)
    a = rng.standard_normal((*batch, 48, 40)).astype("float32")
    b = rng.standard_normal((*batch, 40, 24)).astype("float32")
    vm = relax.VirtualMachine(ex, dev)
    out = vm["main"](tvm.runtime.tensor(a, dev), tvm.runtime.tensor(b, dev)).numpy()
    x = a.astype("float64") @ b.astype("float64")
    from math import erf, sqrt

    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / sqrt(2))))
    assert_matches([out], [gelu(x).astype("float32")])


def test_the_ablation_can_switch_it_off():
    assert "TunedMatmul" in SMARTMEM_PASSES
    tgt = targets.get("opencl")
    lowered = smartmem_pipeline(tgt, disable=("TunedMatmul",))(_gemm())
    rules = {f.attrs["smartmem.schedule_rule"] for f in lowered.functions.values()
             if isinstance(f, tvm.tirx.PrimFunc)}
    assert rules == {"Matmul"}


def _grid(lowered) -> int:
    from tvm_smartmem.analysis.thread_extents import kernel_launch_sizes

    (func,) = [f for f in lowered.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    return kernel_launch_sizes(func)[0][1]


def test_small_grids_get_smaller_micro_tiles_on_cuda(monkeypatch):
    """A batched GEMM whose grid would leave multiprocessors without a block (DeiT-S's PV
    shape: 6 x 197 x 64, 42 blocks with dlight's tiles) is scheduled on CUDA -- by default,
    measured faster on the H100 -- with micro tiles halved until it gives each of 132 a
    block; a GEMM that already fills them is left alone; TVM_SMARTMEM_SMALL_GRID_TILES=off
    keeps dlight's tiles, and OpenCL keeps them unless the switch is on; another value is a
    clear error."""
    cuda = targets.get("cuda")
    small = _gemm(197, 197, 64, batch=(6,))
    big = _gemm(512, 64, 512, batch=(6,))
    monkeypatch.delenv(matmul.SMALL_GRID_ENV, raising=False)
    assert matmul.small_grid_tiles(cuda) and not matmul.small_grid_tiles(targets.get("opencl"))
    with cuda:
        default = [_grid(smartmem_pipeline(cuda)(m)) for m in (small, big)]
        monkeypatch.setenv(matmul.SMALL_GRID_ENV, "off")
        off = [_grid(smartmem_pipeline(cuda)(m)) for m in (small, big)]
    assert off[0] == 42 and default[0] >= 132
    assert default[1] == off[1] >= 132
    monkeypatch.setenv(matmul.SMALL_GRID_ENV, "on")
    assert matmul.small_grid_tiles(targets.get("opencl"))
    monkeypatch.setenv(matmul.SMALL_GRID_ENV, "maybe")
    with pytest.raises(ValueError, match="SMALL_GRID_TILES"):
        matmul.small_grid_tiles(cuda)


def test_small_grid_tiles_match_numpy_on_opencl(monkeypatch):
    """The re-scheduled GEMM (more, smaller blocks; rows and columns not multiples of the
    tile, a fused gelu) on PoCL: values within float32 tolerance of numpy."""
    from math import erf, sqrt

    from tvm_smartmem.runtime import opencl

    dev = opencl.require_device()
    tgt = targets.get("opencl")
    mod = _gemm(37, 40, 24, batch=(3,))
    with tgt:
        monkeypatch.setenv(matmul.SMALL_GRID_ENV, "off")
        plain = _grid(smartmem_pipeline(tgt)(mod))
        monkeypatch.setenv(matmul.SMALL_GRID_ENV, "on")
        assert _grid(smartmem_pipeline(tgt)(mod)) > plain
    ex = tvm.compile(mod, tgt, relax_pipeline=smartmem_pipeline(tgt))
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 37, 40)).astype("float32")
    b = rng.standard_normal((3, 40, 24)).astype("float32")
    out = relax.VirtualMachine(ex, dev)["main"](tvm.runtime.tensor(a, dev),
                                               tvm.runtime.tensor(b, dev)).numpy()
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / sqrt(2))))
    assert_matches([out], [gelu(a.astype("float64") @ b.astype("float64")).astype("float32")])

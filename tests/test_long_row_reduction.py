"""LongRowReduction: few long rows (GroupNorm) on the widest thread block, run on PoCL."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import assert_matches, run_vm
from test_recognise_norm import _group_norm_onnx

from tvm_smartmem import frontend, numerics, targets
from tvm_smartmem.pipeline import UP_TO_KERNELS, smartmem_pipeline


def _kernel_rules(mod, target) -> dict[str, str]:
    with target:
        lowered = smartmem_pipeline(target, phases=UP_TO_KERNELS)(mod)
    return {gv.name_hint: str(f.attrs["smartmem.schedule_rule"])
            for gv, f in lowered.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
            and "smartmem.schedule_rule" in f.attrs}


def test_group_norm_with_long_rows_takes_the_rule_and_matches_onnxruntime(dev):
    """32 groups of 16 channels x 64 x 64 (the VAE decoder's 64x64 GroupNorm): the norm +
    SiLU kernel is scheduled by LongRowReduction and its values match ONNX Runtime on
    PoCL; the convolution after it is not a row reduction and keeps its rule."""
    model = _group_norm_onnx(c=512, h=64, w=64, groups=32, affine=True, conv=True)
    mod, params = frontend.from_onnx(model)
    opencl = targets.get("opencl")
    rules = _kernel_rules(mod, opencl)
    norm = [r for name, r in rules.items() if "instance_norm" in name]
    assert norm == ["LongRowReduction"]
    assert "LongRowReduction" not in [r for name, r in rules.items() if "conv" in name]
    x = np.random.default_rng(0).standard_normal((1, 512, 64, 64)).astype("float32") + 1
    ex = tvm.compile(mod, opencl, relax_pipeline=smartmem_pipeline(opencl))
    assert_matches(run_vm(ex, [x], dev=dev, params=params),
                   numerics.onnxruntime_reference(model, {"x": x}))


@pytest.mark.parametrize("shape,groups", [((1, 64, 6, 6), 8), ((2, 256, 64, 64), 32)])
def test_short_rows_and_many_rows_stay_with_general_reduction(shape, groups):
    """Rows of 288 elements, or 64 rows (still few) of 32 768: not long enough; dlight's
    general reduction schedules them as before."""
    model = _group_norm_onnx(n=shape[0], c=shape[1], h=shape[2], w=shape[3], groups=groups,
                             conv=True)
    mod, _ = frontend.from_onnx(model)
    rules = _kernel_rules(mod, targets.get("cuda"))
    assert [r for name, r in rules.items() if "instance_norm" in name] == ["GeneralReduction"]


def test_ablation_can_switch_the_rule_off():
    model = _group_norm_onnx(c=512, h=64, w=64, groups=32, conv=True)
    mod, _ = frontend.from_onnx(model)
    cuda = targets.get("cuda")
    with cuda:
        lowered = smartmem_pipeline(cuda, phases=UP_TO_KERNELS,
                                    disable=("LongRowReduction",))(mod)
    rules = {gv.name_hint: str(f.attrs["smartmem.schedule_rule"])
             for gv, f in lowered.functions_items() if "instance_norm" in gv.name_hint}
    assert list(rules.values()) == ["GeneralReduction"]

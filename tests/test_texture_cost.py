"""The per-tensor image / buffer cost model (``cost.texture``) and PackActivationsToTexture
deciding by it, tensor by tensor."""

from __future__ import annotations

import json

import pytest
from conftest import assert_matches
from test_texture_activations import _mlp, _placement, _run
from tvm import te, topi

from tvm_smartmem.cost.texture import image_estimate, kernel_kind, kind_ratio
from tvm_smartmem.tir.matmul import load_table


def _prim(fn, *shapes):
    args = [te.placeholder(s, "float32", name=f"a{i}") for i, s in enumerate(shapes)]
    return te.create_prim_func([*args, fn(*args)])


def _attention(q, k, v):
    """softmax(q k^T) v as four reductions (what FusePlan hands FusedAttention)."""
    n, d = q.shape
    j = te.reduce_axis((0, d), "j")
    s = te.compute((n, n), lambda a, b: te.sum(q[a, j] * k[b, j], axis=j), "S")
    r1 = te.reduce_axis((0, n), "r1")
    m = te.compute((n,), lambda a: te.max(s[a, r1], axis=r1), "M")
    r2 = te.reduce_axis((0, n), "r2")
    z = te.compute((n,), lambda a: te.sum(te.exp(s[a, r2] - m[a]), axis=r2), "Z")
    p = te.compute((n, n), lambda a, b: te.exp(s[a, b] - m[a]) / z[a], "P")
    r3 = te.reduce_axis((0, n), "r3")
    return te.compute((n, d), lambda a, e: te.sum(p[a, r3] * v[r3, e], axis=r3), "O")


def test_kernels_are_classified_by_their_loops():
    assert kernel_kind(_prim(lambda a, b: topi.matmul(a, b), (8, 16), (16, 4))) == "gemm"
    assert kernel_kind(_prim(lambda a, b: topi.nn.batch_matmul(a, b), (2, 8, 16),
                             (2, 4, 16))) == "gemm"
    assert kernel_kind(_prim(lambda x, w: topi.nn.conv2d_nchw(x, w, 1, 1, 1), (1, 8, 6, 6),
                             (4, 8, 3, 3))) == "conv"
    # a depthwise convolution reduces a 3 x 3 window: it reads like a pooling
    assert kernel_kind(_prim(lambda x, w: topi.nn.depthwise_conv2d_nchw(x, w, 1, 1, 1),
                             (1, 8, 6, 6), (8, 1, 3, 3))) == "reduction"
    assert kernel_kind(_prim(lambda x: topi.nn.softmax(x, axis=1), (4, 12))) == "reduction"
    assert kernel_kind(_prim(lambda x: topi.nn.pool2d(x, (2, 2), (2, 2), (1, 1),
                                                      (0, 0, 0, 0), "max"),
                             (1, 4, 8, 8))) == "reduction"
    assert kernel_kind(_prim(lambda x: topi.exp(x), (4, 12))) == "elementwise"
    assert kernel_kind(_prim(_attention, (16, 8), (16, 8), (16, 8))) == "attention"


def test_the_estimate_is_the_mean_ratio_and_unmeasured_kinds_take_the_mean():
    ratios = {"gemm": 0.5, "reduction": 3.0}
    assert image_estimate(["gemm", "gemm"], ratios).ratio == 0.5
    est = image_estimate(["gemm", "reduction"], ratios)
    assert est.ratio == 1.75 and not est.pays
    assert "1.75x" in est.describe("Some GPU") and "gemm, reduction" in est.describe("Some GPU")
    assert kind_ratio("conv", ratios) == 1.75  # unmeasured: the mean of the measured kinds
    with pytest.raises(ValueError, match="names none of the kinds"):
        kind_ratio("gemm", {"tensor_cores": 0.1})


@pytest.fixture
def ratios_table(tmp_path, monkeypatch):
    """A knob table whose opencl-texture entry has the given ratios (the policy: measured)."""
    def write(ratios: dict, device: str = "Some GPU"):
        own = {key: dict(entry) for key, entry in load_table().items()}
        own["opencl-texture"] = {"texture_time_ratio": ratios, "device": device}
        path = tmp_path / "configs.json"
        path.write_text(json.dumps(own))
        monkeypatch.setenv("TVM_SMARTMEM_MATMUL_CONFIGS", str(path))
        monkeypatch.setenv("TVM_SMARTMEM_TEXTURE_ACTIVATIONS", "measured")
        load_table.cache_clear()

    yield write
    monkeypatch.delenv("TVM_SMARTMEM_MATMUL_CONFIGS", raising=False)
    load_table.cache_clear()


def test_each_tensor_is_placed_by_its_own_kernels(ratios_table, dev):
    """Where GEMMs read images faster (0.5) and row reductions slower (3.0): the MLP's hidden
    activation (GEMM -> GEMM) goes to an image, the residual sum (GEMM -> layernorm, mean
    1.75) stays a buffer with the model's reason; the mixed build matches numpy on PoCL."""
    ratios_table({"gemm": 0.5, "reduction": 3.0})
    mod, args, params, refs = _mlp(16, 64, 128)
    record = _placement(mod)
    assert record["images"] == {"hidden": "32x16x1"}
    assert record["estimates"] == {"hidden": 0.5, "summed": 1.75}
    assert record["kept"] == {"summed": "cost model: images estimated 1.75x the buffer time "
                                        "of its kernels (gemm, reduction) on Some GPU"}
    assert_matches(_run(mod, args, params, dev), refs)


def test_the_shipped_h100_ratios_keep_every_activation_in_buffers(monkeypatch):
    """Measured on the H100 every kind of kernel is slower on images: nothing is placed, and
    each tensor says why (the estimate of its own kernels)."""
    monkeypatch.delenv("TVM_SMARTMEM_MATMUL_CONFIGS", raising=False)
    monkeypatch.setenv("TVM_SMARTMEM_TEXTURE_ACTIVATIONS", "measured")
    load_table.cache_clear()
    mod, *_ = _mlp(16, 64, 128)
    record = _placement(mod)
    assert record["images"] == {}
    assert set(record["kept"]) == {"hidden", "summed"}
    assert all("NVIDIA H100" in why for why in record["kept"].values())
    assert record["estimates"]["hidden"] == pytest.approx(1.41)
    assert record["estimates"]["summed"] == pytest.approx((1.41 + 1.33) / 2, abs=1e-3)


def test_always_and_never_override_the_model(ratios_table):
    ratios_table({"gemm": 0.5, "reduction": 3.0})
    mod, *_ = _mlp(16, 64, 128)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TVM_SMARTMEM_TEXTURE_ACTIVATIONS", "always")
        assert set(_placement(mod)["images"]) == {"hidden", "summed"}
        mp.setenv("TVM_SMARTMEM_TEXTURE_ACTIVATIONS", "never")
        assert _placement(mod)["images"] == {}


def test_measured_profiles_become_ratios_per_kind():
    """Kernels paired by name (``_texture`` suffix), same calls, time summed per kind;
    unpaired, unknown-kind or differently-called kernels are left out."""
    from tvm_smartmem.cost.texture import ratios_from_profiles

    plain = [{"kernel": "mm", "calls": 12, "total_us": 100.0},
             {"kernel": "mm2", "calls": 12, "total_us": 300.0},
             {"kernel": "attn", "calls": 12, "total_us": 50.0},
             {"kernel": "norm", "calls": 2, "total_us": 10.0}]
    tex = [{"kernel": "mm_texture", "calls": 12, "total_us": 150.0},
           {"kernel": "mm2_texture", "calls": 12, "total_us": 410.0},
           {"kernel": "attn_texture", "calls": 12, "total_us": 200.0},
           {"kernel": "norm_texture", "calls": 3, "total_us": 20.0},  # other call count
           {"kernel": "lonely_texture", "calls": 1, "total_us": 5.0}]
    kinds = {"mm_texture": "gemm", "mm2_texture": "gemm", "attn_texture": "attention",
             "norm_texture": "reduction", "lonely_texture": "elementwise"}
    got = ratios_from_profiles([(plain, tex, kinds)])
    assert got == {"attention": {"ratio": 4.0, "kernels": 1, "buffer_us": 50.0,
                                 "texture_us": 200.0},
                   "gemm": {"ratio": 1.4, "kernels": 2, "buffer_us": 400.0,
                            "texture_us": 560.0}}


def test_bundles_record_kernel_kinds_and_results_become_the_table(tmp_path):
    """The facts of a compiled build name each kernel's kind (what the GPU bundle carries to
    its profile); a results file with both OpenCL builds profiled becomes the table entry."""
    import sys
    from pathlib import Path

    from tvm_smartmem import targets
    from tvm_smartmem.report import compile_with_facts

    mod, *_ = _mlp(16, 64, 128)
    _, _, _, facts = compile_with_facts(mod, targets.get("opencl"), "smartmem")
    kinds = facts["kernel_kinds"]
    assert set(kinds.values()) <= {"attention", "gemm", "conv", "reduction", "elementwise"}
    assert sorted(kinds.values()).count("gemm") == 2  # the two linear layers

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import texture_activations as ta

    profile = [{"kernel": k, "calls": 1, "total_us": 10.0} for k in kinds]
    results = {"machine": {"cuda_device": "Some GPU"}, "models": {"mlp": {"builds": {
        "smartmem-opencl": {"profile_us": profile},
        "smartmem-opencl-texture": {"kernel_kinds": kinds, "profile_us": [
            {**row, "total_us": 20.0 if kinds[row["kernel"]] == "gemm" else 5.0}
            for row in profile]}}}}}
    ratios, used = ta.profile_ratios(results)
    assert used == ["mlp"] and ratios["gemm"]["ratio"] == 2.0
    table = ta.adopt_ratios({"opencl-texture": {"texture_activations": "buffer",
                                                "texture_weights": "buffer"}},
                            ratios, "x.json", "Some GPU")
    entry = table["opencl-texture"]
    assert entry["texture_time_ratio"]["gemm"] == 2.0 and entry["device"] == "Some GPU"
    assert "texture_activations" not in entry and entry["texture_weights"] == "buffer"

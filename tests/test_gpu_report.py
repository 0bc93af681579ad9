"""benchmarks/gpu_machine.py on this machine: merging results of several bundles measured in one
device call, and the speedup pairs the report computes from them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_machine as gm


def _results(builds: dict[str, float], commit: str) -> dict:
    return {"manifest": {"git_commit": commit, "tvm": "0.27"}, "machine": {"host": "h"},
            "protocol": {"repeat": 1, "number": 1, "warmup": 0},
            "models": {"m": {"builds": {b: {"median_ms": ms, "matches_onnxruntime": True,
                                            "stats": {"kernels": 3}}
                                        for b, ms in builds.items()}}}}


def test_merge_renames_variants_and_pairs_them_with_the_same_baseline(tmp_path):
    new = tmp_path / "new.json"
    old = tmp_path / "old.json"
    new.write_text(json.dumps(_results({"baseline-cuda": 4.0, "smartmem-cuda": 2.0}, "abc")))
    old.write_text(json.dumps(_results({"smartmem-cuda": 2.5, "smartmem-opencl": 3.0}, "def")))
    out = tmp_path / "merged.json"
    gm.merge(argparse.Namespace(results=[str(new), f"{old}:def"], out=str(out)))
    data = json.loads(out.read_text())
    assert set(data["models"]["m"]["builds"]) == {"baseline-cuda", "smartmem-cuda",
                                                 "smartmem_def-cuda", "smartmem_def-opencl"}
    assert data["variants"] == {"def": "def"} and data["manifest"]["git_commit"] == "abc"
    pairs = gm._speedup_pairs(sorted(data["models"]["m"]["builds"]))
    # no opencl baseline nor smartmem build: the opencl variant has nothing to be compared
    # with; the cuda variant is compared with TVM and with the same call's smartmem build
    assert pairs == {"cuda": ("baseline-cuda", "smartmem-cuda"),
                     "def cuda": ("baseline-cuda", "smartmem_def-cuda"),
                     "def over smartmem cuda": ("smartmem-cuda", "smartmem_def-cuda")}
    model = data["models"]["m"]
    assert gm._speedup(model, *pairs["cuda"]) == 2.0
    assert gm._speedup(model, *pairs["def cuda"]) == 1.6
    assert gm._speedup(model, *pairs["def over smartmem cuda"]) == 0.8


def test_variants_are_labelled_switch_sets():
    """``prepare --variants``: each label a set of pipeline switches, one build each."""
    assert gm.parse_variants("lanes64:TVM_SMARTMEM_ATTENTION_KEYS=256,"
                             "TVM_SMARTMEM_ATTENTION_LANES=64; fused:"
                             "TVM_SMARTMEM_SPLIT_K_REDUCTION=on;") == {
        "lanes64": {"TVM_SMARTMEM_ATTENTION_KEYS": "256", "TVM_SMARTMEM_ATTENTION_LANES": "64"},
        "fused": {"TVM_SMARTMEM_SPLIT_K_REDUCTION": "on"}}
    assert gm.parse_variants("") == {}
    for bad in ("lanes64", "a-b:TVM_SMARTMEM_X=1", "x:PATH=/bin", "x:TVM_SMARTMEM_X",
                "x:TVM_SMARTMEM_X=1;x:TVM_SMARTMEM_X=2"):
        with pytest.raises(SystemExit, match="--variants"):
            gm.parse_variants(bad)


def test_switches_apply_for_the_build_and_are_restored(monkeypatch):
    """A variant's switches hold while it compiles, and the environment is as before after
    (a variable that was unset is unset again), so the next build is the plain one."""
    import os

    from tvm_smartmem import switches
    from tvm_smartmem.transform import fuse_split_k_reduction as fsk

    monkeypatch.setenv(fsk.ENV, "off")
    monkeypatch.delenv(fsk.TAIL_ENV, raising=False)
    with switches.applied({fsk.ENV: "on", fsk.TAIL_ENV: "2"}):
        assert os.environ[fsk.ENV] == "on" and fsk.tail_batch() == 2
    assert os.environ[fsk.ENV] == "off" and fsk.TAIL_ENV not in os.environ


def test_merge_names_a_file_that_is_not_a_results_file(tmp_path):
    import pytest

    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    for path in (bad, tmp_path / "missing.json"):
        with pytest.raises(SystemExit, match=r"is not a gpu_results\.json"):
            gm.merge(argparse.Namespace(results=[str(path)], out=str(tmp_path / "m.json")))


def test_masks_travel_exactly_and_weights_as_statistics():
    """A causal mask (0 and float32's minimum) regenerated from its mean and spread overflowed
    to inf and made SD's text encoder's reference all NaN; it now travels exactly, while a
    real weight is regenerated with its statistics."""
    import numpy as np

    mask = np.triu(np.full((1, 1, 77, 77), np.finfo(np.float32).min, np.float32), 1)
    weight = np.random.default_rng(0).normal(0.1, 0.02, (64, 32)).astype(np.float32)
    spec = gm._weight_spec([mask, weight])
    assert "exact" in spec[0] and "exact" not in spec[1]
    back_mask, back_weight = gm._regenerate(spec, seed=3)
    np.testing.assert_array_equal(back_mask, mask)
    assert back_weight.shape == weight.shape and not np.array_equal(back_weight, weight)
    assert abs(back_weight.mean() - 0.1) < 0.01 and abs(back_weight.std() - 0.02) < 0.005


def test_a_reference_with_nan_matches_nothing():
    """NaN == NaN was a perfect match: every build of SD's text encoder 'matched' a NaN
    reference with error 0."""
    import numpy as np

    from tvm_smartmem import numerics

    ref = np.full((2, 3), np.nan, np.float32)
    assert numerics.compare([ref.copy()], [ref]) == (False, float("inf"))
    finite = np.ones((2, 3), np.float32)
    assert numerics.compare([finite + 1e-6], [finite])[0]


def test_split_k_policy_is_written_or_dropped():
    """The sweep's choice goes into a target's entry with where it was measured; a sweep in
    which no split beat the whole GEMMs removes split-K from that target."""
    import split_k_sweep as sk

    entry = {"other": 1, "split_k": {"min_blocks": 264, "min_chunk": 128}}
    sk.adopt_policy(entry, {"min_blocks": 792, "min_chunk": 64}, 1.886, "r.json", "H100")
    assert entry == {"other": 1, "split_k": {"min_blocks": 792, "min_chunk": 64,
                                             "measured": "r.json", "geomean_speedup": 1.886,
                                             "device": "H100"}}
    sk.adopt_policy(entry, {}, 0.97, "r.json", "H100")
    assert entry == {"other": 1}


def test_an_unstable_build_has_no_speedup():
    """Calls that disagreed (``repeatable`` False: a race between thread blocks) void the
    comparison, as a mismatch with ONNX Runtime does."""
    data = _results({"baseline-cuda": 4.0, "smartmem-cuda": 2.0}, "abc")
    model = data["models"]["m"]
    assert gm._speedup(model, "baseline-cuda", "smartmem-cuda") == 2.0
    model["builds"]["smartmem-cuda"]["repeatable"] = False
    assert gm._speedup(model, "baseline-cuda", "smartmem-cuda") is None


def test_repeated_outputs_notice_a_kernel_that_changes_between_calls():
    """The runner's check itself: a deterministic module repeats, one whose output depends on
    a counter kept across calls (what a split-K counter left non-zero would do) does not."""
    import numpy as np
    import tvm

    from tvm_smartmem.measure import LocalRunner

    ex = tvm.compile(_stateful_module(), "llvm")
    runner = LocalRunner("cpu")
    _, stable = runner.repeated_outputs(ex, [np.ones(4, "float32")], calls=3)
    assert stable is False
    plain = tvm.compile(_identity_module(), "llvm")
    first, stable = runner.repeated_outputs(plain, [np.ones(4, "float32")], calls=3)
    assert stable is True and np.array_equal(first[0], np.ones(4, "float32") * 2)


def _stateful_module():
    """``main(x) = x + state`` with ``state`` a constant the kernel bumps after each call."""
    import numpy as np
    from tvm import relax
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def bump(x: T.Buffer((4,), "float32"), state: T.Buffer((1,), "float32"),
             y: T.Buffer((4,), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i in range(4):
            with T.sblock("y"):
                v = T.axis.spatial(4, i)
                y[v] = x[v] + state[0]
        with T.sblock("s"):
            state[0] = state[0] + T.float32(1)


    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    gv = bb.add_func(bump, "bump")
    with bb.function("main", [x]):
        state = relax.const(np.zeros(1, "float32"))
        out = bb.emit(relax.call_tir(gv, relax.Tuple([x, state]),
                                     relax.TensorType((4,), "float32")))
        bb.emit_func_output(out)
    return bb.get()


def _identity_module():
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    with bb.function("main", [x]):
        out = bb.emit(relax.op.add(x, x))
        bb.emit_func_output(out)
    return bb.get()


def test_first_divergence_names_the_kernel_that_changes():
    """The race finder on the CPU: the stateful kernel of the module above is the first call
    whose arguments differ between runs; a deterministic module has none."""
    import numpy as np
    import tvm

    from tvm_smartmem.measure import LocalRunner

    runner = LocalRunner("cpu")
    plain = tvm.compile(_identity_module(), "llvm")
    assert runner.first_divergence(plain, [np.ones(4, "float32")], runs=3) is None
    found = runner.first_divergence(tvm.compile(_stateful_module(), "llvm"),
                                    [np.ones(4, "float32")], runs=3)
    assert found is not None and found["kernel"] == "bump" and found["run"] == 1
    assert found["max_abs_diff"] == 1.0


def test_profile_tables_show_registers_and_resident_warps_beside_the_times():
    """A CUDA build prepared where nvcc was has per-kernel resources; the report's slowest-
    kernel table then gives each kernel's registers, blocks and resident warps (blank for a
    kernel ptxas did not name); without resources the table is the plain one."""
    row = {"profile_us": [{"kernel": "gemm", "calls": 12, "total_us": 480.0},
                          {"kernel": "softmax", "calls": 12, "total_us": 90.0}],
           "resources": {"gemm": {"registers": 56, "shared": 6912, "spills": 0,
                                  "threads": 128, "blocks": 42, "resident_warps": 1.3}}}
    lines = gm._profile_tables({"models": {"m": {"builds": {"smartmem-cuda": row}}}})
    text = "\n".join(lines)
    assert "| kernel | calls | us | regs | blocks | resident warps |" in text
    assert "| `gemm` | 12 | 480.0 | 56 | 42 | 1.3 |" in text
    assert "| `softmax` | 12 | 90.0 | | | |" in text
    del row["resources"]
    plain = "\n".join(gm._profile_tables({"models": {"m": {"builds": {"b": row}}}}))
    assert "| kernel | calls | us |" in plain and "regs" not in plain

"""WindowReduction (depthwise convolutions, poolings: one output per thread) on PoCL against
numpy, and the kernels it must leave to other rules."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tvm import relax

from tvm_smartmem import targets
from tvm_smartmem.analysis.thread_extents import mismatched_thread_extents
from tvm_smartmem.pipeline import UP_TO_KERNELS, smartmem_pipeline

F32 = "float32"
OPENCL = targets.get("opencl")
CUDA = targets.get("cuda")


def _rules(mod, target=OPENCL) -> dict[str, str]:
    with target:
        lowered = smartmem_pipeline(target, phases=UP_TO_KERNELS)(mod)
    out = {}
    for gv, f in lowered.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc):
            assert not mismatched_thread_extents(f), gv.name_hint
            out[gv.name_hint] = str(f.attrs["smartmem.schedule_rule"]) \
                if f.attrs is not None and "smartmem.schedule_rule" in f.attrs else "none"
    return out


def _run(mod, arrays, dev) -> np.ndarray:
    ex = tvm.compile(mod, OPENCL, relax_pipeline="smartmem")
    vm = relax.VirtualMachine(ex, dev)
    return vm["main"](*(tvm.runtime.tensor(a, dev) for a in arrays)).numpy()


def _depthwise(c, h, w, k, stride, bias: bool):
    """silu(depthwise_conv(x, w) [+ b]) as MobileNet / MobileViT / ConvNeXt have it."""
    x = relax.Var("x", relax.TensorType((1, c, h, w), F32))
    wt = relax.Var("w", relax.TensorType((c, 1, k, k), F32))
    b = relax.Var("b", relax.TensorType((1, c, 1, 1), F32))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, wt, b] if bias else [x, wt]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, wt, strides=stride, padding=k // 2, groups=c))
            if bias:
                y = bb.emit(relax.op.add(y, b))
            z = bb.emit_output(relax.op.multiply(y, relax.op.sigmoid(y)))
        bb.emit_func_output(z)
    return bb.get()


def _depthwise_reference(x, wt, b, k, stride) -> np.ndarray:
    c, h, w = x.shape[1:]
    p = k // 2
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p, p), (p, p)))
    oh, ow = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    out = np.zeros((1, c, oh, ow))
    for i in range(k):
        for j in range(k):
            win = xp[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            out += win * wt[:, 0, i, j].reshape(1, c, 1, 1)
    if b is not None:
        out += b
    return (out / (1.0 + np.exp(-out))).astype(F32)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=st.sampled_from([3, 8, 24]), h=st.integers(5, 19), w=st.integers(5, 23),
       k=st.sampled_from([3, 5, 7]), stride=st.sampled_from([1, 2]), bias=st.booleans())
def test_depthwise_convolutions_match_numpy(dev, c, h, w, k, stride, bias):
    """Odd sizes, strides, 3x3 to 7x7 windows (49 elements), with and without a bias: the
    rule takes the kernel (padding and SiLU inlined) and matches float64 numpy."""
    mod = _depthwise(c, h, w, k, stride, bias)
    assert list(_rules(mod).values()) == ["WindowReduction"]
    rng = np.random.default_rng(c * 1000 + h * 31 + w * 7 + k + stride)
    x = rng.standard_normal((1, c, h, w)).astype(F32)
    wt = rng.standard_normal((c, 1, k, k)).astype(F32)
    b = rng.standard_normal((1, c, 1, 1)).astype(F32) if bias else None
    got = _run(mod, [x, wt] + ([b] if bias else []), dev)
    np.testing.assert_allclose(got, _depthwise_reference(x, wt, b, k, stride),
                               rtol=1e-5, atol=1e-5)  # float32: a 49-term sum


def _pool(kind: str, c, h, w, k, stride):
    x = relax.Var("x", relax.TensorType((1, c, h, w), F32))
    bb = relax.BlockBuilder()
    op = relax.op.nn.max_pool2d if kind == "max" else relax.op.nn.avg_pool2d
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(op(x, pool_size=k, strides=stride, padding=k // 2))
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_poolings_match_numpy(dev, kind):
    c, h, w, k, s = 16, 15, 13, 3, 2
    mod = _pool(kind, c, h, w, k, s)
    assert list(_rules(mod).values()) == ["WindowReduction"]
    x = np.random.default_rng(4).standard_normal((1, c, h, w)).astype(F32)
    p = k // 2
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=fill)
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    ones = np.pad(np.ones_like(x), ((0, 0), (0, 0), (p, p), (p, p)))

    def windows(a):
        return np.stack([a[:, :, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s]
                         for i in range(k) for j in range(k)])

    # the average over the window's elements inside the image (count_include_pad off)
    ref = windows(xp).max(0) if kind == "max" else windows(xp).sum(0) / windows(ones).sum(0)
    np.testing.assert_allclose(_run(mod, [x], dev), ref, rtol=1e-6, atol=1e-6)


def test_gemms_and_long_reductions_are_left_to_their_rules():
    """A matrix product with a short K is a GEMM (the GEMM rules take it); a reduction over
    more than 64 elements (a global pooling of 14 x 14) stays with dlight's rules."""
    a = relax.Var("a", relax.TensorType((64, 16), F32))
    bmat = relax.Var("b", relax.TensorType((16, 64), F32))
    bb = relax.BlockBuilder()
    with bb.function("main", [a, bmat]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(a, bmat))
        bb.emit_func_output(out)
    assert "WindowReduction" not in _rules(bb.get(), CUDA).values()
    x = relax.Var("x", relax.TensorType((1, 32, 14, 14), F32))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.mean(x, axis=[2, 3], keepdims=True))
        bb.emit_func_output(out)
    assert "WindowReduction" not in _rules(bb.get(), CUDA).values()


def test_the_rule_can_be_disabled():
    mod = _depthwise(8, 9, 9, 3, 1, False)
    with OPENCL:
        lowered = smartmem_pipeline(OPENCL, phases=UP_TO_KERNELS,
                                    disable=("WindowReduction",))(mod)
    rules = [str(f.attrs["smartmem.schedule_rule"]) for _, f in lowered.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc)]
    assert rules and "WindowReduction" not in rules

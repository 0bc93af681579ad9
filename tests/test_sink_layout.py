"""SinkLayoutThroughElementwise: element-wise regions move above the layout chains they read
where that removes a kernel, values stay those of numpy (fp32 tolerance of ``numerics``), and
nothing moves where it must not (another tensor operand, a parameter source, a chain read
elsewhere, a scalar that would add dimensions)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import LLVM, assert_matches, build_function, run_vm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tvm import relax

from tvm_smartmem import targets
from tvm_smartmem.analysis.stats import collect
from tvm_smartmem.pipeline import smartmem_pipeline
from tvm_smartmem.transform.sink_layout import SUNK_ATTR, SinkLayoutThroughElementwise

F32 = "float32"
CUDA = targets.get("cuda")
OPENCL = targets.get("opencl")


def _build(params: dict[str, tuple], body) -> tvm.IRModule:
    return build_function(params, body, F32)


def _c(value, shape=()) -> relax.Expr:
    return relax.const(np.full(shape, value, dtype=F32))


def _sunk(mod: tvm.IRModule) -> int:
    func = SinkLayoutThroughElementwise()(mod)["main"]
    return int(func.attrs[SUNK_ATTR]) if func.attrs and SUNK_ATTR in func.attrs else 0


def _arrays(params: dict[str, tuple], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-2, 2, s).astype(F32) for s in params.values()]


def _hardswish(x, e):
    return e(relax.op.multiply(x, e(relax.op.divide(
        e(relax.op.clip(e(relax.op.add(x, _c(3.0))), 0, 6)), _c(6.0)))))


def _np_hardswish(x):
    return x * np.clip(x + 3, 0, 6) / 6


# LeViT's attention output: PV, head merge, hardswish, projection
LEVIT = {"p": (1, 4, 16, 16), "v": (1, 4, 16, 8), "w": (32, 32)}


def _levit(v, e):
    o = e(relax.op.matmul(v["p"], v["v"]))
    m = e(relax.op.reshape(e(relax.op.permute_dims(o, [0, 2, 1, 3])), (1, 16, 32)))
    return relax.op.matmul(_hardswish(m, e), v["w"])


def _np_levit(p, v, w):
    o = (p @ v).transpose(0, 2, 1, 3).reshape(1, 16, 32)
    return _np_hardswish(o) @ w


def test_head_merge_then_hardswish_sinks_and_saves_a_kernel():
    """The hardswish joins PV's kernel, the head merge folds into the projection's reads:
    one kernel fewer on the GPU targets (counted exactly), the same values on the CPU."""
    mod = _build(LEVIT, _levit)
    assert _sunk(mod) == 1
    for target in (CUDA, OPENCL):
        with target:
            on = collect(smartmem_pipeline(target)(mod)).kernels
            off = collect(smartmem_pipeline(
                target, disable=("SinkLayoutThroughElementwise",))(mod)).kernels
        assert (off, on) == (3, 2), target.kind.name
    arrays = _arrays(LEVIT)
    ex = tvm.compile(mod, LLVM, relax_pipeline=smartmem_pipeline(LLVM))
    assert_matches(run_vm(ex, arrays), [_np_levit(*arrays)])


def test_sunk_region_matches_numpy_on_pocl(dev):
    """The same graph through the GPU schedules (PoCL)."""
    mod = _build(LEVIT, _levit)
    arrays = _arrays(LEVIT, seed=1)
    ex = tvm.compile(mod, OPENCL, relax_pipeline=smartmem_pipeline(OPENCL))
    assert_matches(run_vm(ex, arrays, dev=dev), [_np_levit(*arrays)])


def test_region_read_elsewhere_keeps_both_layouts():
    """A region value read outside the region (here returned as well) gets the layout chain
    once; the chain's source is read by nothing else, so the rewrite still applies."""
    params = {"a": (4, 6), "b": (6, 8)}

    def body(v, e):
        t = e(relax.op.matmul(v["a"], v["b"]))
        m = e(relax.op.permute_dims(t, [1, 0]))
        s = e(relax.op.multiply(m, _c(0.5)))
        return relax.Tuple([s, e(relax.op.exp(s))])

    mod = _build(params, body)
    assert _sunk(mod) == 1
    a, b = _arrays(params, 2)
    s = (a @ b).T * 0.5
    ex = tvm.compile(mod, LLVM, relax_pipeline=smartmem_pipeline(LLVM))
    assert_matches(run_vm(ex, [a, b]), [s, np.exp(s)])


@pytest.mark.parametrize("case", ["tensor_operand", "param_source", "chain_read_elsewhere",
                                  "scalar_adds_dims", "output_chain", "slice"])
def test_stays_where_it_must(case):
    def body(v, e):
        t = v["a"] if case == "param_source" else e(relax.op.multiply(v["a"], v["a"]))
        if case == "scalar_adds_dims":  # [4, 6] -> [1, 4, 6]; a [1, 1, 1] scalar would make
            m = e(relax.op.expand_dims(t, [0]))  # the sunk op 3-D on a 2-D source
            return relax.op.exp(e(relax.op.add(m, _c(1.0, (1, 1, 1)))))
        if case == "slice":
            m = e(relax.op.strided_slice(t, axes=[0], begin=[0], end=[2]))
            return relax.op.exp(m)
        m = e(relax.op.permute_dims(t, [1, 0]))
        if case == "tensor_operand":
            return relax.op.add(m, v["r"])  # a residual: would need the inverse map on r
        if case == "chain_read_elsewhere":
            return relax.Tuple([e(relax.op.exp(m)), e(relax.op.sum(m, axis=[0]))])
        if case == "output_chain":
            return relax.Tuple([m, e(relax.op.exp(m))])
        return relax.op.exp(m)

    params = {"a": (4, 6), "r": (6, 4)}
    assert _sunk(_build(params, body)) == 0


def test_control_case_fires():
    """The template of the negative cases, without what blocks it, does sink (so each of them
    fails for its own reason)."""
    params = {"a": (4, 6)}

    def body(v, e):
        t = e(relax.op.multiply(v["a"], v["a"]))
        return relax.op.exp(e(relax.op.permute_dims(t, [1, 0])))

    assert _sunk(_build(params, body)) == 1


# -- random chains ---------------------------------------------------------------------------

_UNARY = {
    "sigmoid": (lambda x, e: e(relax.op.sigmoid(x)), lambda x: 1 / (1 + np.exp(-x))),
    "tanh": (lambda x, e: e(relax.op.tanh(x)), np.tanh),
    "scale": (lambda x, e: e(relax.op.multiply(x, _c(0.7))), lambda x: x * np.float32(0.7)),
    "shift": (lambda x, e: e(relax.op.subtract(_c(1.5), x)), lambda x: 1.5 - x),
    "clip": (lambda x, e: e(relax.op.clip(x, -1, 1)), lambda x: np.clip(x, -1, 1)),
    "square": (lambda x, e: e(relax.op.multiply(x, x)), lambda x: x * x),
}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(perm=st.permutations([0, 1, 2]), flat=st.booleans(), ops=st.lists(
    st.sampled_from(sorted(_UNARY)), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_random_chains_match_numpy(perm, flat, ops, seed):
    """matmul -> permute [-> reshape] -> random element-wise ops over it and scalars: the
    region always sinks and the values match numpy."""
    params = {"a": (2, 3, 4), "b": (4, 5)}

    def body(v, e):
        x = e(relax.op.matmul(v["a"], v["b"]))
        x = e(relax.op.permute_dims(x, perm))
        if flat:
            x = e(relax.op.reshape(x, (30,)))
        for name in ops:
            x = _UNARY[name][0](x, e)
        return x

    def ref(a, b):
        x = (a @ b).transpose(perm)
        if flat:
            x = x.reshape(30)
        for name in ops:
            x = _UNARY[name][1](x)
        return x

    mod = _build(params, body)
    assert _sunk(mod) == 1
    arrays = _arrays(params, seed)
    ex = tvm.compile(mod, LLVM, relax_pipeline=smartmem_pipeline(LLVM))
    assert_matches(run_vm(ex, arrays), [ref(*arrays)])

"""TIR passes: InlineDataMovement (index comprehension) and SimplifyIndices."""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir, te, topi
from tvm.script import tirx as T

from tvm_smartmem.tir.index_simplify import count_div_mod, simplify_indices
from tvm_smartmem.tir.inline_data_movement import inline_data_movement


def _blocks(func) -> int:
    found: list = []
    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, found.append))
    return len([b for b in found if b.name_hint != "root"])


def _run(func, arrays):
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), "llvm")
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    ex["main"](*tensors)
    return tensors[-1].numpy()


def test_simplify_uses_block_ranges():
    """B[h, k, i] = A[((h * 16 + k) // 64 + i) % 32, (h * 16 + k) % 64] is A[i, h * 16 + k]."""
    a = te.placeholder((32, 64), name="a")
    b = te.compute((4, 16, 32),
                   lambda h, k, i: a[((h * 16 + k) // 64 + i) % 32, (h * 16 + k) % 64], name="b")
    func = te.create_prim_func([a, b])
    assert count_div_mod(func) == 3
    simple = simplify_indices(func)
    assert count_div_mod(simple) == 0
    data = np.random.rand(32, 64).astype("float32")
    out = np.zeros((4, 16, 32), "float32")
    np.testing.assert_array_equal(_run(simple, [data, out]), _run(func, [data, out]))


@T.prim_func(s_tir=True)
def _mod_of_mod(a: T.Buffer((4096,), "float32"), b: T.Buffer((4096,), "float32")):
    for x in range(4096):
        with T.sblock("b"):
            vx = T.axis.spatial(4096, x)
            b[vx] = a[vx % 256 % 32] + a[vx // 32 % 8 * 32 + vx % 32]


def test_paper_rules_mod_of_mod_and_split_merge():
    """(x % 256) % 32 -> x % 32 (32 divides 256) and (x // 32) % 8 * 32 + x % 32 -> x % 256:
    five operations become two."""
    assert count_div_mod(_mod_of_mod) == 5
    simple = simplify_indices(_mod_of_mod)
    assert count_div_mod(simple) == 2
    data = np.random.rand(4096).astype("float32")
    out = np.zeros(4096, "float32")
    np.testing.assert_array_equal(_run(simple, [data, out]), _run(_mod_of_mod, [data, out]))


def test_inline_transpose_into_its_consumer():
    a = te.placeholder((4, 8), name="a")
    b = te.placeholder((8, 4), name="b")
    c = topi.add(topi.transpose(a, [1, 0]), b)
    func = te.create_prim_func([a, b, c])
    assert _blocks(func) == 2
    inlined, count = inline_data_movement(func)
    assert (count, _blocks(inlined)) == (1, 1)
    x, y = np.random.rand(4, 8).astype("float32"), np.random.rand(8, 4).astype("float32")
    out = np.zeros((8, 4), "float32")
    np.testing.assert_allclose(_run(inlined, [x, y, out]), x.T + y, rtol=1e-6)


def test_inline_transpose_into_its_producer_writes():
    """exp then transpose into the output: the exp block writes through the map."""
    a = te.placeholder((4, 8), name="a")
    c = topi.transpose(topi.exp(a), [1, 0])
    func = te.create_prim_func([a, c])
    inlined, count = inline_data_movement(func)
    assert (count, _blocks(inlined)) == (1, 1)
    x = np.random.rand(4, 8).astype("float32")
    np.testing.assert_allclose(_run(inlined, [x, np.zeros((8, 4), "float32")]), np.exp(x).T,
                               rtol=1e-6)


def test_a_reduction_producer_keeps_its_copy():
    """sum then transpose into the output: reverse inlining into a reduction is impossible, so
    the copy block stays (correct, not free) and nothing is reported inlined."""
    a = te.placeholder((4, 8, 3), name="a")
    c = topi.transpose(topi.sum(a, axis=2), [1, 0])
    func = te.create_prim_func([a, c])
    inlined, count = inline_data_movement(func)
    assert (count, _blocks(inlined)) == (0, 2)

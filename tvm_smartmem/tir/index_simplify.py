"""SimplifyIndices: index strength reduction after layout elimination.

Folding a reshape -> transpose -> reshape chain into a consumer leaves index expressions such as
``((h * 16 + k) // 64 + i) % 32``.  Within the block they sit in, every block variable has a known
range, and with those ranges the expression is just ``i`` -- but TVM's statement simplifier does
not use block-variable ranges, so the ``//`` and ``%`` would survive into the kernel and into
the schedule rules' pattern matching.  This pass binds each block's iteration domains and
simplifies every buffer index and access region in it, which covers the paper's rules:

* ``(i % a) % b -> i % b`` when ``b`` divides ``a``;
* ``(i // a) % b * a + i % a -> i % (a * b)`` (merging split / merge pairs);
* quotients and remainders that the ranges make constant or the identity.

:func:`count_div_mod` is the measuring stick: integer divisions and remainders left in a
function's buffer indices.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import ir, s_tir, tirx
from tvm.sym.analyzer import Analyzer

_DIV_MOD = (tirx.FloorDiv, tirx.FloorMod, tirx.Div, tirx.Mod)


def count_div_mod(func: tirx.PrimFunc) -> int:
    """Integer ``//`` and ``%`` operations in the buffer indices of ``func``."""
    count = 0

    def visit_index(expr) -> None:
        nonlocal count
        found: list = []
        tvm_ffi.structural_walk(expr, (_DIV_MOD, found.append))
        count += len(found)

    def on_load(load) -> None:
        for i in load.indices:
            visit_index(i)

    def on_store(store) -> None:
        for i in store.indices:
            visit_index(i)

    tvm_ffi.structural_walk(func.body, [(ir.TensorLoad, on_load), (tirx.BufferStore, on_store)])
    return count


def _signed_div_mod(expr, analyzer: Analyzer) -> bool:
    """Whether ``expr`` divides (``//``, ``%``) a value that may be negative."""
    found: list = []
    tvm_ffi.structural_walk(expr, ((tirx.FloorDiv, tirx.FloorMod), found.append))
    # the bound as well as the prover: ``can_prove`` simplifies first, and that drops a
    # ``max(v, 0)`` whose guard makes it redundant (RecogniseRoll's selects) -- with it the
    # bound, not the rewritten expression, is what knows the value is non-negative
    return any(not analyzer.can_prove(op.a >= 0)
               and analyzer.const_int_bound(op.a).min_value < 0 for op in found)


def _simplify_block(block):
    analyzer = Analyzer()
    for iv in block.iter_vars:
        analyzer.bind(iv.var, iv.dom)

    def simp(expr):
        if isinstance(expr, (tirx.IntImm, tirx.Var)):
            return expr
        new = analyzer.simplify(expr)
        # The simplifier may move an offset inside a division (shifted windows:
        # ``(v - 3) // 56``).  Equal in TIR's floor semantics, but after GPU scheduling TVM's
        # lowering of such signed floor divisions gives wrong indices (measured on CUDA,
        # NVIDIA OpenCL and PoCL with swin_hf's window reverse + roll; llvm is right), so an
        # index is only replaced when every division in it has a non-negative dividend.
        if _signed_div_mod(new, analyzer):
            return expr
        return new

    def on_load(load):
        new = [simp(i) for i in load.indices]
        if all(a.same_as(b) for a, b in zip(new, load.indices, strict=True)):
            return load
        return tirx.BufferLoad(load.source, new)

    def on_store(store):
        new = [simp(i) for i in store.indices]
        if all(a.same_as(b) for a, b in zip(new, store.indices, strict=True)):
            return store
        return tirx.BufferStore(store.buffer, store.value, new)

    def on_region(region):
        ranges = [tvm.ir.Range.from_min_extent(simp(r.min), simp(r.extent))
                  for r in region.region]
        return tirx.BufferRegion(region.source, ranges)

    return tvm_ffi.structural_map(
        block, [(ir.TensorLoad, on_load), (tirx.BufferStore, on_store),
                (ir.TensorRegion, on_region)]
    )


def simplify_indices(func: tirx.PrimFunc) -> tirx.PrimFunc:
    def on_block(block):
        if block.name_hint == "root" or not block.iter_vars:
            return block
        return _simplify_block(block)

    return tvm_ffi.structural_map(func, (s_tir.SBlock, on_block))


def SimplifyIndices() -> tvm.transform.Pass:
    """Simplify buffer indices with block-variable ranges (see module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="SimplifyIndices")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = mod.clone()
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc):
                out[gv] = simplify_indices(func)
        return out

    return _pass

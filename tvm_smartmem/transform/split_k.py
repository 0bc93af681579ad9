"""SplitKMatmul: a GEMM with too few output tiles to fill the GPU is split along its reduction.

A transformer at batch 1 multiplies a few hundred tokens by its weights: BERT's FFN down
projection is ``[128, 3072] x [3072, 768]``.  The GEMM schedule (``TunedMatmul``) gives each
thread block a 32 x 64 output tile, so that product runs as 48 blocks on a GPU with 132
multiprocessors, each block walking all 3072 reduction steps alone.  Splitting the reduction
into ``S`` chunks makes ``S`` times as many blocks, each ``S`` times shorter::

    y = x @ w                                  x: [.., M, K], w: [K, N]
    ->  p = permute(reshape(x, [M, S, K/S]))   @ reshape(w, [S, K/S, N])     p: [S, M, N]
        y = reshape(p[0] + p[1] + ... + p[S-1], [.., M, N])

The reshapes and the permutation are pure index maps that ``EliminateLayoutTransforms`` folds
into the batched GEMM's reads (no kernel moves data), and the sum of the partial products is an
element-wise expression that fuses with whatever follows the GEMM (bias, activation, residual,
or as the prologue of the next kernel).  Only the rounding order of the reduction changes.

Whether a split pays is a property of the device, so the factor comes from the measured table
(``tir/matmul_configs.json``, key ``split_k`` of the target's entry, written by
``benchmarks/split_k_sweep.py``): the smallest factor that gives the GEMM ``min_blocks`` thread
blocks (or the largest there is), each chunk at least ``min_chunk`` long and a whole number of
reduction steps.  A target
without a measured entry is left alone.  ``TVM_SMARTMEM_SPLIT_K=off`` disables the pass and an
integer forces that factor wherever it divides the reduction (the sweep uses it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.target import Target

from ..tir.matmul import load_table, target_key
from ..tir.norm_matmul import SHORT_ROW, norm_prologue_fits, norm_prologue_mode
from .math_rewrite import shape_of
from .partition import use_counts

ENV = "TVM_SMARTMEM_SPLIT_K"
FACTORS = (2, 4, 8, 16)


@dataclass(frozen=True)
class SplitPolicy:
    """When to split: ``tile`` (rows, columns) of one thread block's output, the reduction step
    ``step`` a chunk must be a multiple of, the blocks a GEMM should reach (``min_blocks``), the
    shortest chunk worth a block (``min_chunk``); ``force`` overrides the choice."""

    tile: tuple[int, int]
    step: int
    min_blocks: int
    min_chunk: int
    force: int | None = None

    def factor(self, m: int, n: int, k: int) -> int:
        """The split factor of an ``[m, k] x [k, n]`` GEMM (1: leave it whole)."""
        if self.force is not None:
            s = self.force
            return s if s > 1 and k % (s * self.step) == 0 else 1
        if m == 1:  # a GEMV: dlight's GEMV rule spreads n and k itself, no output tiles
            return 1
        blocks = math.ceil(m / self.tile[0]) * math.ceil(n / self.tile[1])
        if blocks >= self.min_blocks:
            return 1
        best = 1
        for s in FACTORS:  # the smallest that reaches min_blocks, else the largest allowed
            if k % (s * self.step) or k // s < self.min_chunk:
                break
            best = s
            if blocks * s >= self.min_blocks:
                break
        return best


def gemm_tile(target: Target, table: str | None = None) -> tuple[tuple[int, int], int] | None:
    """(rows, columns) of one thread block's output tile and the reduction step of the
    target's measured GEMM configuration; None for a target without one."""
    key = target_key(target)
    config = (load_table(table).get(key, {}) if key else {}).get("config")
    if config is None:
        return None
    tile = (config["block_size_x"] * config["micro_size_x"] * config.get("vthread_x", 1),
            config["block_size_y"] * config["micro_size_y"] * config.get("vthread_y", 1))
    return (tile[::-1] if config.get("inner_x") else tile), config["micro_size_k"]


def policy_for(target: Target, table: str | None = None) -> SplitPolicy | None:
    """The target's split policy from the measured table (None: do not split)."""
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in ("off", "0", "1", "no"):
        return None
    geometry = gemm_tile(target, table)
    if geometry is None:
        return None
    tile, step = geometry
    if setting:
        if not setting.isdigit():
            raise ValueError(f"{ENV}={setting!r}: expected 'off' or a split factor")
        return SplitPolicy(tile, step, 0, 0, force=int(setting))
    key = target_key(target)
    split = load_table(table).get(key, {}).get("split_k")
    if not split:
        return None
    return SplitPolicy(tile, step, int(split["min_blocks"]), int(split["min_chunk"]))


def split_matmul(x: relax.Expr, w: relax.Expr, s: int, out_dtype: str) -> relax.Expr:
    """``x @ w`` as ``s`` partial products over chunks of the reduction, summed."""
    xs, (k, n) = list(shape_of(x)), shape_of(w)
    lead, k_chunk = xs[:-1], k // s
    m = math.prod(lead)
    op = relax.op
    a = op.permute_dims(op.reshape(x, [m, s, k_chunk]), [1, 0, 2])
    b = op.reshape(w, [s, k_chunk, n])
    partial = op.matmul(a, b, out_dtype=out_dtype)
    total = None
    for i in range(s):
        part = op.reshape(op.strided_slice(partial, axes=[0], begin=[i], end=[i + 1]),
                          [*lead, n])
        total = part if total is None else op.add(total, part)
    return total


NORM_OPS = ("relax.nn.layer_norm", "relax.nn.rms_norm")


def glued_norm(x: relax.Expr, value: relax.Expr | None, uses: int, columns: int,
               target: Target | None, max_row: int | None) -> bool:
    """Is ``x`` (bound to ``value``, read ``uses`` times) a layernorm / RMSNorm over its last
    axis that ``FusePlan`` will glue to the GEMM reading it (``TVM_SMARTMEM_NORM_PROLOGUE=short``:
    rows up to ``max_row`` wide)?  Such a GEMM stays whole: split, it could not take the norm
    as its prologue and the norm would keep a kernel of its own."""
    if max_row is None or uses != 1 or not isinstance(value, relax.Call) or \
            not isinstance(value.op, tvm.ir.Op) or value.op.name not in NORM_OPS:
        return False
    shape = shape_of(x)
    axes = [int(a) for a in value.attrs.axes]
    if shape is None or len(shape) < 2 or axes not in ([len(shape) - 1], [-1]):
        return False
    return shape[-1] <= max_row and norm_prologue_fits(tuple(shape), target, columns=columns)


@mutator
class _Splitter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, policy: SplitPolicy, target: Target | None = None,
                 uses: dict | None = None, max_row: int | None = None):
        super().__init__(mod)
        self.policy = policy
        self.target, self.uses, self.max_row = target, uses or {}, max_row
        self.split: list[tuple[int, int, int, int]] = []
        self.kept: list[tuple[int, int, int]] = []  # left whole for a glued norm

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"):
            return call
        x, w = call.args
        xs, ws = shape_of(x), shape_of(w)
        if xs is None or ws is None or len(ws) != 2 or len(xs) < 2 or xs[-1] != ws[0]:
            return call
        m, (k, n) = math.prod(xs[:-1]), ws
        s = self.policy.factor(m, n, k)
        if s == 1:
            return call
        if isinstance(x, relax.Var) and glued_norm(
                x, self._bound(x), self.uses.get(x, 0), n, self.target, self.max_row):
            self.kept.append((m, n, k))
            return call
        dtype = str(call.ty.dtype)  # the product's dtype, whatever out_dtype said
        self.split.append((m, n, k, s))
        return split_matmul(x, w, s, dtype)

    def _bound(self, var: relax.Var) -> relax.Expr | None:
        try:
            return self.lookup_binding(var)
        except Exception:  # a parameter: bound to nothing
            return None


def SplitKMatmul(target: Target, table: str | None = None) -> tvm.transform.Pass:
    """Split the reduction of GEMMs (2-D right operand) that leave the GPU idle (module doc).
    The GEMMs split are recorded as the module attribute ``smartmem.split_k``
    (``[m, n, k, factor]`` each), those left whole for a glued layernorm
    (``TVM_SMARTMEM_NORM_PROLOGUE=short``) as ``smartmem.split_k_kept_for_norm`` (``[m, n, k]``)."""

    @tvm.transform.module_pass(opt_level=0, name="SplitKMatmul")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        policy = policy_for(target, table)
        if policy is None:
            return mod
        # only ``short`` keeps the glued GEMMs whole; ``on`` glues the GEMMs left unsplit
        max_row = SHORT_ROW if norm_prologue_mode(target) == "short" else None
        out = mod.clone()
        done: list[list[int]] = []
        kept: list[list[int]] = []
        for gv, func in mod.functions_items():
            # the load-time weight function runs once: its products are not worth a split
            if isinstance(func, relax.Function) and not gv.name_hint.endswith("transform_params"):
                splitter = _Splitter(mod, policy, target, use_counts(func), max_row)
                out[gv] = splitter.visit_expr(func)
                done += [list(r) for r in splitter.split]
                kept += [list(r) for r in splitter.kept]
        if kept:
            mod = mod.with_attr("smartmem.split_k_kept_for_norm", kept)
            out = out.with_attr("smartmem.split_k_kept_for_norm", kept)
        if not done:
            return mod
        out = relax.transform.Normalize()(out)
        return out.with_attr("smartmem.split_k", done)

    return _pass

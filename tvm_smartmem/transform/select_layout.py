"""SelectLayouts: each weight is stored in the layout its consumer reduces over.

SmartMem chooses a tensor's layout from its consumers' reduction dimensions: a matmul wants ``k``
contiguous in both operands.  The activation operand ``A[m, k]`` of a projection already has it;
the weight ``B[k, n]`` as frontends give it (ONNX ``MatMul`` initialisers, the concatenated
weights of ``CombineParallelMatmuls``) has ``n`` contiguous instead.  Weights are the one kind of
tensor whose layout is free -- they are written once, at load time (``LiftWeightTransforms``)
-- so this pass decides per target:

``KN``  keep ``B[k, n]`` (what dlight's GEMM schedule was tuned on for buffers);
``NK``  store ``B^T[n, k]``, ``k`` contiguous: the matmul reads it through a transpose that
        ``EliminateLayoutTransforms`` folds into its loads.  Texture targets always take it
        (SmartMem packs the reduction dimension into the RGBA lanes of a texel).

The choice for buffer targets comes from measurement: ``benchmarks/weight_layout_sweep.py``
times both layouts of the zoo's weight GEMMs with the pipeline's GEMM schedule on the GPU
machine and records the winner per target kind as ``weight_layout`` in
``tvm_smartmem/tir/matmul_configs.json``; an unmeasured target keeps ``KN``.

The stored copy is computed from the weight alone behind ``R.builtin.stop_lift_params``, so
``LiftWeightTransforms`` moves the transpose to load time and leaves the read-back transpose in
``main``.  A weight that other operators read as it is (GPT-2's tied embedding: a gather and the
LM head) keeps its original for them and gains a copy; the copies' bytes are reported.  The
decision is recorded as ``smartmem.layout_selection`` on the function (layout, weights
re-laid, weights kept, copy bytes).  Functions without ``num_input`` (no weights) are left alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tvm
from tvm import relax
from tvm.target import Target

from ..analysis.stats import tensor_bytes
from .combine_parallel_matmul import weight_vars
from .math_rewrite import shape_of
from .partition import (
    Block,
    bind_like,
    for_each_function,
    is_single_block,
    rebuild_function,
    substitute,
)

SELECTION_ATTR = "smartmem.layout_selection"
LAYOUTS = ("KN", "NK")
_CONFIGS = Path(__file__).resolve().parent.parent / "tir" / "matmul_configs.json"


def weight_layout(target: Target) -> str:
    """The measured weight layout for ``target`` (``NK`` on texture targets, ``KN`` when the
    target kind was never measured)."""
    from ..pipeline import target_kind

    kind = target_kind(target)
    if kind == "opencl-texture":
        return "NK"
    path = Path(os.environ.get("TVM_SMARTMEM_MATMUL_CONFIGS", _CONFIGS))
    table = json.loads(path.read_text()) if path.exists() else {}
    layout = table.get(kind, {}).get("weight_layout", "KN")
    return layout if layout in LAYOUTS else "KN"


def _weight_matmuls(block: Block, weights: set) -> list[int]:
    """Bindings ``x @ w`` whose ``w`` is a 2-D weight with static shape."""
    found = []
    for i, b in enumerate(block.bindings):
        v = b.value
        if not (isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op)
                and v.op.name == "relax.matmul"):
            continue
        w = v.args[1]
        shape = shape_of(w)
        if isinstance(w, relax.Var) and w in weights and v.args[0] not in weights \
                and shape is not None and len(shape) == 2:
            found.append(i)
    return found


def select_function(mod: tvm.IRModule, layout: str, func_name: str = "main") -> tvm.IRModule:
    """Re-lay the weights of ``func_name``'s matmuls in ``layout`` (see the module doc)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown weight layout '{layout}' (known: {', '.join(LAYOUTS)})")
    func = mod[func_name]
    if not is_single_block(func) or not func.attrs or "num_input" not in func.attrs:
        return mod
    block = Block.of(func)
    weights = weight_vars(func, block)
    chosen = set(_weight_matmuls(block, weights)) if layout == "NK" else set()
    record = {"layout": layout, "relaid": len(chosen),
              "kept": len(_weight_matmuls(block, weights)) - len(chosen), "copy_bytes": 0}
    attrs = {str(k): v for k, v in func.attrs.items()}
    if not chosen:
        return _with_record(mod, func_name, func, record)
    # a weight with readers other than the re-laid matmuls keeps its original: the new layout
    # is a second copy (reported)
    for w in {block.bindings[i].value.args[1] for i in chosen}:
        readers = [j for j, b in enumerate(block.bindings)
                   if w in relax.analysis.free_vars(b.value)]
        if any(j not in chosen for j in readers) or w in block.output_vars:
            record["copy_bytes"] += tensor_bytes(w.ty)
    def emit(bb: relax.BlockBuilder, mapping: dict) -> None:
        for i, b in enumerate(block.bindings):
            value = substitute(b.value, mapping)
            if i in chosen:
                x, w = value.args
                stored = bb.emit(relax.op.permute_dims(w, [1, 0]))  # lifted: load time
                kept = bb.emit(relax.op.builtin.stop_lift_params(stored))
                read = bb.emit(relax.op.permute_dims(kept, [1, 0]))  # folded into loads
                value = relax.Call(value.op, [x, read], value.attrs, value.ty_args)
            bind_like(bb, b.var, value, mapping)

    out = rebuild_function(mod, func_name, "layout", emit, attrs)
    return _with_record(out, func_name, out[func_name], record)


def _with_record(mod: tvm.IRModule, func_name: str, func, record: dict) -> tvm.IRModule:
    out = mod.clone() if mod[func_name].same_as(func) else mod
    out[func_name] = func.with_attr(SELECTION_ATTR, {
        k: (v if isinstance(v, str) else tvm.tirx.IntImm("int64", v)) for k, v in record.items()})
    return out


def layout_selection_of(func: relax.Function) -> dict:
    """The recorded decision (layout, relaid, kept, copy_bytes), empty when the pass did not
    run."""
    if not func.attrs or SELECTION_ATTR not in func.attrs:
        return {}
    return {str(k): (str(v) if isinstance(v, str) else int(v))
            for k, v in func.attrs[SELECTION_ATTR].items()}


def SelectLayouts(target: Target | None = None, layout: str | None = None,
                  func_name: str | None = None) -> tvm.transform.Pass:
    """Store every matmul weight in the layout measured best for ``target`` (or ``layout``),
    in every graph function (or ``func_name`` alone)."""

    @tvm.transform.module_pass(opt_level=0, name="SelectLayouts")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        tgt = target or Target.current(allow_none=True)
        chosen = layout or (weight_layout(tgt) if tgt is not None else "KN")
        return for_each_function(mod, func_name,
                                 lambda m, name: select_function(m, chosen, name))

    return _pass

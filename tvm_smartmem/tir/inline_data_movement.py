"""InlineDataMovement: the TIR half of layout elimination ("index comprehension").

After ``FusePlan`` + ``FuseTIR`` a kernel that absorbed a reshape / transpose / slice / window
partition still *computes* it: one block copies into an intermediate buffer and the next block
reads that buffer.  Here every block that only moves data is inlined away:

* into its consumers (``compute_inline``): they now read the original tensor through the
  composed index map -- a fixed operator folded into the consumer's reads;
* or, when it writes the kernel's output, into its producer (``reverse_compute_inline``): the
  producer now writes through the map -- a fixed operator folded into the producer's writes.

Chains fold one block at a time until nothing changes, so their index maps compose.  A block that
cannot be inlined (e.g. its producer is a reduction) stays as it is: correct, just not free.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from ..analysis.stats import _is_const, _is_move_value

FOLD_ANNOTATION = "smartmem.fold"


def _is_move_block(block, tagged_only: bool) -> bool:
    if block.init is not None:
        return False
    if tagged_only and FOLD_ANNOTATION not in block.annotations:
        return False
    stores: list = []
    tvm_ffi.structural_walk(block.body, (tirx.BufferStore, stores.append))
    return len(stores) == 1 and (_is_move_value(stores[0].value, allow_const=False)
                                 or _is_const(stores[0].value)) is True


def inline_data_movement(func: tirx.PrimFunc, tagged_only: bool = False
                         ) -> tuple[tirx.PrimFunc, int]:
    """(new function, number of blocks inlined).  With ``tagged_only``, only blocks that
    ``EliminateLayoutTransforms`` marked ``smartmem.fold`` are candidates."""
    try:
        sch = s_tir.Schedule(tvm.IRModule({"main": func}))
        root = sch.get_sblock("root")
    except Exception:  # not a block-structured function (already scheduled / lowered)
        return func, 0
    inlined = 0
    progress = True
    while progress:
        progress = False
        for block_rv in sch.get_child_blocks(root):
            if not _is_move_block(sch.get(block_rv), tagged_only):
                continue
            for primitive in (s_tir.Schedule.compute_inline,
                              s_tir.Schedule.reverse_compute_inline):
                trial = sch.copy()
                try:
                    primitive(trial, trial.get_sblock(sch.get(block_rv).name_hint))
                except Exception:  # the primitive's preconditions do not hold: try the next
                    continue
                sch = trial
                root = sch.get_sblock("root")
                inlined += 1
                progress = True
                break
            if progress:
                break
    return sch.mod["main"], inlined


INLINED_ATTR = "smartmem.inlined_blocks"


def InlineDataMovement(tagged_only: bool = True) -> tvm.transform.Pass:
    """Inline the data-movement blocks layout elimination marked (``smartmem.fold``), or with
    ``tagged_only=False`` every data-movement block (see module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="InlineDataMovement")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = mod.clone()
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            new, count = inline_data_movement(func, tagged_only)
            if count:
                out[gv] = new.with_attr(INLINED_ATTR, count)
        return out

    return _pass

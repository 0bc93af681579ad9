"""ApplyScheduleRules: TVM's dlight rule loop, tolerant of rules that trip over fused kernels.

The smartmem pipeline hands the schedule rules kernels TVM's own fusion never makes -- a window
partition folded into a layernorm's loads, a head split inside a matmul's reads.  Some dlight
rules assume shapes of access they only ever met in TVM's kernels and fail with an assertion
instead of declining.  Here a rule that raises is treated as one that does not apply, and the
next rule gets the kernel (``gpu.Fallback`` last, which schedules anything); so is a rule whose
schedule binds a thread axis with two extents in one kernel (``analysis.thread_extents``: TVM
would run the smaller loop's body on every thread of the larger).  Which rule took each kernel
is recorded on it as ``smartmem.schedule_rule``, so reports can say.

A kernel with a reduction that only ``gpu.Fallback`` takes is logged as a warning: that rule
gives each output a thread and walks the whole reduction serially, orders of magnitude slower
than a reduction rule -- a glued layernorm + GEMM that ``NormalisedMatmul`` could not host
once cost ConvNeXt-T 15% on the H100 that way, unseen until timed.
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx

from ..analysis.thread_extents import mismatched_thread_extents

RULE_ATTR = "smartmem.schedule_rule"
FALLBACK = "Fallback"

log = logging.getLogger(__name__)


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs) and "tirx.is_scheduled" in func.attrs and \
        bool(func.attrs["tirx.is_scheduled"])


def has_reduction(func: tirx.PrimFunc) -> bool:
    """Does a block of ``func`` (unscheduled: its blocks are the root's children) reduce?"""
    sch = s_tir.Schedule(func)
    return any(iv.iter_type == tirx.IterVar.CommReduce
               for block in sch.get_child_blocks(sch.get_sblock("root"))
               for iv in sch.get(block).iter_vars)


def apply_rules(func: tirx.PrimFunc, target, rules,
                name: str = "kernel") -> tuple[tirx.PrimFunc | None, str | None]:
    """(scheduled function, rule name) from the first rule that applies without raising.
    Reductions over one element are made spatial first (``tir.unit_reduction``: dlight
    applies an epilogue twice to them), except for rules that declare
    ``keeps_unit_reductions`` (``FusedAttention`` recognises a head dimension of one as the
    reduction it is).  ``name`` names the kernel in the warning a reduction on the fallback
    rule gets (module doc)."""
    from .unit_reduction import spatial_unit_reductions

    spatial, _ = spatial_unit_reductions(func)
    for rule in rules:
        given = func if getattr(rule, "keeps_unit_reductions", False) else spatial
        try:
            space = rule.apply(given, target, False)
        except Exception:  # an assumption of the rule does not hold here: next rule
            continue
        if space is None:
            continue
        sch = space if isinstance(space, s_tir.Schedule) else space[0]
        if mismatched_thread_extents(sch.mod["main"]):  # would run threads out of range
            continue
        taken = type(rule).__name__
        if taken == FALLBACK and has_reduction(spatial):
            log.warning("%s: a reduction only dlight's Fallback rule took (a thread per output, "
                        "the reduction serial): expect it slow", name)
        return sch.mod["main"], taken
    return None, None


def ApplyScheduleRules(*rules) -> tvm.transform.Pass:
    """Schedule every unscheduled PrimFunc with the first rule that applies (see module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="ApplyScheduleRules")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = mod.clone()
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            target = func.attrs.get("target") if func.attrs else None
            target = target or tvm.target.Target.current(allow_none=False)
            scheduled, rule = apply_rules(func, target, rules, gv.name_hint)
            if scheduled is not None:
                out[gv] = scheduled.with_attrs({"tirx.is_scheduled": True, RULE_ATTR: rule})
        return out

    return _pass

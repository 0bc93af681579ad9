"""``tvm-smartmem tune``: measure the fusion planner's yellow candidates into the profile DB.

DNNFusion settles the uncertain cells of its fusion table by light-weight profiling.  Here:

1. run the smartmem pipeline up to the layout plan and let the planner (the very one ``FusePlan``
   uses) walk the graph, recording every yellow question it asks -- "fuse this unit into that
   block?" -- with the bindings on each side;
2. for each new question, cut those bindings out of the model into a small module (their inputs
   become parameters) and compile it twice with the rest of the smartmem pipeline: once with
   both sides in one kernel, once as two kernels;
3. time both on the device (local or RPC), record ``fused_ms`` and ``parts_ms`` under the
   question's key (operator types, shapes, dtype, target kind), and plan again: measured answers
   can change which questions come next (``rounds``).

Later compiles consult the database (``cost.db.pipeline_db``) and the xgboost model trained on
it; ``smartmem.fusion_decisions`` says which answers were measured.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax

from ..analysis.classify import MappingType
from ..errors import SmartMemError
from . import CostLayer, Verdict
from .db import ProfileDB
from .features import candidate_key

PLAN_PHASES = ("library_dispatch", "graph", "legalize", "layout")


@dataclasses.dataclass
class Candidate:
    """One yellow question: the bindings of the producer side and of the consumer side."""

    key: dict
    producer: list  # relax.Var of the legalised function ``func``
    consumer: list
    label: str
    verdict: Verdict | None = None
    func: str = "main"


@dataclasses.dataclass
class Measurement:
    label: str
    fused_ms: float | None
    parts_ms: float | None
    error: str | None = None

    @property
    def fuse_wins(self) -> bool | None:
        if self.fused_ms is None or self.parts_ms is None:
            return None
        return self.fused_ms < self.parts_ms


class _Recorder(CostLayer):
    """Answers like the wrapped cost layer and remembers every question asked."""

    def __init__(self, inner: CostLayer):
        super().__init__(inner.db, inner.model)
        self.inner = inner
        self.asked: dict[str, Candidate] = {}
        self.func = "main"  # the function being planned

    def should_fuse(self, planner, block: set[int], cand: int, forward: bool, target) -> Verdict:
        verdict = self.inner.should_fuse(planner, block, cand, forward, target)
        key = candidate_key(planner, block, cand, forward, target)
        producer, consumer = (block, {cand}) if forward else ({cand}, block)

        def vars_of(units: set[int]) -> list:
            return [planner.ecg.nodes[i].var for u in sorted(units)
                    for i in sorted(planner.units[u].members)]

        label = f"{planner._label(min(producer))} -> {planner._label(min(consumer))}"
        self.asked.setdefault(key["id"], Candidate(key, vars_of(producer), vars_of(consumer),
                                                   label, verdict, self.func))
        return verdict


def yellow_candidates(planned: tvm.IRModule, target, cost: CostLayer) -> list[Candidate]:
    """The questions the planner asks on ``planned`` (legalised, layout-planned) given
    ``cost``, in every graph function (a question asked in two is measured once)."""
    from ..transform.fuse import make_planner
    from ..transform.partition import graph_functions, is_single_block

    recorder = _Recorder(cost)
    with target:
        for name in graph_functions(planned):
            if is_single_block(planned[name]):
                recorder.func = name
                make_planner(planned[name], planned, recorder, target).run()
    return list(recorder.asked.values())


def extract(mod: tvm.IRModule, variables: list, func_name: str = "main"
            ) -> tuple[tvm.IRModule, dict]:
    """A module whose ``main`` computes just ``variables``' bindings (of ``func_name``); its
    parameters are what they read from outside, its results what the rest of the graph reads
    from them.  Returns the module and old var -> new var."""
    from ..transform.lift_weight_transforms import is_load_time
    from ..transform.partition import Block, replace_function, substitute

    func = mod[func_name]
    block = Block.of(func)
    idx = sorted(block.index[v] for v in variables)
    inside = {block.bindings[i].var for i in idx}
    params: list = []
    mapping: dict = {}
    for i in idx:
        for v in relax.analysis.free_vars(block.bindings[i].value):
            if v not in inside and v not in mapping:
                mapping[v] = relax.Var(v.name, v.ty)
                params.append(mapping[v])
    read_outside = set(relax.analysis.free_vars(func.body.body))
    for b in block.bindings:
        if b.var not in inside:
            read_outside |= set(relax.analysis.free_vars(b.value))
    results = [block.bindings[i].var for i in idx if block.bindings[i].var in read_outside]
    results = results or [block.bindings[idx[-1]].var]
    bb = relax.BlockBuilder(mod.clone())
    tmp = f"{func_name}__smartmem_extract"
    with bb.function(tmp, params):
        with bb.dataflow():
            for i in idx:
                b = block.bindings[i]
                mapping[b.var] = bb.emit(substitute(b.value, mapping), name_hint=b.var.name)
            value = mapping[results[0]] if len(results) == 1 else \
                relax.Tuple([mapping[r] for r in results])
            out = bb.emit_output(value)
        bb.emit_func_output(out)
    sub = replace_function(bb.get(), tmp, "main", {"global_symbol": "main"}, mod)
    for gv in list(sub.get_global_vars()):  # the candidate takes no weights to transform
        if is_load_time(gv.name_hint):
            del sub[gv]
    sub = relax.transform.DeadCodeElimination(["main"])(sub)
    return sub, mapping


def _compile(sub: tvm.IRModule, groups: list[list], target, has_mtm: list[bool]):
    from ..pipeline import phase_passes
    from ..transform.partition import fuse_groups

    fused = fuse_groups(sub, groups, split_shared_inputs=has_mtm)
    passes = [relax.transform.FuseTIR(),
              *phase_passes(target, ("tir", "dataflow_lower", "finalize"))]
    with target:
        return tvm.compile(fused, target, relax_pipeline=tvm.transform.Sequential(passes))


def _random_inputs(sub: tvm.IRModule, seed: int) -> list[np.ndarray]:
    """Normal floats; zeros for integers (always valid indices for a gather)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for p in sub["main"].params:
        shape = [int(d) for d in p.ty.shape.values]
        dtype = str(p.ty.dtype)
        arrays.append(np.zeros(shape, dtype) if not dtype.startswith(("float", "bfloat"))
                      else rng.standard_normal(shape).astype(dtype))
    return arrays


def measure_candidate(planned: tvm.IRModule, cand: Candidate, target, runner,
                      seed: int = 0) -> Measurement:
    """Time the candidate fused (one kernel) and split (two kernels) on ``runner``'s device."""
    from ..analysis.classify import classes_of

    classes = classes_of(planned[cand.func])
    try:
        sub, mapping = extract(planned, cand.producer + cand.consumer, cand.func)
        if any(not p.ty.shape or any(not isinstance(d, tvm.tirx.IntImm)
                                     for d in p.ty.shape.values) for p in sub["main"].params):
            return Measurement(cand.label, None, None, "symbolic shapes: not measured")
        inputs = _random_inputs(sub, seed)
        sides = [[mapping[v] for v in cand.producer], [mapping[v] for v in cand.consumer]]

        def mtm(vs) -> bool:
            return any(classes.get(v.name) is not None and
                       classes[v.name].mapping == MappingType.MANY_TO_MANY for v in vs)

        ex_fused = _compile(sub, [sides[0] + sides[1]], target, [mtm(cand.producer +
                                                                      cand.consumer)])
        ex_parts = _compile(sub, sides, target, [mtm(cand.producer), mtm(cand.consumer)])
        from .. import numerics

        same, err = numerics.compare(runner.outputs(ex_fused, inputs),
                                     runner.outputs(ex_parts, inputs))
        if not same:  # never record a timing of a wrong kernel
            return Measurement(cand.label, None, None,
                               f"fused and split builds disagree (error {err:.2e})")
        fused = runner.run(ex_fused, inputs).median_ms
        parts = runner.run(ex_parts, inputs).median_ms
        return Measurement(cand.label, fused, parts)
    except SmartMemError:
        raise
    except Exception as err:  # a candidate that fails to build is skipped, and says why
        from ..frontend import summarize_tvm_error

        return Measurement(cand.label, None, None, summarize_tvm_error(err)[:300])


def progress_line(i: int, n: int, text: str, width: int = 24) -> str:
    done = int(width * i / max(n, 1))
    return f"[{'#' * done}{'.' * (width - done)}] {i}/{n} {text}"


def tune(mod: tvm.IRModule, target, runner, db: ProfileDB, *, rounds: int = 2,
         limit: int | None = None, seed: int = 0,
         log: Callable[[str], None] | None = None) -> list[Measurement]:
    """Measure the yellow candidates of ``mod`` (imported Relax) into ``db``; see module doc."""
    from ..pipeline import smartmem_pipeline

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    with target:
        planned = smartmem_pipeline(target, phases=PLAN_PHASES)(mod)
    device = getattr(runner, "kind", "")
    results: list[Measurement] = []
    for r in range(1, rounds + 1):
        cost = CostLayer.of(db)
        todo = [c for c in yellow_candidates(planned, target, cost)
                if db.lookup(c.key) is None]
        if limit is not None:
            todo = todo[: max(0, limit - len(results))]
        if not todo:
            break
        log(f"round {r}: {len(todo)} candidate(s) to measure")
        for i, cand in enumerate(todo, 1):
            t0 = time.perf_counter()
            m = measure_candidate(planned, cand, target, runner, seed)
            if m.error is None:
                db.record(cand.key, m.fused_ms, m.parts_ms, device)
                what = f"fused {m.fused_ms:.4f} ms vs split {m.parts_ms:.4f} ms -> " \
                       f"{'fuse' if m.fuse_wins else 'split'}"
            else:
                what = f"skipped: {m.error}"
            log(progress_line(i, len(todo), f"{cand.label[:60]}: {what} "
                              f"({time.perf_counter() - t0:.1f} s)"))
            results.append(m)
    return results

"""The ``smartmem`` Relax pipeline, one pass list per target kind.

Laid out like TVM's ``relax/backend/<target>/pipeline.py``: a pipeline is a list of phases, a
phase is a list of passes, and each phase is a function of the target so that a reader sees in
one place what runs where.  ``tvm.compile(mod, target, relax_pipeline="smartmem")`` works once
``import tvm`` has loaded this plugin (through the ``tvm.backends`` entry point).

Phases, and where the SmartMem / DNNFusion passes slot in::

    library_dispatch    sampling / sort-scan dispatch (TVM's own)
    graph               ClassifyOperators -> MathPropertyRewrite -> EliminateLayoutTransforms
                        -> SelectLayouts                      (Relax, before legalisation)
    legalize            LegalizeOps, AnnotateTIROpPattern, FoldConstant
    fuse                FusePlan (DNNFusion planner) or TVM's FuseOps, then FuseTIR
    tir                 texture packing / lowering, index strength reduction, schedule rules
    dataflow_lower      RewriteDataflowReshape ... CallTIRRewrite (TVM's own)
    finalize            memory planning, VM lowering (TVM's own)

Each later pass is added to its phase function below (see CONTRIBUTING.md, "Adding a pass").
Every phase function takes ``smartmem``: with ``smartmem=False`` the same functions produce TVM's
fused default pipeline, so the baseline and smartmem differ only by the passes that check that
flag.  Until the graph passes land, both are the same pass list.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax
from tvm.target import Target

from .errors import UnknownTargetError

TARGET_KINDS = ("llvm", "cuda", "opencl", "opencl-texture")


def target_kind(target: Target) -> str:
    """Which pass list serves ``target``: llvm, cuda, opencl or opencl-texture."""
    kind = target.kind.name
    if kind == "llvm":
        return "llvm"
    if kind == "cuda":
        return "cuda"
    if kind == "opencl":
        return "opencl-texture" if "texture" in target.keys else "opencl"
    raise UnknownTargetError(
        f"the smartmem pipeline has no pass list for target kind '{kind}' "
        f"(supported: {', '.join(TARGET_KINDS)})"
    )


def _is_gpu(target: Target) -> bool:
    return target_kind(target) != "llvm"


# -- phases ----------------------------------------------------------------------------------


def library_dispatch_passes(target: Target, smartmem: bool = True) -> list[tvm.transform.Pass]:
    return [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()]


def graph_passes(target: Target, smartmem: bool = True) -> list[tvm.transform.Pass]:
    """SmartMem / DNNFusion rewrites on high-level Relax, before legalisation.

    Slots, in order: ClassifyOperators, MathPropertyRewrite, EliminateLayoutTransforms,
    SelectLayouts(target).  Empty until those passes land; TVM's default has none.
    """
    passes: list[tvm.transform.Pass] = []
    # ClassifyOperators, MathPropertyRewrite, EliminateLayoutTransforms and SelectLayouts(target)
    # join this list as their issues land; TVM's default pipeline has no graph phase.
    return passes if smartmem else []


def legalize_passes(target: Target, smartmem: bool = True) -> list[tvm.transform.Pass]:
    return [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
    ]


def fuse_passes(target: Target, smartmem: bool = True) -> list[tvm.transform.Pass]:
    """Fusion: the DNNFusion planner slots in here in place of ``FuseOps`` for smartmem."""
    return [relax.transform.FuseOps(), relax.transform.FuseTIR()]


def tir_passes(target: Target, smartmem: bool = True) -> list[tvm.transform.Pass]:
    """TIR after fusion: texture packing, index simplification and our schedule rules slot in
    before TVM's dlight rules (which then only schedule what ours leave)."""
    return [default_gpu_schedules()] if _is_gpu(target) else []


def default_gpu_schedules() -> tvm.transform.Pass:
    """TVM's dlight rules, as in its CUDA and generic GPU pipelines."""
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(
        dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    )


def dataflow_lower_passes(target: Target, smartmem: bool = True) -> list[tvm.transform.Pass]:
    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
    ]


def finalize_passes(target: Target, smartmem: bool = True) -> list[tvm.transform.Pass]:
    passes = [relax.transform.StaticPlanBlockMemory()]
    if target_kind(target) == "cuda":
        passes.append(relax.transform.RewriteCUDAGraph())
    return [
        *passes,
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


PHASES: list[tuple[str, Callable[[Target, bool], list[tvm.transform.Pass]]]] = [
    ("library_dispatch", library_dispatch_passes),
    ("graph", graph_passes),
    ("legalize", legalize_passes),
    ("fuse", fuse_passes),
    ("tir", tir_passes),
    ("dataflow_lower", dataflow_lower_passes),
    ("finalize", finalize_passes),
]

#: The phases that turn high-level Relax into fused kernels; statistics are read after them.
UP_TO_KERNELS = ("library_dispatch", "graph", "legalize", "fuse", "tir")


def phase_passes(
    target: Target, phases: tuple[str, ...] | None = None, smartmem: bool = True
) -> list[tvm.transform.Pass]:
    """The passes of the named phases (all by default), in pipeline order."""
    target_kind(target)  # reject unsupported kinds early
    unknown = set(phases or ()) - {name for name, _ in PHASES}
    if unknown:
        raise ValueError(f"unknown phase(s) {sorted(unknown)}; phases: {[n for n, _ in PHASES]}")
    return [
        p for name, make in PHASES if phases is None or name in phases
        for p in make(target, smartmem)
    ]


def _as_pass(
    name: str, target: Target | None, phases: tuple[str, ...] | None, smartmem: bool
) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        tgt = target or Target.current(allow_none=True)
        if tgt is None:
            raise UnknownTargetError(
                "the pipeline needs a target: pass one, or run it inside `with target:`"
            )
        with tgt:
            return tvm.transform.Sequential(phase_passes(tgt, phases, smartmem))(mod)

    return _pipeline


def smartmem_pipeline(
    target: Target | str | None = None, phases: tuple[str, ...] | None = None
) -> tvm.transform.Pass:
    """The smartmem Relax pipeline for ``target`` (a Target or a name from :mod:`targets`).

    With ``target=None`` the target is read from ``Target.current()`` when the pass runs, which
    is how ``tvm.compile(..., relax_pipeline="smartmem")`` calls it.  ``phases`` keeps only the
    named phases (e.g. :data:`UP_TO_KERNELS` to read statistics before VM lowering).
    """
    from .targets import resolve

    return _as_pass("SmartMemPipeline", resolve(target) if target is not None else None,
                    phases, True)


def baseline(target: Target | str, phases: tuple[str, ...] | None = None) -> tvm.transform.Pass:
    """TVM's own fused default pipeline for ``target``, built from the same phase functions.

    Equal to ``relax.get_default_pipeline(target)`` for llvm, cuda and generic OpenCL (plain
    ``tvm.compile(mod, "llvm")`` does not fuse at all, so this is the fair baseline).  For
    texture / Adreno targets it is the generic GPU pipeline too: TVM 0.27's Adreno pipeline
    mis-compiles texture stores (see ``tvm-0.27-notes.md``), so it is no baseline to measure.
    """
    from .targets import resolve

    return _as_pass("BaselinePipeline", resolve(target), phases, False)


def register() -> None:
    """Register ``"smartmem"`` with ``relax.register_pipeline`` (idempotent)."""
    from tvm.relax import pipeline as relax_pipeline

    if "smartmem" not in relax_pipeline.PIPELINE_MAP:
        relax.register_pipeline("smartmem")(_registered_factory)


def _registered_factory(**kwargs) -> tvm.transform.Pass:
    return smartmem_pipeline(kwargs.get("target"), kwargs.get("phases"))

"""The ``smartmem`` Relax pipeline, one pass list per target kind.

Laid out like TVM's ``relax/backend/<target>/pipeline.py``: a pipeline is a list of phases, a
phase is a list of passes, and each phase is a function of the target so that a reader sees in
one place what runs where.  ``tvm.compile(mod, target, relax_pipeline="smartmem")`` works once
``import tvm`` has loaded this plugin (through the ``tvm.backends`` entry point).

Phases (``smartmem=False`` gives TVM's fused default from the same functions)::

    library_dispatch    sampling / sort-scan dispatch (TVM's own)
    graph               RecogniseNormalization, MathPropertyRewrite, RecogniseRoll,
                        SinkLayoutThroughElementwise, CombineParallelMatmuls,
                        SelectLayouts (weights; PackWeightsToTexture on texture targets),
                        LiftWeightTransforms (-> main_transform_params, run once at load),
                        SplitKMatmul (GPU targets with a measured split policy),
                        ClassifyOperators, SplitToSlices
    legalize            LegalizeOps, AnnotateTIROpPattern, FoldConstant
    layout              EliminateLayoutTransforms                     (decisions as attributes)
    fuse                FusePlan (DNNFusion planner, attention chains glued on GPUs, and a
                        layernorm to its GEMM with TVM_SMARTMEM_NORM_PROLOGUE=on; FuseOps
                        for the baseline), then FuseTIR
    tir                 InlineDataMovement, SimplifyIndices, then dlight schedules with ours
                        in front (FusedAttention, NormalisedMatmul, TunedMatmul,
                        LongRowReduction, RowReductionWithSideOutputs), then
                        FuseSplitKReduction (CUDA: a split GEMM sums its own partials)
                        (+ PackActivationsToTexture before and LowerTextureAccess after the
                        schedules on texture targets; BlockedReductions on CPUs)
    dataflow_lower      RewriteDataflowReshape ... CallTIRRewrite (TVM's own)
                        (+ AllocateTextureTensors on texture targets)
    finalize            memory planning, VM lowering (TVM's own)
                        (+ TextureStorageViews on texture targets)

Passes in brackets join their phase as their issues land (see CONTRIBUTING.md, "Adding a
pass").  ``disable`` switches named smartmem passes off (the benchmark ablation uses it).
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


def library_dispatch_passes(target: Target, smartmem: bool = True,
                            disable: frozenset = frozenset()) -> list[tvm.transform.Pass]:
    return [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()]


def graph_passes(target: Target, smartmem: bool = True,
                 disable: frozenset = frozenset()) -> list[tvm.transform.Pass]:
    """SmartMem / DNNFusion rewrites on high-level Relax, before legalisation."""
    if not smartmem:
        return []
    from .analysis.classify import ClassifyOperators
    from .transform.combine_parallel_matmul import CombineParallelMatmuls
    from .transform.lift_weight_transforms import LiftWeightTransforms
    from .transform.math_rewrite import MathPropertyRewrite
    from .transform.recognise_norm import RecogniseNormalization
    from .transform.recognise_roll import RecogniseRoll
    from .transform.select_layout import SelectLayouts
    from .transform.sink_layout import SinkLayoutThroughElementwise
    from .transform.split_k import SplitKMatmul
    from .transform.split_to_slices import SplitToSlices

    # batch_norm in inference is a per-channel affine map; decomposed, it has one output and
    # fuses like any elementwise op (its running-mean / variance outputs are dead weight)
    # rewriting first: classification and the layout plan see the graph that gets compiled
    # weight-only work (the combined projections' concatenated weights, transposed weights,
    # folded scales) is lifted into the load-time function before anything is classified
    # (SelectLayouts marks the re-laid weights for lifting, so it needs the lifting pass)
    # on texture targets the weights' layout is their RGBA packing (PackWeightsToTexture)
    if "LiftWeightTransforms" in disable:
        disable = disable | {"SelectLayouts", "PackWeightsToTexture"}
    if target_kind(target) == "opencl-texture":
        from .transform.texture import PackWeightsToTexture

        relayout = ("PackWeightsToTexture", lambda: PackWeightsToTexture(target))
    else:
        relayout = ("SelectLayouts", lambda: SelectLayouts(target))
    named = [("RecogniseNormalization", RecogniseNormalization),
             ("MathPropertyRewrite", MathPropertyRewrite), ("RecogniseRoll", RecogniseRoll),
             ("SinkLayoutThroughElementwise", SinkLayoutThroughElementwise),
             ("CombineParallelMatmuls", CombineParallelMatmuls), relayout,
             ("LiftWeightTransforms", LiftWeightTransforms),
             ("SplitKMatmul", lambda: SplitKMatmul(target)),
             ("ClassifyOperators", ClassifyOperators), ("SplitToSlices", SplitToSlices)]
    return [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
            relax.transform.DeadCodeElimination(), *_enabled(named, disable)]


def legalize_passes(target: Target, smartmem: bool = True,
                    disable: frozenset = frozenset()) -> list[tvm.transform.Pass]:
    return [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
    ]


def layout_passes(target: Target, smartmem: bool = True,
                  disable: frozenset = frozenset()) -> list[tvm.transform.Pass]:
    """Layout decisions on legalised Relax (recorded as attributes for the fusion planner)."""
    if not smartmem:
        return []
    from .transform.eliminate_layout import EliminateLayoutTransforms

    return _enabled([("EliminateLayoutTransforms", EliminateLayoutTransforms)], disable)


def fuse_passes(target: Target, smartmem: bool = True,
                disable: frozenset = frozenset()) -> list[tvm.transform.Pass]:
    """Fusion: DNNFusion's planner for smartmem, TVM's FuseOps for the baseline."""
    if smartmem and "FusePlan" not in disable:
        from .cost.db import pipeline_db
        from .transform.fuse import FusePlan

        # yellow decisions: measurements of `tvm-smartmem tune` when there are any; the
        # kernels FuseTIR merged away are dropped (they would still be scheduled and built)
        # attentions become one kernel on GPU targets (FusePlan's default), where the
        # FusedAttention rule schedules them, unless that rule is disabled
        attention = False if "FusedAttention" in disable else None
        # normalisations that also store their prologue, unless the rule for them is disabled
        side_outputs = False if "RowReductionWithSideOutputs" in disable else None
        # a layernorm glued to the GEMM it feeds (TVM_SMARTMEM_NORM_PROLOGUE=on), unless the
        # rule that schedules the pair is disabled
        norm_prologue = False if "NormalisedMatmul" in disable else None
        return [FusePlan(target, profile_db=pipeline_db(), attention=attention,
                         side_outputs=side_outputs, norm_prologue=norm_prologue),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination()]
    return [relax.transform.FuseOps(), relax.transform.FuseTIR()]


def tir_passes(target: Target, smartmem: bool = True,
               disable: frozenset = frozenset()) -> list[tvm.transform.Pass]:
    """TIR after fusion: fold data movement into loads/stores, simplify the indices it leaves,
    then TVM's dlight rules schedule everything (GPU targets)."""
    passes: list[tvm.transform.Pass] = []
    if smartmem:
        from .tir.index_simplify import SimplifyIndices
        from .tir.inline_data_movement import InlineDataMovement

        passes += _enabled([("InlineDataMovement", InlineDataMovement),
                            ("SimplifyIndices", SimplifyIndices)], disable)
    if not _is_gpu(target):
        if smartmem:
            # CPU kernels stay unscheduled; long reductions get partial sums (accuracy)
            from .tir.blocked_reduction import BlockedReductions

            passes += _enabled([("BlockedReductions", BlockedReductions)], disable)
        return passes
    texture = target_kind(target) == "opencl-texture"
    if smartmem and texture and "PackActivationsToTexture" not in disable:
        # intermediate tensors into RGBA images, packed by their readers' reduction axis; the
        # decision tries the kernels on the rules that schedule them next
        from .transform.texture_activations import PackActivationsToTexture

        passes.append(PackActivationsToTexture(target, gpu_rules(disable, texture)))
    passes.append(gpu_schedules(disable, texture) if smartmem else default_gpu_schedules())
    if smartmem and "FuseSplitKReduction" not in disable:
        # a split-K GEMM and the element-wise kernel summing its partial products: one kernel
        from .transform.fuse_split_k_reduction import FuseSplitKReduction

        passes.append(FuseSplitKReduction(target))
    if texture:
        # texture-scoped buffers (packed weights) become image reads / writes; a no-op for
        # kernels without them, and not optional where they exist
        from .tir.texture import LowerTextureAccess

        passes.append(LowerTextureAccess())
    return passes


def _enabled(named: list, disable: frozenset) -> list[tvm.transform.Pass]:
    return [make() for name, make in named if name not in disable]


#: Every smartmem pass that ``disable`` can name.
SMARTMEM_PASSES = ("RecogniseNormalization", "MathPropertyRewrite", "RecogniseRoll",
                   "SinkLayoutThroughElementwise", "CombineParallelMatmuls",
                   "SelectLayouts", "PackWeightsToTexture",
                   "LiftWeightTransforms",
                   "ClassifyOperators", "SplitToSlices",
                   "EliminateLayoutTransforms",
                   "FusePlan", "InlineDataMovement", "SimplifyIndices", "BlockedReductions",
                   "TunedMatmul", "LongRowReduction", "FusedAttention",
                   "PackActivationsToTexture", "SplitKMatmul", "RowReductionWithSideOutputs",
                   "NormalisedMatmul", "WindowReduction", "FuseSplitKReduction")


#: The smartmem stages an ablation switches on, each with what it needs: the layout decisions
#: are attributes that only the fusion planner acts on, and both read the operator classes
#: that ClassifyOperators attaches.
STAGES: dict[str, tuple[str, ...]] = {
    "fusion": ("ClassifyOperators", "FusePlan"),
    "layout": ("ClassifyOperators", "SplitToSlices", "RecogniseRoll",
               "SinkLayoutThroughElementwise", "EliminateLayoutTransforms", "FusePlan",
               "PackActivationsToTexture"),
    "tir": ("InlineDataMovement", "SimplifyIndices", "BlockedReductions"),
    "rewrite": ("RecogniseNormalization", "MathPropertyRewrite"),
    "weights": ("CombineParallelMatmuls", "SelectLayouts", "PackWeightsToTexture",
                "LiftWeightTransforms"),
    "schedule": ("TunedMatmul", "LongRowReduction", "FusedAttention", "SplitKMatmul",
                 "RowReductionWithSideOutputs", "NormalisedMatmul", "WindowReduction",
                 "FuseSplitKReduction"),
}

#: The cumulative ablation: each step adds one stage; the whole pipeline adds the last one
#: (the measured GEMM knobs of ``TunedMatmul``).
ABLATION = ("fusion", "fusion+layout", "fusion+layout+tir", "fusion+layout+tir+rewrite",
            "fusion+layout+tir+rewrite+weights")


def only_stages(spec: str) -> tuple[str, ...]:
    """The ``disable`` list that leaves on only the passes of the ``+``-joined stages."""
    wanted = [s for s in spec.split("+") if s]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown or not wanted:
        raise ValueError(f"unknown stage(s) '{spec}'; stages: {', '.join(STAGES)} "
                         "(join several with +)")
    keep = {p for s in wanted for p in STAGES[s]}
    return tuple(p for p in SMARTMEM_PASSES if p not in keep)


def _dlight_rules(tuned: bool = False, texture: bool = False, long_rows: bool = False,
                  attention: bool = False, side_outputs: bool = False,
                  norm_prologue: bool = False, windows: bool = False) -> list:
    from tvm.s_tir import dlight as dl

    from .tir.matmul import TunedMatmul

    matmul = TunedMatmul() if tuned else dl.gpu.Matmul()
    rules = [matmul, dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
             dl.gpu.Fallback()]
    if windows:  # depthwise convolutions, poolings: one output per thread, not a row reduction
        from .tir.window_reduction import WindowReduction

        rules.insert(3, WindowReduction())
    if long_rows:  # few long rows (GroupNorm): before dlight's general reduction
        from .tir.schedules import LongRowReduction

        rules.insert(3, LongRowReduction())
    if side_outputs:  # normalisations that also store their prologue (FusePlan makes them)
        from .tir.row_reduction import RowReductionWithSideOutputs

        rules.insert(2, RowReductionWithSideOutputs())
    if texture:  # kernels touching images first; the buffer rules take the rest
        from .tir.schedules import (
            TextureElementwise,
            TextureFallback,
            TextureMatmul,
            TextureRowReduction,
        )

        rules = [TextureElementwise(), TextureMatmul(), TextureRowReduction(),
                 TextureFallback(), *rules]
    if norm_prologue:  # a layernorm and the GEMM it feeds (FusePlan glued them for this rule)
        from .tir.norm_matmul import NormalisedMatmul

        rules.insert(0, NormalisedMatmul(gemm=matmul))
    if attention:  # fused attentions (FusePlan made them for this rule; images or buffers)
        from .tir.attention import FusedAttention

        rules.insert(0, FusedAttention())
    return rules


def default_gpu_schedules() -> tvm.transform.Pass:
    """TVM's dlight rules, as in its CUDA and generic GPU pipelines."""
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(*_dlight_rules())


def gpu_rules(disable: frozenset = frozenset(), texture: bool = False) -> list:
    """The smartmem pipeline's schedule rules, in the order they are tried."""
    return _dlight_rules(tuned="TunedMatmul" not in disable,
                         long_rows="LongRowReduction" not in disable,
                         attention="FusedAttention" not in disable, texture=texture,
                         side_outputs="RowReductionWithSideOutputs" not in disable,
                         norm_prologue="NormalisedMatmul" not in disable,
                         windows="WindowReduction" not in disable)


def gpu_schedules(disable: frozenset = frozenset(), texture: bool = False) -> tvm.transform.Pass:
    """The same rules, with a rule that fails on one of our fused kernels skipped for it, the
    GEMM knobs measured per target (``TunedMatmul``) and ``LongRowReduction`` for GroupNorm-
    shaped reductions unless disabled; on texture targets the texture rules of
    ``tir.schedules`` come first."""
    from .tir.schedule import ApplyScheduleRules

    return ApplyScheduleRules(*gpu_rules(disable, texture))


def dataflow_lower_passes(target: Target, smartmem: bool = True,
                          disable: frozenset = frozenset()) -> list[tvm.transform.Pass]:
    passes = [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
    ]
    if target_kind(target) == "opencl-texture":
        # outputs the kernels declare in a texture scope are allocated in it (no-op otherwise)
        from .transform.texture_alloc import AllocateTextureTensors

        passes.append(AllocateTextureTensors())
    return passes


def finalize_passes(target: Target, smartmem: bool = True,
                    disable: frozenset = frozenset()) -> list[tvm.transform.Pass]:
    passes = [relax.transform.StaticPlanBlockMemory()]
    if target_kind(target) == "cuda":
        passes.append(relax.transform.RewriteCUDAGraph())
    passes += [
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]
    if target_kind(target) == "opencl-texture":
        # tensors planned into texture storage become images (scoped views; no-op otherwise)
        from .transform.texture_views import TextureStorageViews

        passes.append(TextureStorageViews())
    return passes


PHASES: list[tuple[str, Callable[..., list[tvm.transform.Pass]]]] = [
    ("library_dispatch", library_dispatch_passes),
    ("graph", graph_passes),
    ("legalize", legalize_passes),
    ("layout", layout_passes),
    ("fuse", fuse_passes),
    ("tir", tir_passes),
    ("dataflow_lower", dataflow_lower_passes),
    ("finalize", finalize_passes),
]

#: The phases that turn high-level Relax into fused kernels; statistics are read after them.
UP_TO_KERNELS = ("library_dispatch", "graph", "legalize", "layout", "fuse", "tir")


def phase_passes(
    target: Target, phases: tuple[str, ...] | None = None, smartmem: bool = True,
    disable: tuple[str, ...] = (),
) -> list[tvm.transform.Pass]:
    """The passes of the named phases (all by default), in pipeline order."""
    target_kind(target)  # reject unsupported kinds early
    unknown = set(phases or ()) - {name for name, _ in PHASES}
    if unknown:
        raise ValueError(f"unknown phase(s) {sorted(unknown)}; phases: {[n for n, _ in PHASES]}")
    bad = set(disable) - set(SMARTMEM_PASSES)
    if bad:
        raise ValueError(f"unknown pass(es) {sorted(bad)}; smartmem passes: {SMARTMEM_PASSES}")
    off = frozenset(disable)
    return [
        p for name, make in PHASES if phases is None or name in phases
        for p in make(target, smartmem, off)
    ]


def _as_pass(
    name: str, target: Target | None, phases: tuple[str, ...] | None, smartmem: bool,
    disable: tuple[str, ...] = (),
) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        tgt = target or Target.current(allow_none=True)
        if tgt is None:
            raise UnknownTargetError(
                "the pipeline needs a target: pass one, or run it inside `with target:`"
            )
        with tgt:
            return tvm.transform.Sequential(phase_passes(tgt, phases, smartmem, disable))(mod)

    return _pipeline


def smartmem_pipeline(
    target: Target | str | None = None, phases: tuple[str, ...] | None = None,
    disable: tuple[str, ...] = (),
) -> tvm.transform.Pass:
    """The smartmem Relax pipeline for ``target`` (a Target or a name from :mod:`targets`).

    With ``target=None`` the target is read from ``Target.current()`` when the pass runs, which
    is how ``tvm.compile(..., relax_pipeline="smartmem")`` calls it.  ``phases`` keeps only the
    named phases (e.g. :data:`UP_TO_KERNELS` to read statistics before VM lowering).
    """
    from .targets import resolve

    return _as_pass("SmartMemPipeline", resolve(target) if target is not None else None,
                    phases, True, tuple(disable))


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
    return smartmem_pipeline(kwargs.get("target"), kwargs.get("phases"),
                             kwargs.get("disable", ()))


# registered on import too, not only by ``import tvm``'s entry point: a program that imports
# this module first reaches the entry point while this module is half-built (``_plugin``)
register()

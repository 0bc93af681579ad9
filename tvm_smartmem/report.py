"""Baseline vs smartmem on one model: statistics side by side and agreement with ONNX Runtime.

This is what ``tvm-smartmem report`` prints and what the README's first command runs on the
built-in models.  The statistics are read on the module each pipeline actually compiles (after
VM lowering), so ``kernels`` counts the kernel launches the device will see.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import tvm

from . import frontend, numerics, targets
from .analysis.stats import ModuleStats, collect
from .errors import CompilationError, SmartMemError
from .pipeline import baseline, smartmem_pipeline

PIPELINES = ("baseline", "smartmem")


@dataclasses.dataclass
class PipelineReport:
    """One pipeline's result on one model."""

    pipeline: str
    stats: ModuleStats
    compile_seconds: float
    max_error: float | None = None  # vs ONNX Runtime; None when not checked
    matches_reference: bool | None = None
    executable: Any = dataclasses.field(default=None, repr=False)
    graph_ops: int | None = None  # Relax operators of the imported graph
    rewrites: dict[str, int] = dataclasses.field(default_factory=dict)
    flops_removed: int = 0  # weighted FLOPs MathPropertyRewrite removed (per inference)
    opaque_ops: list[str] = dataclasses.field(default_factory=list)
    combined_matmuls: int = 0  # GEMMs CombineParallelMatmuls merged away
    split_gemms: int = 0  # GEMMs SplitKMatmul split along their reduction
    weight_layout: str | None = None  # SelectLayouts' choice (KN / NK), None when it did not run
    texture_weights: dict = dataclasses.field(default_factory=dict)  # PackWeightsToTexture's
    texture_activations: dict = dataclasses.field(default_factory=dict)  # PackActivations...
    kernel_kinds: dict = dataclasses.field(default_factory=dict)  # kernel -> cost.texture kind
    launch: dict = dataclasses.field(default_factory=dict)  # kernel -> [threads, blocks] (GPU)

    @property
    def fusion_rate(self) -> float | None:
        """DNNFusion's fusion rate: operators of the graph per kernel launched."""
        if not self.graph_ops or not self.stats.kernels:
            return None
        return self.graph_ops / self.stats.kernels

    def to_dict(self) -> dict:
        out = dict(self.stats.summary())
        out["fusion_rate"] = None if self.fusion_rate is None else round(self.fusion_rate, 3)
        out["flops_removed"] = self.flops_removed
        out["rewrites"] = dict(self.rewrites)
        out["opaque_ops"] = list(self.opaque_ops)
        out["combined_matmuls"] = self.combined_matmuls
        out["split_gemms"] = self.split_gemms
        out["weight_layout"] = self.weight_layout
        out["weight_images"] = self.texture_weights.get("packed")
        out["activation_images"] = len(self.texture_activations["images"]) \
            if self.texture_activations else None
        out["activation_image_bytes"] = self.texture_activations.get("image_bytes")
        out["texture_activations"] = dict(self.texture_activations)
        out["compile_seconds"] = round(self.compile_seconds, 3)
        out["max_error_vs_onnxruntime"] = self.max_error
        out["matches_onnxruntime"] = self.matches_reference
        return out


def resolve_model(spec: str | Path | onnx.ModelProto) -> tuple[str, onnx.ModelProto]:
    """``builtin:NAME`` or a path to an ONNX file -> (display name, ModelProto)."""
    from . import models

    if isinstance(spec, onnx.ModelProto):
        return spec.graph.name or "model", spec
    text = str(spec)
    if text.startswith("builtin:"):
        name = text.split(":", 1)[1]
        return name, models.get(name)
    return Path(text).stem, frontend.load_onnx(text)


def pipeline_facts(lowered: tvm.IRModule) -> dict:
    """What the smartmem passes recorded on ``main``: rewrites, FLOPs removed, opaque ops,
    GEMMs combined, GEMMs split along k (a module attribute), the weight layout chosen, on
    texture targets which weights and activations went into images (and why the others did
    not), the kind of every kernel (``cost.texture.kernel_kinds``) and its launch size on GPU
    targets (:func:`kernel_launches`)."""
    from .cost.texture import kernel_kinds
    from .transform.combine_parallel_matmul import combined_of
    from .transform.math_rewrite import rewrites_of
    from .transform.select_layout import layout_selection_of
    from .transform.texture import texture_weights_of
    from .transform.texture_activations import texture_activations_of

    names = [gv.name_hint for gv in lowered.get_global_vars()]
    if "main" not in names:
        return {}
    main = lowered["main"]
    counts, flops = rewrites_of(main)
    opaque = [str(o) for o in main.attrs["smartmem.opaque_ops"]] \
        if main.attrs and "smartmem.opaque_ops" in main.attrs else []
    return {"rewrites": counts, "flops_removed": flops, "opaque_ops": opaque,
            "combined_matmuls": combined_of(main),
            "split_gemms": len(lowered.attrs["smartmem.split_k"])
            if lowered.attrs and "smartmem.split_k" in lowered.attrs else 0,
            "weight_layout": layout_selection_of(main).get("layout"),
            "texture_weights": texture_weights_of(main),
            "texture_activations": texture_activations_of(main),
            "kernel_kinds": kernel_kinds(lowered),
            "launch": kernel_launches(lowered)}


def kernel_launches(lowered: tvm.IRModule) -> dict[str, list[int]]:
    """[threads per block, blocks] of each GPU kernel (the first launch of a PrimFunc that
    has several), by PrimFunc name; kernels with symbolic extents are left out."""
    from .analysis.thread_extents import kernel_launch_sizes

    out = {}
    for gv, func in lowered.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            sizes = kernel_launch_sizes(func)
            if sizes and sizes[0] is not None:
                out[gv.name_hint] = list(sizes[0])
    return out


def pipeline_pass(pipeline: str, target: tvm.target.Target) -> tvm.transform.Pass:
    """The pass a pipeline name stands for (see :func:`compile_with_facts`)."""
    from .pipeline import only_stages

    if pipeline == "baseline":
        return baseline(target)
    if pipeline == "smartmem":
        return smartmem_pipeline(target)
    if pipeline.startswith("smartmem:"):
        try:
            disable = only_stages(pipeline.split(":", 1)[1])
        except ValueError as err:
            raise SmartMemError(f"pipeline '{pipeline}': {err}") from None
        return smartmem_pipeline(target, disable=disable)
    raise SmartMemError(f"unknown pipeline '{pipeline}'; pipelines: baseline, smartmem, "
                        "smartmem:STAGE[+STAGE...]")


def compile_with(
    mod: tvm.IRModule, target: tvm.target.Target, pipeline: str
) -> tuple[Any, ModuleStats, float]:
    """Run one pipeline, read statistics on what it produced, build the executable."""
    ex, stats, secs, _ = compile_with_facts(mod, target, pipeline)
    return ex, stats, secs


def compile_with_facts(
    mod: tvm.IRModule, target: tvm.target.Target, pipeline: str
) -> tuple[Any, ModuleStats, float, dict]:
    """:func:`compile_with`, plus :func:`pipeline_facts` of the lowered module.

    ``pipeline`` is ``baseline``, ``smartmem`` or ``smartmem:STAGE[+STAGE...]`` (only those
    stages of :data:`~tvm_smartmem.pipeline.STAGES` on, for ablations)."""
    make = pipeline_pass(pipeline, target)
    t0 = time.perf_counter()
    try:
        with target:
            lowered = make(mod)
        stats = collect(lowered)
        ex = tvm.compile(lowered, target, relax_pipeline=None)
    except SmartMemError:
        raise
    except Exception as err:
        raise CompilationError(
            f"{pipeline} pipeline failed for {target.kind.name}: "
            f"{frontend.summarize_tvm_error(err)}"
        ) from None
    return ex, stats, time.perf_counter() - t0, pipeline_facts(lowered)


def compare_pipelines(
    model: str | Path | onnx.ModelProto,
    target: str | tvm.target.Target = "llvm",
    *,
    shape_dict: Mapping[str, Sequence[int | str]] | None = None,
    check: bool = True,
    seed: int = 0,
    pipelines: Sequence[str] = PIPELINES,
) -> dict[str, PipelineReport]:
    """Compile ``model`` with each pipeline; with ``check``, run it on the local device and
    compare with ONNX Runtime (only possible when the target's device exists here)."""
    from . import models
    from .measure import LocalRunner

    _, proto = resolve_model(model)
    tgt = targets.resolve(target)
    mod, params = frontend.from_onnx(proto, shape_dict=shape_dict)
    reports: dict[str, PipelineReport] = {}
    inputs = ref = runner = None
    if check:
        runner = LocalRunner(targets.device_of(tgt), repeat=1, number=1, warmup=0)
        dims = {d: int(v) for d, v in _symbolic_defaults(shape_dict).items()}
        inputs = models.random_inputs(proto, seed=seed, dims=dims)
        ref = numerics.onnxruntime_reference(proto, inputs)
    graph_ops = sum(collect(mod).op_histogram.values())
    for name in pipelines:
        ex, stats, secs, facts = compile_with_facts(mod, tgt, name)
        rep = PipelineReport(name, stats, secs, executable=ex, graph_ops=graph_ops, **facts)
        if check:
            outs = runner.outputs(ex, list(inputs.values()), params)
            rep.matches_reference, rep.max_error = numerics.compare(outs, ref)
        reports[name] = rep
    return reports


def _symbolic_defaults(shape_dict: Mapping[str, Sequence] | None) -> dict[str, int]:
    """Size 1 for every symbolic dim named in shape_dict (random inputs need concrete sizes)."""
    out: dict[str, int] = {}
    for dims in (shape_dict or {}).values():
        for d in dims:
            if isinstance(d, str):
                out.setdefault(d, 1)
    return out


_ROWS = [
    ("kernels", "kernels (launches)"),
    ("distinct_kernels", "distinct kernels"),
    ("data_movement_kernels", "data-movement kernels"),
    ("data_movement_bytes", "bytes moved by them"),
    ("zero_copy_views", "zero-copy views"),
    ("fusion_rate", "fusion rate (ops per kernel)"),
    ("flops_removed", "FLOPs removed by rewriting"),
    ("combined_matmuls", "GEMMs combined (q/k/v...)"),
    ("split_gemms", "GEMMs split along k"),
    ("weight_layout", "weight layout"),
    ("weight_images", "weights in images"),
    ("activation_images", "activations in images"),
    ("load_time_kernels", "load-time kernels (once)"),
    ("opaque_ops", "opaque operators"),
    ("compile_seconds", "compile time (s)"),
    ("max_error_vs_onnxruntime", "max error vs ONNX Runtime"),
]


def format_table(model: str, target: str, reports: Mapping[str, PipelineReport]) -> str:
    """The side-by-side table printed by ``tvm-smartmem report``."""
    cols = list(reports)
    data = {k: r.to_dict() for k, r in reports.items()}
    width = max(len(label) for _, label in _ROWS) + 2
    lines = [f"model {model}, target {target}",
             "metric".ljust(width) + "".join(c.rjust(14) for c in cols)]
    lines.append("-" * len(lines[-1]))
    for key, label in _ROWS:
        cells = []
        for c in cols:
            v = data[c][key]
            if v is None:
                cells.append("n/a".rjust(14))
            elif isinstance(v, list):
                cells.append((",".join(v) if v else "none").rjust(14))
            elif isinstance(v, float):
                cells.append((f"{v:.2e}" if key.startswith("max_error") else f"{v:.2f}").rjust(14))
            else:
                cells.append(str(v).rjust(14))
        lines.append(label.ljust(width) + "".join(cells))
    for c in cols:
        if data[c]["rewrites"]:
            lines.append(f"{c} rewrites: " + ", ".join(
                f"{rule} x{n}" for rule, n in sorted(data[c]["rewrites"].items())))
    for c in cols:
        kept = data[c]["texture_activations"].get("kept", {})
        if kept:
            reasons: dict[str, int] = {}
            for why in kept.values():
                reasons[why] = reasons.get(why, 0) + 1
            lines.append(f"{c} activations kept in buffers: " + "; ".join(
                f"{why} (x{n})" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])))
    checked = [r for r in reports.values() if r.matches_reference is not None]
    if checked:
        ok = all(r.matches_reference for r in checked)
        tol = numerics.TOLERANCE["float32"]
        lines.append(
            f"numerics vs ONNX Runtime: {'OK' if ok else 'MISMATCH'} "
            f"(fp32 tolerance {tol:g}, scale-normalised max error)"
        )
    return "\n".join(lines)


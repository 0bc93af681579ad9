"""Image or buffer, tensor by tensor: the cost model ``PackActivationsToTexture`` consults.

A tensor in an image changes how every kernel that touches it reads or writes it: the producer
stores texels, each reader samples them.  What that costs depends on the device *and* on the
kind of kernel -- on the H100 a GEMM reading texels runs 1.4x slower than reading a buffer, the
fused attention 4.8x (``benchmarks/results/gpu_texture_profile_h100_b0ec827.json``), while
SmartMem measured texture reads several times faster than buffers on an Adreno 740.  So the
decision is made per tensor from the kernels around it:

* every kernel is classified by its loop structure (:func:`kernel_kind`): ``attention`` (the
  four chained reductions of ``FusedAttention``), ``gemm`` (one reduction block whose loads of
  two computed operands both follow the reduction), ``conv`` (a reduction over a window and
  channels), ``reduction`` (softmax, layernorm, pooling, mean), ``elementwise``;
* the target's entry in ``tir/matmul_configs.json`` (``opencl-texture``) may give the measured
  time ratio image / buffer per kind (``texture_time_ratio``);
* a tensor goes to an image when the mean ratio over its producer and readers is below one
  (:func:`image_estimate`): each of those kernels moves the tensor's bytes once, so each kernel's
  ratio weighs the same.  A kind the device was not measured on takes the mean of the kinds it
  was measured on.

A device with no ratios at all packs wherever the kernels allow (SmartMem's premise); the
``TVM_SMARTMEM_TEXTURE_ACTIVATIONS`` policy (``always`` / ``never``) overrides the model.
"""

from __future__ import annotations

import dataclasses

from tvm import tirx

KINDS = ("attention", "gemm", "conv", "reduction", "elementwise")
#: a product over at most this many window elements (a depthwise convolution) reads like a
#: pooling: kind ``reduction``
SHORT_REDUCTION = 64


def _reduce_extent(block) -> int | None:
    extent = 1
    for iv in block.iter_vars:
        if iv.iter_type == tirx.IterVar.CommReduce:
            if not isinstance(iv.dom.extent, tirx.IntImm):
                return None
            extent *= int(iv.dom.extent)
    return extent


def _reduction_vars(block) -> list:
    return [iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]


def _loads_using(block, variables: list) -> list:
    """Buffers the block's body loads with an index that uses one of ``variables``."""
    import tvm_ffi
    from tvm import ir

    loads: list = []
    tvm_ffi.structural_walk(block.body, (ir.TensorLoad, loads.append))
    found = []
    for ld in loads:
        used: list = []
        for index in ld.indices:
            tvm_ffi.structural_walk(index, (tirx.Var, used.append))
        if any(u.same_as(v) for u in used for v in variables) and \
                not any(ld.source.same_as(f) for f in found):
            found.append(ld.source)
    return found


def kernel_kind(func: tirx.PrimFunc) -> str:
    """The kind of kernel ``func`` is (one of :data:`KINDS`), from its blocks."""
    from ..analysis.classify import prim_blocks

    blocks = prim_blocks(func)
    reductions = [b for b in blocks if _reduction_vars(b)]
    if len(reductions) >= 4:  # scores, max, sum, PV: a fused attention
        return "attention"
    for block in reductions:
        if len(_loads_using(block, _reduction_vars(block))) < 2:
            continue  # one operand reduced (a norm's statistics, a pooling): not a product
        if len(_reduction_vars(block)) == 1:
            return "gemm"
        extent = _reduce_extent(block)
        if extent is None or extent > SHORT_REDUCTION:  # channels x window
            return "conv"
    return "reduction" if reductions else "elementwise"


#: schedule rules whose kernels are of one kind whatever their blocks look like after
#: scheduling (a rule may rfactor a reduction into more reduction blocks)
_RULE_KINDS = {"FusedAttention": "attention", "TunedMatmul": "gemm", "Matmul": "gemm",
               "TextureMatmul": "gemm", "NormalisedMatmul": "gemm", "GEMV": "gemm",
               "WindowReduction": "reduction", "RowReductionWithSideOutputs": "reduction",
               "LongRowReduction": "reduction", "TextureRowReduction": "reduction",
               "TextureElementwise": "elementwise"}


def compiled_kernel_kind(func: tirx.PrimFunc) -> str:
    """:func:`kernel_kind` of a kernel as the pipeline left it: by the schedule rule it
    records (``smartmem.schedule_rule``) where that names one kind, else by its blocks."""
    rule = str(func.attrs["smartmem.schedule_rule"]) if func.attrs is not None and \
        "smartmem.schedule_rule" in func.attrs else ""
    for name in rule.split("+"):
        if name in _RULE_KINDS:
            return _RULE_KINDS[name]
    return kernel_kind(func)


def kernel_kinds(mod) -> dict[str, str]:
    """Kind of every kernel (PrimFunc) of a compiled module, by its symbol: what a kernel
    profile names it (recorded in GPU bundles so that measured profiles can be turned into
    per-kind ratios, :func:`ratios_from_profiles`)."""
    return {gv.name_hint: compiled_kernel_kind(f) for gv, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc)}


def ratios_from_profiles(models: list[tuple[list, list, dict]]) -> dict[str, dict]:
    """Per kind, the image / buffer time ratio measured on whole models.

    ``models``: per model, (the buffer build's kernel profile, the texture build's, the
    texture build's kernel kinds); a profile is a list of ``{"kernel", "calls",
    "total_us"}``.  Kernels are paired by name (the texture build's kernel may carry a
    ``_texture`` suffix) with the same number of calls; each kind's ratio is its paired
    texture time over its paired buffer time, summed over models (time-weighted).  Returns
    ``{kind: {"ratio", "kernels", "buffer_us", "texture_us"}}`` for the kinds measured."""
    totals: dict[str, list] = {}
    for buffer_profile, texture_profile, kinds in models:
        plain = {row["kernel"]: row for row in buffer_profile}
        for row in texture_profile:
            name = row["kernel"]
            base = name[:-len("_texture")] if name.endswith("_texture") else name
            other = plain.get(base)
            kind = kinds.get(name) or kinds.get(base)
            if other is None or kind not in KINDS or other["calls"] != row["calls"] or \
                    other["total_us"] <= 0:
                continue
            entry = totals.setdefault(kind, [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += float(other["total_us"])
            entry[2] += float(row["total_us"])
    return {kind: {"ratio": round(tex / buf, 2), "kernels": n, "buffer_us": round(buf, 1),
                   "texture_us": round(tex, 1)}
            for kind, (n, buf, tex) in sorted(totals.items())}


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Image time over buffer time for one tensor's kernels, and what it is based on."""

    ratio: float
    kinds: tuple[str, ...]

    @property
    def pays(self) -> bool:
        return self.ratio < 1.0

    def describe(self, device: str) -> str:
        return (f"cost model: images estimated {self.ratio:.2f}x the buffer time of its kernels "
                f"({', '.join(self.kinds)}) on {device}")


def kind_ratio(kind: str, ratios: dict) -> float:
    """The measured image / buffer time ratio of ``kind``; an unmeasured kind takes the mean
    of the measured ones."""
    measured = {k: float(v) for k, v in ratios.items() if k in KINDS}
    if not measured:
        raise ValueError(f"texture_time_ratio names none of the kinds {', '.join(KINDS)}: "
                         f"{sorted(ratios)}")
    return measured.get(kind, sum(measured.values()) / len(measured))


def image_estimate(kinds: list[str], ratios: dict) -> Estimate:
    """The mean ratio over the kernels touching a tensor (see module doc)."""
    values = [kind_ratio(k, ratios) for k in kinds]
    return Estimate(sum(values) / len(values), tuple(kinds))

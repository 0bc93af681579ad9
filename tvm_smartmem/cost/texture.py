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


def _blocks(func: tirx.PrimFunc) -> list:
    import tvm_ffi
    from tvm import s_tir

    found: list = []
    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, found.append))
    return [b for b in found if b.name_hint != "root"]


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
    blocks = _blocks(func)
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

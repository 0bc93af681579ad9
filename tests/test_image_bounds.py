"""Out-of-range accesses a value check on PoCL cannot see: thread axes bound with two extents
in one kernel (``analysis.thread_extents``) and image accesses outside the image
(``runtime.opencl.image_bounds``).

Found on the H100: the texture build of the fused attention bound ``threadIdx.x`` to 32 lanes
for the softmax and to 16 texels for a 64-wide head's output; TVM launched 32 and lanes 16..31
wrote past the image.  PoCL's results were right, NVIDIA's driver faulted (CL_ERROR -9999).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir
from tvm.script import tirx as T

from tvm_smartmem import targets
from tvm_smartmem.analysis.thread_extents import (
    kernel_thread_extents,
    mismatched_thread_extents,
)
from tvm_smartmem.runtime.opencl.image_bounds import (
    check_image_bounds,
    instrument,
    out_of_range,
)
from tvm_smartmem.tir.schedule import apply_rules
from tvm_smartmem.tir.texture import LowerTextureAccess

TEXTURE = targets.get("opencl-texture")


@T.prim_func(private=True, check_well_formed=False)
def _two_extents(x: T.Buffer((4, 32), "float32"), y: T.Buffer((4, 32), "float32"),
                 z: T.Buffer((4, 16), "float32")):
    """One kernel: threadIdx.x over 32 for y, over 16 for z -- unguarded lanes 16..31."""
    for i in T.thread_binding(4, thread="blockIdx.x"):
        for j in T.thread_binding(32, thread="threadIdx.x"):
            with T.sblock("y"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = x[vi, vj] * T.float32(2)
        for j in T.thread_binding(16, thread="threadIdx.x"):
            with T.sblock("z"):
                vi, vj = T.axis.remap("SS", [i, j])
                z[vi, vj] = x[vi, vj] + T.float32(1)


@T.prim_func(private=True, check_well_formed=False)
def _two_kernels(x: T.Buffer((4, 32), "float32"), y: T.Buffer((4, 32), "float32"),
                 z: T.Buffer((4, 16), "float32")):
    """Two launches, each with its own threadIdx.x extent: fine."""
    for i in T.thread_binding(4, thread="blockIdx.x"):
        for j in T.thread_binding(32, thread="threadIdx.x"):
            with T.sblock("y"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = x[vi, vj] * T.float32(2)
    for i in T.thread_binding(4, thread="blockIdx.x"):
        for j in T.thread_binding(16, thread="threadIdx.x"):
            with T.sblock("z"):
                vi, vj = T.axis.remap("SS", [i, j])
                z[vi, vj] = x[vi, vj] + T.float32(1)


def test_two_extents_of_one_thread_axis_in_one_kernel_are_found():
    assert mismatched_thread_extents(_two_extents) == {"threadIdx.x": {16, 32}}
    assert kernel_thread_extents(_two_kernels) == [
        {"blockIdx.x": {4}, "threadIdx.x": {32}}, {"blockIdx.x": {4}, "threadIdx.x": {16}}]
    assert mismatched_thread_extents(_two_kernels) == {}


def test_a_split_that_overhangs_is_guarded_not_mismatched():
    """The safe way to fewer active threads: split by the common extent; the split's guard
    becomes the block predicate and every binding has the same extent."""
    from tvm import te

    x = te.placeholder((4, 16), name="x")
    y = te.compute((4, 16), lambda i, j: x[i, j] + 1.0, name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, y]))
    i, j = sch.get_loops(sch.get_sblock("y"))
    _, lanes = sch.split(j, [None, 32])
    sch.bind(i, "blockIdx.x")
    sch.bind(lanes, "threadIdx.x")
    assert mismatched_thread_extents(sch.mod["main"]) == {}


class _Returns:
    """A schedule rule that returns a fixed schedule (or None) whatever it is given."""

    def __init__(self, func):
        self.func = func

    def apply(self, _func, _target, _tunable):
        return None if self.func is None else s_tir.Schedule(self.func)


class _Mismatched(_Returns):
    pass


class _Consistent(_Returns):
    pass


def test_rules_whose_schedule_mismatches_extents_are_skipped():
    func = _two_kernels.with_attr("global_symbol", "main")
    bad = _two_extents.with_attr("global_symbol", "main")
    with TEXTURE:
        scheduled, rule = apply_rules(func, TEXTURE, [_Mismatched(bad), _Consistent(func)])
    assert rule == "_Consistent" and mismatched_thread_extents(scheduled) == {}


# -- image bounds ------------------------------------------------------------------------------


def test_instrument_checks_every_access_and_keeps_the_definitions():
    src = ("// Function: k\n#define READ_IMAGEF(image, sampler, coord) read_imagef(image, coord)\n"
           "__kernel void k(__read_only image2d_array_t a, __write_only image2d_array_t b) {\n"
           "  float4 v = READ_IMAGEF(a, image_sampler, ((int4)(1, 2, 0, 0)));\n"
           "  write_imagef(b, (int4)(0, 0, 0, 0), v);\n}\n")
    out = instrument(src)
    assert "#define READ_IMAGEF(image, sampler, coord) read_imagef(image, coord)" in out
    assert "SMARTMEM_READ(read_imagef, a, ((int4)(1, 2, 0, 0)))" in out
    assert "SMARTMEM_WRITE(write_imagef, b, (int4)(0, 0, 0, 0), v)" in out
    assert out.index("#define SMARTMEM_OOB") < out.index("__kernel")
    line = "smartmem-image-oob k b write 16 3 0 of 16 128 12\n"
    assert out_of_range("noise\n" + line) == [{"kernel": "k", "image": "b", "access": "write",
                                               "coord": (16, 3, 0), "extent": (16, 128, 12)}]


@T.prim_func(check_well_formed=False)
def _overhanging_write(x: T.Buffer((2, 8, 4), "float32"),
                       y: T.Buffer((2, 6, 4), "float32", scope="global.texture")):
    """8 threads write texels of a 6-texel-wide image: threads 6 and 7 are past its edge."""
    T.func_attr({"global_symbol": "main", "tirx.noalias": True})
    for i in T.thread_binding(2, thread="blockIdx.x"):
        for j in T.thread_binding(8, thread="threadIdx.x"):
            for k in T.vectorized(4):
                with T.sblock("y"):
                    vi, vj, vk = T.axis.remap("SSS", [i, j, k])
                    y[vi, vj, vk] = x[vi, vj, vk]


def test_an_image_write_past_the_edge_is_reported(dev):
    """The positive control: PoCL runs the kernel without complaint; the check names the
    kernel, the image and the four texels past its edge."""
    mod = LowerTextureAccess()(tvm.IRModule({"main": _overhanging_write}))
    with check_image_bounds() as report:
        ex = tvm.compile(mod, TEXTURE)
        x = tvm.runtime.tensor(np.arange(64, dtype="float32").reshape(2, 8, 4), dev)
        y = tvm.runtime.empty((2, 6, 4), "float32", dev, mem_scope="global.texture")
        ex["main"](x, y)
        dev.sync()
    coords = sorted(a["coord"] for a in report.accesses)
    assert coords == [(6, 0, 0), (6, 1, 0), (7, 0, 0), (7, 1, 0)], report.accesses
    assert {(a["kernel"], a["image"], a["access"], a["extent"]) for a in report.accesses} == \
        {("main_kernel", "y_ptr", "write", (6, 2, 1))}


"""benchmarks/kernel_resources.py: ptxas's resource log, the occupancy arithmetic, launch sizes."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import kernel_resources as kr

H100 = kr.DEVICES["h100"]

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'gemm_kernel' for 'sm_90'
ptxas info    : Function properties for gemm_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, used 1 barriers, 6916 bytes smem
ptxas info    : Compiling entry function 'norm_kernel' for 'sm_90'
ptxas info    : Function properties for norm_kernel
    16 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 80 registers
"""


def test_parse_ptxas_reads_registers_shared_memory_and_spills():
    assert kr.parse_ptxas(PTXAS_LOG) == {
        "gemm_kernel": {"registers": 56, "shared": 6916, "spills": 0},
        "norm_kernel": {"registers": 80, "shared": 0, "spills": 28}}


@pytest.mark.parametrize("threads,registers,shared,blocks", [
    (128, 56, 6916, 9),     # registers: 1792 a warp, 36 warps -> 9 blocks of 4
    (128, 72, 6916, 7),     # 2304 a warp, 28 warps -> 7 blocks
    (256, 32, 14656, 8),    # warps: 64 / 8
    (512, 92, 20992, 1),    # 3072 a warp, 21 warps -> one block of 16
    (256, 17, 48 * 1024, 4),  # shared memory: 233472 // (49152 + 1024)
    (32, 16, 0, 32),        # the block limit
])
def test_occupancy_is_the_smallest_limit(threads, registers, shared, blocks):
    """Blocks per multiprocessor of the H100 as NVIDIA's occupancy calculator counts them."""
    assert kr.occupancy(H100, threads, registers, shared) == blocks


def test_resident_warps_spread_the_grid_over_the_multiprocessors():
    # DeiT-S's PV GEMM: 42 blocks of 4 warps on 132 multiprocessors
    assert kr.resident_warps(H100, 128, 42, 9) == pytest.approx(42 * 4 / 132)
    # a grid larger than one wave fills every multiprocessor up to the limit
    assert kr.resident_warps(H100, 256, 10_000, 8) == 64


def test_launch_configs_of_a_scheduled_kernel():
    """Threads per block and blocks from the TIR's thread bindings (two blockIdx axes)."""
    from tvm.script import tirx as T

    @T.prim_func
    def f(a: T.Buffer((64, 256), "float32")):
        for bx in T.thread_binding(4, thread="blockIdx.x"):
            for by in T.thread_binding(16, thread="blockIdx.y"):
                for tx in T.thread_binding(128, thread="threadIdx.x"):
                    a[bx * 16 + by, tx] = T.float32(0)

    assert kr.launch_configs(f) == [(128, 64)]

    @T.prim_func
    def g(a: T.handle):
        n = T.int32()
        A = T.match_buffer(a, (n, 128), "float32")
        for bx in T.thread_binding(n, thread="blockIdx.x"):
            for tx in T.thread_binding(128, thread="threadIdx.x"):
                A[bx, tx] = T.float32(0)

    assert kr.launch_configs(g) == [None]  # a symbolic grid: no occupancy figure


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA toolkit's nvcc")
def test_ptxas_resources_of_a_generated_kernel():
    """End to end on a small CUDA build: every kernel of the module has its resources."""
    import tvm

    from tvm_smartmem import models, targets
    from tvm_smartmem.frontend import from_onnx
    from tvm_smartmem.pipeline import smartmem_pipeline

    cuda = targets.get("cuda")
    mod, _ = from_onnx(models.get("bert_layer"))
    with cuda:
        lowered = smartmem_pipeline(cuda)(mod)
    source = kr.cuda_source(tvm.compile(lowered, cuda, relax_pipeline=None))
    found = kr.ptxas_resources(source, H100.arch)
    kernels = [f"{gv.name_hint}_kernel" for gv, f in lowered.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels and set(kernels) <= set(found)
    assert all(0 < r["registers"] <= 255 for r in found.values())

"""Reading each kernel's static shared memory off generated CUDA / OpenCL source."""

from __future__ import annotations

from tvm_smartmem.analysis.shared_memory import shared_bytes

CUDA = '''
extern "C" __global__ void __launch_bounds__(128) a_kernel(float* __restrict__ x);
extern "C" __global__ void __launch_bounds__(128) a_kernel(float* __restrict__ x) {
  __shared__ alignas(64) float s_ptr[576];
  alignas(64) float local_ptr[8];
  __shared__ float2 t_ptr[10];
}
extern "C" __global__ void b_kernel(half* __restrict__ y) {
  __shared__ half h[100];
}
'''

OPENCL = '''
__kernel void c_kernel(__global float* restrict x) {
  __local float red[64];
  __local half4 tile[8];
  float acc[4];
}
__kernel void d_kernel(__global float* restrict x) {
  x[0] = 1.0f;
}
'''


def test_cuda_arrays_are_summed_per_kernel_and_locals_ignored():
    assert shared_bytes(CUDA) == {"a_kernel": 576 * 4 + 10 * 8, "b_kernel": 200}


def test_opencl_local_arrays_count_and_kernels_without_any_are_zero():
    assert shared_bytes(OPENCL) == {"c_kernel": 64 * 4 + 8 * 8, "d_kernel": 0}

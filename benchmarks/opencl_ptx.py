"""What NVIDIA's OpenCL compiler makes of OpenCL C: the PTX of a kernel, on the GPU machine.

NVIDIA's OpenCL driver returns PTX as the program "binary".  Reading it answers questions the
OpenCL 1.2 specification leaves to the implementation -- e.g. whether ``mem_fence(
CLK_GLOBAL_MEM_FENCE)`` is a device-wide fence (``membar.gl`` / ``fence.sc.gpu``) or only a
work-group one (``membar.cta``), which decides whether thread blocks may hand data to each other
through global memory (``transform.fuse_split_k_reduction``).

    python3 benchmarks/opencl_ptx.py                 # the fence / atomic probe below
    python3 benchmarks/opencl_ptx.py kernel.cl       # any OpenCL C file

Prints the PTX lines with fences, barriers and atomics (``--all``: the whole PTX).  Needs only
``libOpenCL.so.1`` (ctypes), no Python OpenCL package.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

PROBE = r"""
__kernel void probe(__global float* part, __global int* count, __global float* out) {
  part[get_global_id(0)] = 1.0f;
  mem_fence(CLK_GLOBAL_MEM_FENCE);
  barrier(CLK_LOCAL_MEM_FENCE);
  if (get_local_id(0) == 0) {
    int seen = atomic_add(count, 1);
    if (seen == get_num_groups(0) - 1) { out[0] = part[0]; }
  }
}
"""

CL_DEVICE_TYPE_GPU = 1 << 2
CL_PROGRAM_BINARY_SIZES = 0x1165
CL_PROGRAM_BINARIES = 0x1166


def _api() -> ctypes.CDLL:
    """libOpenCL with the argument types of the calls used (a cl_bitfield is 64 bits: passed
    as a plain int its upper half is garbage, and no GPU is found)."""
    cl = ctypes.CDLL("libOpenCL.so.1")
    vp, u32, size = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_size_t
    cl.clGetPlatformIDs.argtypes = [u32, ctypes.POINTER(vp), ctypes.POINTER(u32)]
    cl.clGetDeviceIDs.argtypes = [vp, ctypes.c_uint64, u32, ctypes.POINTER(vp),
                                  ctypes.POINTER(u32)]
    cl.clCreateContext.argtypes = [vp, u32, ctypes.POINTER(vp), vp, vp,
                                   ctypes.POINTER(ctypes.c_int)]
    cl.clCreateContext.restype = vp
    cl.clCreateProgramWithSource.argtypes = [vp, u32, ctypes.POINTER(ctypes.c_char_p), vp,
                                             ctypes.POINTER(ctypes.c_int)]
    cl.clCreateProgramWithSource.restype = vp
    cl.clBuildProgram.argtypes = [vp, u32, ctypes.POINTER(vp), ctypes.c_char_p, vp, vp]
    cl.clGetProgramInfo.argtypes = [vp, u32, size, vp, ctypes.POINTER(size)]
    return cl


def ptx_of(source: str) -> str:
    cl = _api()
    platform = ctypes.c_void_p()
    n = ctypes.c_uint()
    if cl.clGetPlatformIDs(1, ctypes.byref(platform), ctypes.byref(n)) or not n.value:
        raise SystemExit("no OpenCL platform")
    device = ctypes.c_void_p()
    if cl.clGetDeviceIDs(platform, CL_DEVICE_TYPE_GPU, 1, ctypes.byref(device),
                         ctypes.byref(n)):
        raise SystemExit("no OpenCL GPU")
    err = ctypes.c_int()
    ctx = cl.clCreateContext(None, 1, ctypes.byref(device), None, None, ctypes.byref(err))
    src = ctypes.c_char_p(source.encode())
    prog = cl.clCreateProgramWithSource(ctx, 1, ctypes.byref(src), None, ctypes.byref(err))
    if cl.clBuildProgram(prog, 1, ctypes.byref(device), b"", None, None):
        raise SystemExit("build failed")
    size = ctypes.c_size_t()
    cl.clGetProgramInfo(prog, CL_PROGRAM_BINARY_SIZES, ctypes.sizeof(size),
                        ctypes.byref(size), None)
    buf = ctypes.create_string_buffer(size.value)
    ptr = ctypes.c_char_p(ctypes.addressof(buf))
    cl.clGetProgramInfo(prog, CL_PROGRAM_BINARIES, ctypes.sizeof(ptr), ctypes.byref(ptr),
                        None)
    return buf.raw.decode(errors="replace").rstrip("\0")


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    source = Path(args[0]).read_text() if args else PROBE
    ptx = ptx_of(source)
    if "--all" in sys.argv:
        print(ptx)
        return
    keys = ("membar", "fence", "bar.sync", "barrier", "atom", "red.", "ld.global")
    for line in ptx.splitlines():
        if any(k in line for k in keys):
            print(line.strip())


if __name__ == "__main__":
    main()

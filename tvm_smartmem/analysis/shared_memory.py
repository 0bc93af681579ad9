"""Static shared (OpenCL: local) memory of each kernel of a compiled GPU module.

A kernel whose shared arrays exceed the device's per-block limit compiles to source on the CPU
machine and fails only when the GPU driver builds it (``ptxas error: uses too much shared
data``), minutes into a device call.  Reading the arrays off the generated source catches it
on the CPU: ``benchmarks/kernel_counts.py --build`` reports such a build as failed, and the
schedule rules' tests assert the shared memory they were meant to use.
"""

from __future__ import annotations

import contextlib
import re

#: Bytes per element of the scalar and vector types TVM's CUDA / OpenCL code generators declare.
_SIZES = {"float": 4, "int": 4, "uint": 4, "half": 2, "double": 8, "char": 1, "uchar": 1,
          "short": 2, "ushort": 2, "long": 8, "int64_t": 8, "bool": 1, "nv_bfloat16": 2}
_KERNEL = re.compile(r'(?:extern "C" __global__ void(?: __launch_bounds__\(\d+\))?|'
                     r'__kernel void) (\w+)\([^;{]*\)\s*\{')
_ARRAY = re.compile(r'(?:__shared__|__local)\s+(?:alignas\(\d+\)\s+)?(\w+)\s+\w+\[(\d+)\]')


def _element_bytes(dtype: str) -> int:
    match = re.fullmatch(r"([a-z_]+?)(\d*)", dtype)
    if match is None:
        return 4
    base, lanes = match.group(1), match.group(2)
    return _SIZES.get(base, 4) * (int(lanes) if lanes else 1)


def shared_bytes(source: str) -> dict[str, int]:
    """kernel name -> bytes of its static shared / local arrays, from CUDA or OpenCL C."""
    heads = list(_KERNEL.finditer(source))
    out = {}
    for i, head in enumerate(heads):
        body = source[head.end():heads[i + 1].start() if i + 1 < len(heads) else len(source)]
        out[head.group(1)] = sum(_element_bytes(t) * int(n) for t, n in _ARRAY.findall(body))
    return out


def device_sources(executable, kind: str | None = None) -> str:
    """The generated device code of a ``tvm.compile`` result (CUDA / OpenCL C), all modules,
    or only those of module ``kind`` (``"cuda"``: what nvcc compiles, without host code)."""
    def walk(module) -> list[str]:
        found = []
        for imported in module.imports:
            # a module without source (the host's LLVM object) has nothing to read
            if kind is None or imported.kind == kind:
                with contextlib.suppress(Exception):
                    found.append(imported.inspect_source())
            found.extend(walk(imported))
        return found

    return "\n".join(walk(getattr(executable, "mod", executable)))


def over_limit(executable, limit: int) -> dict[str, int]:
    """The kernels whose shared memory exceeds ``limit`` bytes, with their bytes."""
    return {k: b for k, b in shared_bytes(device_sources(executable)).items() if b > limit}

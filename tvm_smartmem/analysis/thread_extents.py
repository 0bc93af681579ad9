"""Thread axes bound with different extents inside one GPU kernel.

A schedule may bind ``threadIdx.x`` in several places of one kernel (a reduction over 32
lanes, then an output loop over 16 texels).  TVM launches the kernel with one extent per
thread axis -- the largest -- and does **not** guard the loops bound with a smaller one: the
threads past their extent run their bodies too, reading and writing out of range.  PoCL
tolerated it (its image writes past an edge land in the next row, the values came out right);
NVIDIA's OpenCL faulted, and its next call reported CL_ERROR -9999 as the *next* kernel's build
failure.  A split whose factor does not divide its loop is the safe way to a smaller extent:
the split's guard becomes the block's predicate.

:func:`mismatched_thread_extents` finds the unsafe case on scheduled TIR, before code
generation: ``ApplyScheduleRules`` treats a rule whose schedule has it like a rule that does not
apply (the next rule gets the kernel), and the tests assert that the rule meant for a kernel
took it.
"""

from __future__ import annotations

import tvm_ffi
from tvm import tirx


def _thread_loops(stmt) -> list[tirx.For]:
    loops: list[tirx.For] = []

    def on_for(loop: tirx.For) -> None:
        if loop.kind == tirx.ForKind.THREAD_BINDING and loop.thread_binding is not None:
            loops.append(loop)

    tvm_ffi.structural_walk(stmt, (tirx.For, on_for))
    return loops


def _extent(loop: tirx.For) -> int | str:
    return int(loop.extent.value) if isinstance(loop.extent, tirx.IntImm) else str(loop.extent)


def kernel_thread_extents(func: tirx.PrimFunc) -> list[dict[str, set[int | str]]]:
    """Per kernel of ``func`` (each outermost thread-bound loop nest is one launch), thread
    tag (``threadIdx.x``, ``blockIdx.y`` ...) -> every extent a loop binds it with; symbolic
    extents by their text."""
    loops = _thread_loops(func.body)
    nested = [inner for loop in loops for inner in _thread_loops(loop.body)]
    roots = [loop for loop in loops if not any(loop.same_as(n) for n in nested)]
    out = []
    for root in roots:
        seen: dict[str, set[int | str]] = {}
        for loop in [root, *_thread_loops(root.body)]:
            seen.setdefault(str(loop.thread_binding.thread_tag), set()).add(_extent(loop))
        out.append(seen)
    return out


def kernel_launch_sizes(func: tirx.PrimFunc) -> list[tuple[int, int] | None]:
    """Per kernel of ``func``, (threads per block, blocks): the product of the largest extent
    of each ``threadIdx`` / ``blockIdx`` axis (the launch takes the largest); ``None`` for a
    kernel with a symbolic extent."""
    out: list[tuple[int, int] | None] = []
    for kernel in kernel_thread_extents(func):
        sizes = {"threadIdx": 1, "blockIdx": 1}
        for tag, extents in kernel.items():
            if not all(isinstance(e, int) for e in extents):
                out.append(None)
                break
            kind = tag.split(".")[0]
            if kind in sizes:
                sizes[kind] *= max(extents)
        else:
            out.append((sizes["threadIdx"], sizes["blockIdx"]))
    return out


def mismatched_thread_extents(func: tirx.PrimFunc) -> dict[str, set[int | str]]:
    """The ``threadIdx`` axes some kernel of ``func`` binds with more than one extent (empty:
    every kernel is consistent)."""
    bad: dict[str, set[int | str]] = {}
    for kernel in kernel_thread_extents(func):
        for tag, extents in kernel.items():
            if len(extents) > 1 and tag.startswith("threadIdx."):
                bad.setdefault(tag, set()).update(extents)
    return bad

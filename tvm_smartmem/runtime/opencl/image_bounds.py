"""Image accesses out of range, reported by the kernels themselves (a debugging aid).

An image read or write outside the image is undefined in OpenCL.  PoCL (the CPU device the
tests run on) carries on and often produces the right values anyway; NVIDIA's driver faults,
and reports it as CL_ERROR -9999 from whichever call comes next -- typically the *build* of the
next kernel.  Inside :func:`check_image_bounds`, every OpenCL module created or loaded gets each
``read_image*`` / ``write_image*`` of an ``image2d_array_t`` wrapped in a test of the
coordinates against the image's extents, and a ``printf`` of one line per access outside::

    smartmem-image-oob <kernel> <image> write 31 99 9 of 16 128 12

(``x y z`` of ``width height layers``), which the context collects into the report it yields::

    with check_image_bounds() as report:
        outputs = run(...)
    assert not report.accesses, report.accesses[:3]

The checked kernels are slower and print from the device: for tests and debugging only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import struct
import sys
import tempfile
from collections.abc import Iterator

import tvm_ffi

MARK = "// Function: "
TAG = "smartmem-image-oob"

_CHECKS = r"""
#define SMARTMEM_OOB(img, c) ((c).x < 0 || (c).y < 0 || (c).z < 0 || \
  (c).x >= get_image_width(img) || (c).y >= get_image_height(img) || \
  (c).z >= (int)get_image_array_size(img))
#define SMARTMEM_SAY(img, c, what) printf("%s %s %s %s %d %d %d of %d %d %d\n", \
  "TAG", __func__, #img, what, (c).x, (c).y, (c).z, get_image_width(img), \
  get_image_height(img), (int)get_image_array_size(img))
#define SMARTMEM_WRITE(fn, img, c, v) do { int4 c_ = (c); \
  if (SMARTMEM_OOB(img, c_)) SMARTMEM_SAY(img, c_, "write"); fn(img, c_, v); } while (0)
#define SMARTMEM_READ(fn, img, c) ({ int4 c_ = (c); \
  if (SMARTMEM_OOB(img, c_)) SMARTMEM_SAY(img, c_, "read"); fn(img, c_); })
""".replace("TAG", TAG)

_LINE = re.compile(TAG + r" (\w+) (\w+) (read|write) (-?\d+) (-?\d+) (-?\d+) of (\d+) (\d+) (\d+)")


def instrument(code: str) -> str:
    """OpenCL C source with every image access of an ``image2d_array_t`` checked.

    The runtime builds each kernel from its own section of the source (from its
    ``// Function:`` marker to the next), so the checks go at the top of every section.
    Reads are rewritten through TVM's ``READ_IMAGEF`` / ``READ_IMAGEH`` macros (the sampler-free
    form; the coordinates are integers), writes at ``write_imagef`` / ``write_imageh``."""
    lines = code.split("\n")
    for i, line in enumerate(lines):
        if line.lstrip().startswith("#"):  # TVM's own READ_IMAGEF definitions stay
            continue
        for fn in ("imagef", "imageh"):
            line = re.sub(rf"\bwrite_{fn}\(", f"SMARTMEM_WRITE(write_{fn}, ", line)
            line = re.sub(rf"\bREAD_{fn.upper()}\((\w+), \w+, ",
                          rf"SMARTMEM_READ(read_{fn}, \1, ", line)
        lines[i] = line
    code = "\n".join(lines)
    parts = code.split(MARK)
    for i in range(1, len(parts)):
        head, _, rest = parts[i].partition("\n")
        parts[i] = head + "\n" + _CHECKS + rest
    return MARK.join(parts)


def out_of_range(text: str) -> list[dict]:
    """The out-of-range accesses reported in ``text`` (captured standard output)."""
    out = []
    for m in _LINE.finditer(text):
        kernel, image, kind, *nums = m.groups()
        x, y, z, w, h, d = map(int, nums)
        out.append({"kernel": kernel, "image": image, "access": kind, "coord": (x, y, z),
                    "extent": (w, h, d)})
    return out


class BoundsReport:
    """What :func:`check_image_bounds` saw: filled in when its block ends."""

    def __init__(self) -> None:
        self.accesses: list[dict] = []  # the out-of-range accesses, as out_of_range() gives


@contextlib.contextmanager
def _stdout_to_file() -> Iterator[list[str]]:
    """Standard output at the file-descriptor level (the device's printf writes there through
    C stdio, under Python's and pytest's capture) into a temporary file; its text is appended
    to the yielded list at the end, and everything but the reports is written back."""
    libc = ctypes.CDLL(None)
    text: list[str] = []
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield text
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            text.append(tmp.read().decode(errors="replace"))
    rest = "".join(line for line in text[0].splitlines(keepends=True) if TAG not in line)
    if rest:
        sys.stdout.write(rest)


@contextlib.contextmanager
def check_image_bounds() -> Iterator[BoundsReport]:
    """Instrument the OpenCL modules created or loaded inside the block (see module doc); the
    yielded report lists the out-of-range accesses of the kernels that ran to completion
    inside it (read the outputs, or sync the device, before the block ends)."""
    from . import load

    load()
    names = ("ffi.Module.create.opencl", "ffi.Module.load_from_bytes.opencl")
    create, from_bytes = (tvm_ffi.get_global_func(n) for n in names)

    def checked_create(code, fmt, fmap, source):
        return create(instrument(bytes(code).decode()).encode(), fmt, fmap, source)

    def checked_load(data):
        # the serialized module ends with its source, preceded by its length (u64)
        data = bytes(data)
        code = from_bytes(data).inspect_source().encode()
        new = instrument(code.decode()).encode()
        return from_bytes(data[:len(data) - len(code) - 8] + struct.pack("<Q", len(new)) + new)

    report = BoundsReport()
    tvm_ffi.register_global_func(names[0], checked_create, override=True)
    tvm_ffi.register_global_func(names[1], checked_load, override=True)
    try:
        with _stdout_to_file() as text:
            yield report
    finally:
        tvm_ffi.register_global_func(names[0], create, override=True)
        tvm_ffi.register_global_func(names[1], from_bytes, override=True)
    report.accesses = out_of_range(text[0] if text else "")

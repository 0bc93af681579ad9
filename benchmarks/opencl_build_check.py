"""Build every OpenCL kernel of some models with a device's own OpenCL compiler, one by one.

PoCL (the test suite's OpenCL device) accepts code that a vendor compiler may reject -- NVIDIA's
fails some kernels with CL_ERROR (-9999) and a log holding only a warning.  This script dumps
the per-kernel sources of the smartmem builds here, then on the GPU machine builds each one
with the platform's compiler (plain ctypes, no TVM needed), and for a kernel that fails retries
variants of its source to name the construct the compiler does not take.

    python benchmarks/opencl_build_check.py prepare --models bert_base --targets opencl-texture
    # device tool `run`, carry [".device/clsrc"]:
    #   python3 benchmarks/opencl_build_check.py check --sources .device/clsrc --out $OUT
"""

from __future__ import annotations

import argparse
import ctypes
import gzip
import json
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / ".device" / "clsrc"
MARK = "// Function: "


def _opencl_sources(ex) -> list[str]:
    out = []

    def walk(m):
        for i in m.imports:
            try:
                src = i.inspect_source()
            except Exception:  # a module without source (the host code)
                src = ""
            if "__kernel" in src:
                out.append(src)
            walk(i)

    walk(ex.mod)
    return out


def split_kernels(source: str) -> dict[str, str]:
    """name -> the source the runtime builds for it (the section after its marker)."""
    parts = source.split(MARK)
    out = {}
    for part in parts[1:]:
        name = part.split("\n", 1)[0].strip()
        out[name] = part.split("\n", 1)[1]
    return out


def prepare(args: argparse.Namespace) -> None:
    import onnx

    from tvm_smartmem import frontend, targets, zoo
    from tvm_smartmem.report import compile_with

    out = Path(args.dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in args.models.split(","):
        mod, _ = frontend.from_onnx(onnx.load(str(zoo.model_path(name))))
        for target_name in args.targets.split(","):
            ex, _, _ = compile_with(mod, targets.get(target_name), "smartmem")
            kernels = {}
            for src in _opencl_sources(ex):
                kernels.update(split_kernels(src))
            with gzip.open(out / f"{name}-{target_name}.json.gz", "wt") as f:
                json.dump(kernels, f)
            print(f"{name} {target_name}: {len(kernels)} kernels", flush=True)


# -- check (GPU machine) -------------------------------------------------------------------------


def _variants(src: str) -> dict[str, str]:
    no_decls = "\n".join(line for line in src.split("\n")
                         if not (line.startswith("__kernel") and line.rstrip().endswith(");")))
    lanes = re.sub(r"\(\(float\*\)&(\w+)\)\[(\d)\]", lambda m: f"{m.group(1)}.s{m.group(2)}", src)
    return {"no_declarations": no_decls, "lane_selectors": lanes,
            "both": re.sub(r"\(\(float\*\)&(\w+)\)\[(\d)\]",
                           lambda m: f"{m.group(1)}.s{m.group(2)}", no_decls)}


class _CL:
    """The few OpenCL calls a build needs, through ctypes with their real signatures."""

    def __init__(self, lib: str = "libOpenCL.so.1"):
        vp, u, i, sz = ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_size_t
        cl = self.cl = ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        cl.clGetPlatformIDs.argtypes = [u, ctypes.POINTER(vp), ctypes.POINTER(u)]
        cl.clGetDeviceIDs.argtypes = [vp, ctypes.c_uint64, u, ctypes.POINTER(vp),
                                      ctypes.POINTER(u)]
        cl.clCreateContext.argtypes = [vp, u, ctypes.POINTER(vp), vp, vp, ctypes.POINTER(i)]
        cl.clCreateContext.restype = vp
        cl.clCreateProgramWithSource.argtypes = [vp, u, ctypes.POINTER(ctypes.c_char_p),
                                                 ctypes.POINTER(sz), ctypes.POINTER(i)]
        cl.clCreateProgramWithSource.restype = vp
        cl.clBuildProgram.argtypes = [vp, u, ctypes.POINTER(vp), ctypes.c_char_p, vp, vp]
        cl.clGetProgramBuildInfo.argtypes = [vp, vp, u, sz, vp, ctypes.POINTER(sz)]
        cl.clReleaseProgram.argtypes = [vp]
        n = u()
        cl.clGetPlatformIDs(0, None, ctypes.byref(n))
        plats = (vp * n.value)()
        cl.clGetPlatformIDs(n.value, plats, None)
        self.dev = vp()
        cl.clGetDeviceIDs(plats[0], 0xFFFFFFFF, 1, ctypes.byref(self.dev), None)  # ALL
        err = i()
        self.ctx = cl.clCreateContext(None, 1, ctypes.byref(self.dev), None, None,
                                      ctypes.byref(err))

    def build(self, src: str, options: str = "") -> tuple[int, str]:
        cl, err = self.cl, ctypes.c_int()
        data = ctypes.c_char_p(src.encode())
        prog = cl.clCreateProgramWithSource(self.ctx, 1, ctypes.byref(data), None,
                                            ctypes.byref(err))
        rc = cl.clBuildProgram(prog, 1, ctypes.byref(self.dev), options.encode(), None, None)
        size = ctypes.c_size_t()
        cl.clGetProgramBuildInfo(prog, self.dev, 0x1183, 0, None, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value + 1)
        cl.clGetProgramBuildInfo(prog, self.dev, 0x1183, size, log, None)  # BUILD_LOG
        cl.clReleaseProgram(prog)
        return rc, log.value.decode(errors="replace")


def check(args: argparse.Namespace) -> None:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cl = _CL(args.lib)
    results = {}
    for path in sorted(Path(args.sources).glob("*.json.gz")):
        with gzip.open(path, "rt") as f:
            kernels = json.load(f)
        failed = {}
        for name, section in kernels.items():
            src = f"{MARK}{name}\n{section}"  # exactly the section the runtime builds
            # the runtime built with -cl-kernel-arg-info until it read argument kinds from the
            # source; a kernel that fails only with it names that option as the trigger
            rc, log = cl.build(src, "-cl-kernel-arg-info")
            plain = cl.build(src)[0]
            if rc == 0 and plain == 0:
                continue
            entry = {"rc": rc, "log": log[-1500:], "variants": {"no_options": plain}}
            for tag, variant in _variants(src).items():
                entry["variants"][tag] = cl.build(variant, "-cl-kernel-arg-info")[0]
            entry["variants"]["cl-opt-disable"] = cl.build(src, "-cl-opt-disable")[0]
            failed[name] = entry
            if len(list(Path(args.out).glob("*.cl"))) < 4:  # $OUT takes a few files
                (Path(args.out) / f"{name[:80]}.cl").write_text(src)
        results[path.name] = {"kernels": len(kernels), "failed": failed}
        print(f"{path.name}: {len(kernels)} kernels, {len(failed)} fail to build "
              + json.dumps({k: v["variants"] for k, v in failed.items()}), flush=True)
    Path(args.out, "opencl_build_check.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--models", default="bert_base")
    a.add_argument("--targets", default="opencl-texture")
    a.add_argument("--dir", default=str(DEFAULT_DIR))
    c = sub.add_parser("check")
    c.add_argument("--sources", default=str(DEFAULT_DIR))
    c.add_argument("--out", default="clcheck_out")
    c.add_argument("--lib", default="libOpenCL.so.1")
    args = p.parse_args()
    {"prepare": prepare, "check": check}[args.cmd](args)


if __name__ == "__main__":
    main()

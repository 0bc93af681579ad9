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
            (out / f"{name}-{target_name}.json").write_text(json.dumps(kernels))
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
    def __init__(self, lib: str = "libOpenCL.so.1"):
        cl = self.cl = ctypes.CDLL(lib)
        n = ctypes.c_uint()
        cl.clGetPlatformIDs(0, None, ctypes.byref(n))
        plats = (ctypes.c_void_p * n.value)()
        cl.clGetPlatformIDs(n.value, plats, None)
        dev = ctypes.c_void_p()
        cl.clGetDeviceIDs(ctypes.c_void_p(plats[0]), ctypes.c_ulong(1 << 2), 1,
                          ctypes.byref(dev), None)  # CL_DEVICE_TYPE_GPU
        self.dev = dev
        err = ctypes.c_int()
        cl.clCreateContext.restype = ctypes.c_void_p
        self.ctx = ctypes.c_void_p(cl.clCreateContext(None, 1, ctypes.byref(dev), None, None,
                                                      ctypes.byref(err)))
        cl.clCreateProgramWithSource.restype = ctypes.c_void_p

    def build(self, src: str, options: str = "") -> tuple[int, str]:
        cl, err = self.cl, ctypes.c_int()
        data = ctypes.c_char_p(src.encode())
        prog = ctypes.c_void_p(cl.clCreateProgramWithSource(
            self.ctx, 1, ctypes.byref(data), None, ctypes.byref(err)))
        rc = cl.clBuildProgram(prog, 1, ctypes.byref(self.dev), options.encode(), None, None)
        size = ctypes.c_size_t()
        cl.clGetProgramBuildInfo(prog, self.dev, 0x1183, 0, None, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value + 1)
        cl.clGetProgramBuildInfo(prog, self.dev, 0x1183, size, log, None)  # BUILD_LOG
        cl.clReleaseProgram(prog)
        return rc, log.value.decode(errors="replace")


def check(args: argparse.Namespace) -> None:
    cl = _CL(args.lib)
    results = {}
    for path in sorted(Path(args.sources).glob("*.json")):
        kernels = json.loads(path.read_text())
        failed = {}
        for name, src in kernels.items():
            rc, log = cl.build(src)
            if rc == 0:
                continue
            entry = {"rc": rc, "log": log[-1500:], "variants": {}}
            for tag, variant in _variants(src).items():
                entry["variants"][tag] = cl.build(variant)[0]
            entry["variants"]["cl-opt-disable"] = cl.build(src, "-cl-opt-disable")[0]
            failed[name] = entry
            (Path(args.out) / f"{path.stem}__{name[:80]}.cl").write_text(src)
        results[path.stem] = {"kernels": len(kernels), "failed": failed}
        print(f"{path.stem}: {len(kernels)} kernels, {len(failed)} fail to build "
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

"""Check a model's GPU kernels one by one against the same TIR run on the CPU.

When a whole model is wrong (or crashes) on the GPU but right on llvm, the culprit is a kernel
whose GPU schedule or lowering differs from its meaning.  This builds every PrimFunc of the
smartmem pipeline for ``--target`` twice -- scheduled for the GPU, and unscheduled for llvm as
the reference -- and on the GPU machine runs each kernel on seeded random inputs in a process
of its own (an illegal address kills only that one), comparing every output buffer.

    python benchmarks/kernel_check.py prepare --model swin_hf --target cuda
    # device tool `run`, carry [".device/kcheck"]:
    #   python3 benchmarks/kernel_check.py measure --bundle .device/kcheck --out $OUT
    # -> $OUT/kernel_check.json: per kernel ok / max difference / failure
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gpu_machine as gm

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = ROOT / ".device" / "kcheck"


def prepare(args: argparse.Namespace) -> None:
    import tvm

    from tvm_smartmem import frontend, targets, zoo
    from tvm_smartmem.bench import git_commit
    from tvm_smartmem.pipeline import gpu_schedules, phase_passes

    bundle = Path(args.bundle)
    if bundle.exists():
        shutil.rmtree(bundle)
    (bundle / "models").mkdir(parents=True)
    mod, _ = frontend.from_onnx(zoo.model_path(args.model))
    tgt = targets.get(args.target)
    with tgt:
        passes = phase_passes(tgt, ("library_dispatch", "graph", "legalize", "layout", "fuse",
                                    "tir"))
        unscheduled = tvm.transform.Sequential(passes[:-1])(mod)  # all but the schedules
    kernels, gpu, cpu = [], {}, {}
    wanted = [w for w in args.only.split(",") if w]
    for gv, func in unscheduled.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if wanted and not any(w in gv.name_hint for w in wanted):
            continue
        symbol = f"k{len(kernels)}"
        shapes = [([int(d) for d in p.shape], str(p.dtype)) for p in func.params]
        kernels.append({"symbol": symbol, "name": gv.name_hint, "shapes": shapes})
        cpu[symbol] = func.with_attr("global_symbol", symbol)
        gpu[symbol] = func.with_attr("global_symbol", symbol)
    with tgt:
        gpu_mod = gpu_schedules()(tvm.IRModule(gpu))
    tvm.compile(gpu_mod, target=tgt).export_library(str(bundle / "models" / "gpu.so"))
    tvm.compile(tvm.IRModule(cpu), target="llvm").export_library(
        str(bundle / "models" / "cpu.so"))
    manifest = {"created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "git_commit": git_commit(), "model": args.model, "target": args.target,
                "kernels": kernels}
    gm.finish_bundle(bundle, manifest)


def _check_one(args: argparse.Namespace) -> None:
    """Stage 2: the kernels in one process, a JSON line each, printed before the next starts
    (an illegal address aborts the process: the last line names the kernel before it)."""
    import numpy as np
    import tvm
    from tvm_ffi.libinfo import load_lib_ctypes

    models = Path(os.environ["SMARTMEM_BUNDLE_MODELS"])
    load_lib_ctypes("tvm", "tvm_runtime_cuda", "RTLD_GLOBAL",
                    extra_lib_paths=[Path(tvm.__file__).resolve().parent / "lib"])
    gm._register_cuda_compiler()
    dev = tvm.cuda(0) if args.target == "cuda" else tvm.opencl(0)
    if args.target != "cuda":
        from tvm_smartmem.runtime import opencl

        opencl.load()
    cpu = tvm.runtime.load_module(str(models / "cpu.so"))
    gpu = tvm.runtime.load_module(str(models / "gpu.so"))
    for k in json.loads(Path(args.bundle, "manifest.json").read_text())["kernels"]:
        print(json.dumps({"start": k["symbol"]}), flush=True)
        outs = []
        for lib, device in ((cpu, tvm.cpu()), (gpu, dev)):
            rng = np.random.default_rng(0)
            arrays = [rng.standard_normal(s).astype(d) if d.startswith("float")
                      else np.zeros(s, d) for s, d in k["shapes"]]
            tensors = [tvm.runtime.tensor(a, device) for a in arrays]
            lib[k["symbol"]](*tensors)
            device.sync()
            outs.append([t.numpy().astype("float64") for t in tensors])
        diff = max(float(np.nanmax(np.abs(a - b))) if a.size else 0.0
                   for a, b in zip(*outs, strict=True))
        print(json.dumps({"symbol": k["symbol"], "max_difference": diff}), flush=True)


def measure(args: argparse.Namespace) -> None:
    bundle = Path(args.bundle).resolve()
    env = gm._setup_runtime(bundle, Path(args.site))
    manifest = json.loads((bundle / "manifest.json").read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "one", "--bundle", str(bundle), "--target",
           manifest["target"]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = {d["symbol"]: d["max_difference"] for d in lines if "symbol" in d}
    started = [d["start"] for d in lines if "start" in d]
    rows = []
    for k in manifest["kernels"]:
        row = {"name": k["name"], "symbol": k["symbol"]}
        if k["symbol"] in done:
            row.update(max_difference=done[k["symbol"]], ok=done[k["symbol"]] <= 1e-4)
        elif started and started[-1] == k["symbol"]:
            row.update(ok=False, failure=proc.stderr[-400:])
        else:
            row.update(ok=None, failure="not run (an earlier kernel aborted the process)")
        rows.append(row)
        print(f"{k['name'][:90]}: {row['ok']} {row.get('max_difference', '')}", flush=True)
    (out / "kernel_check.json").write_text(json.dumps({"manifest": manifest, "kernels": rows},
                                                      indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--model", required=True)
    a.add_argument("--target", default="cuda", choices=["cuda", "opencl"])
    a.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    a.add_argument("--only", default="", help="comma-separated substrings of kernel names")
    m = sub.add_parser("measure")
    m.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    m.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    m.add_argument("--site", default="/tmp/tvm_smartmem_site_kcheck")
    o = sub.add_parser("one")
    o.add_argument("--bundle")
    o.add_argument("--target")
    args = p.parse_args()
    {"prepare": prepare, "measure": measure, "one": _check_one}[args.cmd](args)


if __name__ == "__main__":
    main()

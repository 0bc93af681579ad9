"""Memory bandwidth the GEMM and conv rules reach, as a fraction of the device's measured peak.

Issue 6 asks how close the schedule library's kernels come to the memory system.  The peak is
*measured* here, not taken from a data sheet: a streaming copy through buffers (float4 loads and
stores), the same copy reading an RGBA image (``read_imagef``) and one writing an image, each
over 256 MiB.  Then every kernel under test -- the buffer GEMM the smartmem pipeline emits, the
texture GEMM of ``TextureMatmul`` (weights packed ``P[n, k / 4, k % 4]``), the conv2d kernels the
pipeline's GPU schedule makes (3x3, pointwise, depthwise) -- is timed, and its *compulsory*
traffic (every input read once, the output written once) over its time gives the bandwidth it
reached.  Compute-bound kernels (large GEMMs) cannot come near the peak by construction; their
GFLOP/s are reported next to it.  Every kernel is checked against numpy before it is timed.

    python benchmarks/bandwidth.py prepare                  # here: build, bundle
    # device tool `run`, carry [".device/bandwidth"]:
    #   python3 benchmarks/bandwidth.py measure --bundle .device/bandwidth --out $OUT \\
    #       --site /tmp/tvm_smartmem_site_bw
    python benchmarks/bandwidth.py report --results <files_at>/bandwidth_results.json

Writes ``benchmarks/results/bandwidth_h100.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import gpu_machine as gm

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = ROOT / ".device" / "bandwidth"
TEXTURE = "global.texture"
#: streaming kernels: [rows, cols, 4] float32 = 256 MiB (an image of 16384 x 1024 texels)
STREAM = (16384, 1024, 4)
#: (name, activation shape, weight shape [k, n]); the first is LLM decoding (a GEMV: its
#: weight is read once per output row, so it is bandwidth-bound), the rest the zoo's GEMMs
GEMMS = [("gemv_4096", (1, 4096), (4096, 4096)),
         ("bert_qkv", (128, 768), (768, 2304)),
         ("bert_ffn1", (128, 768), (768, 3072)),
         ("vit_ffn2", (197, 3072), (3072, 768))]
#: (name, input NCHW, weight OIHW, groups, padding)
CONVS = [("conv3x3_256", (1, 256, 14, 14), (256, 256, 3, 3), 1, 1),
         ("conv1x1_512", (1, 512, 28, 28), (128, 512, 1, 1), 1, 0),
         ("dwconv3x3_384", (1, 384, 56, 56), (384, 1, 3, 3), 384, 1)]


# -- kernels -----------------------------------------------------------------------------------


def _stream(kind: str, target):
    """A float4 copy of STREAM; ``kind``: buffer, read_texture or write_texture."""
    from tvm import s_tir, te, tirx

    from tvm_smartmem.tir.texture import LowerTextureAccess
    from tvm_smartmem.transform.texture import with_buffer_scope

    shape = [tirx.IntImm("int64", d) for d in STREAM]
    src = te.placeholder(shape, "float32", name="src")
    dst = te.compute(shape, lambda i, j, c: src[i, j, c], name="dst")
    func = te.create_prim_func([src, dst])
    if kind != "buffer":
        func = with_buffer_scope(func, 0 if kind == "read_texture" else 1, TEXTURE)
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("dst")
    i, j, c = sch.get_loops(block)
    bx, tx = sch.split(sch.fuse(i, j), [None, 256])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(c)
    import tvm

    mod = tvm.IRModule({"main": sch.mod["main"]})
    if kind != "buffer":
        mod = LowerTextureAccess()(mod)
    return mod["main"]


def _one_kernel(build, names: tuple[str, ...], target):
    """The single scheduled PrimFunc the smartmem pipeline makes of ``build``'s graph, with
    its parameters ordered as ``names`` then the output."""
    import tvm

    from tvm_smartmem.pipeline import UP_TO_KERNELS, smartmem_pipeline

    with target:
        mod = smartmem_pipeline(target, phases=UP_TO_KERNELS)(build())
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    if len(funcs) != 1:
        raise RuntimeError(f"expected one kernel, got {len(funcs)}")
    func = funcs[0]
    order = [next(p for p in func.params if p.name == n) for n in names]
    rest = [p for p in func.params if p.name not in names]
    return tvm.tirx.PrimFunc([*order, *rest], func.body, func.ret_type, func.attrs)


def _conv_graph(x_shape, w_shape, groups, pad):
    from tvm import relax

    def build():
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType(x_shape, "float32"))
        w = relax.Var("w", relax.TensorType(w_shape, "float32"))
        with bb.function("main", [x, w]):
            with bb.dataflow():
                y = bb.emit_output(relax.op.nn.conv2d(x, w, padding=pad, groups=groups))
            bb.emit_func_output(y)
        return bb.get()

    return build


def _conv_out(x_shape, w_shape, pad) -> list[int]:
    n, _, h, w = x_shape
    o, _, kh, kw = w_shape
    return [n, o, h + 2 * pad - kh + 1, w + 2 * pad - kw + 1]


def prepare(args: argparse.Namespace) -> None:
    import tvm

    from tvm_smartmem import targets
    from tvm_smartmem.bench import git_commit
    from tvm_smartmem.tir.schedules import TextureMatmul
    from tvm_smartmem.transform.texture import texture_matmul_primfunc

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import weight_layout_sweep as wl

    bundle = Path(args.bundle)
    if bundle.exists():
        shutil.rmtree(bundle)
    (bundle / "models").mkdir(parents=True)
    opencl, texture = targets.get("opencl"), targets.get("opencl-texture")
    funcs, kernels = {}, []

    def add(symbol, func, kind, arg_specs, flops=0.0, **extra):
        funcs[symbol] = func.with_attr("global_symbol", symbol)
        kernels.append({"symbol": symbol, "kind": kind, "args": arg_specs, "flops": flops,
                        **extra})

    def spec(shape, scope="global"):
        return {"shape": list(shape), "scope": scope}

    t0 = time.perf_counter()
    for kind in ("buffer", "read_texture", "write_texture"):
        with texture:
            add(f"stream_{kind}", _stream(kind, texture), "copy",
                [spec(STREAM, TEXTURE if kind == "read_texture" else "global"),
                 spec(STREAM, TEXTURE if kind == "write_texture" else "global")])
    for name, a, (k, n) in GEMMS:
        out = [*a[:-1], n]
        flops = 2.0 * math.prod(a) * n
        add(f"{name}__buffer", wl._gemm(a, (k, n), "KN", opencl), "matmul",
            [spec(a), spec((k, n)), spec(out)], flops)
        with texture:
            func = texture_matmul_primfunc(list(a), n, "float32")
            sch = TextureMatmul().apply(func, texture, False)
            if sch is None:
                print(f"  {name}: TextureMatmul does not apply", flush=True)
                continue
            from tvm_smartmem.tir.texture import LowerTextureAccess

            lowered = LowerTextureAccess()(tvm.IRModule({"main": sch.mod["main"]}))["main"]
        add(f"{name}__texture", lowered, "matmul",
            [spec(a), spec((n, k // 4, 4), TEXTURE), spec(out)], flops, packed=True)
    for name, x, w, groups, pad in CONVS:
        out = _conv_out(x, w, pad)
        flops = 2.0 * math.prod(out) * math.prod(w[1:])
        func = _one_kernel(_conv_graph(x, w, groups, pad), ("x", "w"), opencl)
        add(f"{name}__buffer", func, "conv", [spec(x), spec(w), spec(out)], flops,
            groups=groups, padding=pad)
    lib = tvm.compile(tvm.IRModule(funcs), target=texture)
    lib.export_library(str(bundle / "models" / "bandwidth-opencl.so"))
    manifest = {"created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "git_commit": git_commit(), "tvm": tvm.__version__,
                "library": "bandwidth-opencl.so", "kernels": kernels}
    print(f"{len(funcs)} kernels built in {time.perf_counter() - t0:.0f} s", flush=True)
    gm.finish_bundle(bundle, manifest)


# -- measure (GPU machine) ---------------------------------------------------------------------


def _reference(kernel: dict, inputs: list):
    import numpy as np

    if kernel["kind"] == "copy":
        return inputs[0]
    if kernel["kind"] == "matmul":
        a, w = (x.astype("float64") for x in inputs)
        if kernel.get("packed"):  # P[n, k / 4, k % 4] -> W[k, n]
            w = w.reshape(w.shape[0], -1).T
        return (a @ w).astype("float32")
    x, w = (v.astype("float64") for v in inputs)
    pad, groups = kernel["padding"], kernel["groups"]
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    o, ci, kh, kw = w.shape
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # n c h w kh kw
    n, c, h, wd = win.shape[:4]
    win = win.reshape(n, groups, c // groups, h, wd, kh, kw)
    wg = w.reshape(groups, o // groups, ci, kh, kw)
    return np.einsum("ngchwyx,gocyx->ngohw", win, wg).reshape(n, o, h, wd).astype("float32")


def _stage2(args: argparse.Namespace) -> None:
    import numpy as np
    import tvm

    from tvm_smartmem import numerics
    from tvm_smartmem.runtime import opencl

    bundle = Path(args.bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    opencl.load()
    dev = tvm.opencl(0)
    lib = tvm.runtime.load_module(str(Path(os.environ["SMARTMEM_BUNDLE_MODELS"])
                                      / manifest["library"]))
    rng = np.random.default_rng(0)
    results = {"manifest": manifest, "protocol": {"repeat": args.repeat, "number": args.number},
               "machine": {"host": platform.node(), "opencl": opencl.describe()},
               "kernels": {}}
    for kernel in manifest["kernels"]:
        specs = kernel["args"]
        host = [rng.standard_normal(s["shape"]).astype("float32") for s in specs[:-1]]
        tensors = []
        for s, value in zip(specs, [*host, None], strict=True):
            t = tvm.runtime.empty(s["shape"], "float32", dev, mem_scope=s["scope"])
            t.copyfrom(value if value is not None else np.zeros(s["shape"], "float32"))
            tensors.append(t)
        entry = results["kernels"].setdefault(kernel["symbol"], {})
        try:
            lib[kernel["symbol"]](*tensors)
            ok, err = numerics.compare([tensors[-1].numpy()], [_reference(kernel, host)])
            timer = lib.time_evaluator(kernel["symbol"], dev, number=args.number,
                                       repeat=args.repeat)
            entry.update(ok=bool(ok), error=err,
                         median_us=float(np.median(timer(*tensors).results)) * 1e6)
        except Exception as exc:  # record and go on
            entry.update(ok=False, failure=str(exc)[:300])
        print(kernel["symbol"], entry, flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bandwidth_results.json").write_text(json.dumps(results, indent=1))


def measure(args: argparse.Namespace) -> None:
    if args.stage2:
        _stage2(args)
        return
    gm.relaunch_stage2(__file__, args)


# -- report ------------------------------------------------------------------------------------


def traffic(kernel: dict) -> int:
    """Compulsory bytes: every argument once (inputs read, the output written)."""
    return sum(4 * math.prod(s["shape"]) for s in kernel["args"])


def rows(data: dict) -> tuple[float, list[dict]]:
    """(measured peak GB/s, one row per timed kernel)."""
    kernels = {k["symbol"]: k for k in data["manifest"]["kernels"]}
    out = []
    for symbol, entry in data["kernels"].items():
        if not entry.get("ok"):
            out.append({"kernel": symbol, "ok": False, "failure": entry.get("failure", "")})
            continue
        k, us = kernels[symbol], entry["median_us"]
        out.append({"kernel": symbol, "kind": k["kind"], "ok": True, "median_us": us,
                    "bytes": traffic(k), "gbps": traffic(k) / us / 1e3,
                    "gflops": k["flops"] / us / 1e3 if k["flops"] else None})
    peak = max((r["gbps"] for r in out if r.get("ok") and r["kind"] == "copy"), default=None)
    for r in out:
        if r.get("ok") and peak:
            r["fraction_of_peak"] = r["gbps"] / peak
    return peak, out


def report(args: argparse.Namespace) -> None:
    data = json.loads(Path(args.results).read_text())
    out_dir = ROOT / "benchmarks" / "results"
    peak, table = rows(data)
    data.update(command=args.command, peak_gbps=peak, rows=table)
    (out_dir / f"{args.name}.json").write_text(json.dumps(data, indent=1))
    devices = data["machine"]["opencl"].get("devices") or [{}]
    md = [f"# Memory bandwidth of the schedule rules ({devices[0].get('name', 'GPU')}, "
          "OpenCL)", "",
          f"Median of {data['protocol']['repeat']} x {data['protocol']['number']} calls; every "
          "kernel checked against numpy (fp32 bound 1e-4) before timing; compulsory traffic = "
          "every argument once.  Peak = the fastest streaming copy below "
          f"(**{peak:.0f} GB/s**).  Compiled at `{data['manifest']['git_commit']}`.", "",
          "| kernel | us | MiB moved | GB/s | of peak | GFLOP/s |", "|---|---|---|---|---|---|"]
    for r in table:
        if not r["ok"]:
            md.append(f"| {r['kernel']} | failed: {r['failure'][:80]} | | | | |")
            continue
        gf = f"{r['gflops']:.0f}" if r["gflops"] else ""
        md.append(f"| {r['kernel']} | {r['median_us']:.1f} | {r['bytes'] / 2**20:.1f} | "
                  f"{r['gbps']:.0f} | {r['fraction_of_peak']:.1%} | {gf} |")
    md += ["", "Reading: the GEMV (LLM decoding) and the depthwise conv do a few FLOPs per "
           "byte, so they are the bandwidth-bound cases where the fraction measures the rule; "
           "the other GEMMs and the dense convs are compute-bound and their fraction is low by "
           "construction (their GFLOP/s say more).  TextureMatmul does not take m = 1 (a GEMV "
           "reads each weight texel once; GEMV stays with the buffer rule).", "",
           f"Reproduce: `{args.command}`", ""]
    (out_dir / f"{args.name}.md").write_text("\n".join(md))
    _plot(table, peak, out_dir / f"{args.name}.png")
    print("\n".join(md))


def _plot(table: list[dict], peak: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in table if r["ok"]]
    colours = {"copy": "#888888", "matmul": "#1f77b4", "conv": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh([r["kernel"] for r in ok], [r["fraction_of_peak"] for r in ok],
            color=[colours[r["kind"]] for r in ok])
    ax.set_xlabel(f"fraction of measured peak ({peak:.0f} GB/s)")
    ax.invert_yaxis()
    ax.set_title("Bandwidth reached per kernel (compulsory traffic / time)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    m = sub.add_parser("measure")
    m.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    m.add_argument("--out", default="gpu_out")
    m.add_argument("--site", default="/tmp/tvm_smartmem_site_bw")
    m.add_argument("--repeat", type=int, default=5)
    m.add_argument("--number", type=int, default=20)
    m.add_argument("--stage2", action="store_true", help=argparse.SUPPRESS)
    r = sub.add_parser("report")
    r.add_argument("--results", required=True)
    r.add_argument("--name", default="bandwidth_h100")
    r.add_argument("--command", default="see the docstring of benchmarks/bandwidth.py")
    args = p.parse_args()
    {"prepare": prepare, "measure": measure, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()

"""Which layout should a matmul weight be stored in, per target?  Measured on the GPU machine.

``SelectLayouts`` stores weights either as frontends give them (``KN``: ``B[k, n]``) or with the
reduction dimension contiguous (``NK``: ``B^T[n, k]``, read through a transpose folded into the
GEMM's loads).  This script builds both variants of the zoo's weight GEMMs exactly as the
smartmem pipeline compiles them (layout elimination, TIR passes, ``TunedMatmul``), times them
on CUDA and NVIDIA OpenCL with the GEMM sweep's protocol (every kernel checked against numpy),
and records the faster layout (geomean over the shapes) as ``weight_layout`` per target in
``tvm_smartmem/tir/matmul_configs.json``.

    python benchmarks/weight_layout_sweep.py prepare              # here: build, bundle
    # device tool `run`, carry [".device/layout"]:
    #   python3 benchmarks/matmul_sweep.py measure --bundle .device/layout --out $OUT \\
    #       --site /tmp/tvm_smartmem_site_layout
    python benchmarks/weight_layout_sweep.py report --results <files_at>/gemm_results.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import gpu_machine as gm
import matmul_sweep as ms

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = ROOT / ".device" / "layout"
#: the sweep's shapes whose B operand is a weight (2-D)
SHAPES = [(n, a, b) for n, a, b in ms.SHAPES if len(b) == 2]


def _gemm(a_shape, b_shape, layout: str, target):
    """The one scheduled PrimFunc the pipeline makes of ``a @ B`` with B stored in ``layout``."""
    import tvm
    from tvm import relax

    from tvm_smartmem.pipeline import UP_TO_KERNELS, smartmem_pipeline

    stored = b_shape if layout == "KN" else b_shape[::-1]
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType(a_shape, "float32"))
    b = relax.Var("b", relax.TensorType(stored, "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            w = b if layout == "KN" else bb.emit(relax.op.permute_dims(b, [1, 0]))
            out = bb.emit_output(relax.op.matmul(a, w))
        bb.emit_func_output(out)
    with target:
        mod = smartmem_pipeline(target, phases=UP_TO_KERNELS)(bb.get())
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    if len(funcs) != 1:
        raise RuntimeError(f"expected one kernel for {layout} {a_shape}x{b_shape}, "
                           f"got {len(funcs)}")
    # the measure step calls (a, b, out); fusion may have ordered the inputs otherwise
    func = funcs[0]
    order = [next(p for p in func.params if p.name == n) for n in ("a", "b")]
    rest = [p for p in func.params if p.name not in ("a", "b")]
    return tvm.tirx.PrimFunc([*order, *rest], func.body, func.ret_type, func.attrs)


def prepare(args: argparse.Namespace) -> None:
    import tvm

    from tvm_smartmem import targets

    bundle, manifest = ms.start_bundle(args.bundle, [], SHAPES)
    for target_name in ms.TARGETS:
        tgt = targets.get(target_name)
        funcs, t0 = {}, time.perf_counter()
        for name, a_shape, b_shape in SHAPES:
            for layout in ("KN", "NK"):
                symbol = f"{name}__{layout.lower()}"  # the measure step transposes B for __nk
                funcs[symbol] = _gemm(a_shape, b_shape, layout, tgt) \
                    .with_attr("global_symbol", symbol)
        lib = tvm.compile(tvm.IRModule(funcs), target=tgt)
        path = bundle / "models" / f"layout-{target_name}.so"
        lib.export_library(str(path))
        manifest["libraries"][target_name] = {"library": path.name, "functions": sorted(funcs)}
        print(f"{target_name}: {len(funcs)} kernels built in {time.perf_counter() - t0:.0f} s",
              flush=True)
    gm.finish_bundle(bundle, manifest)


def report(args: argparse.Namespace) -> None:
    data = json.loads(Path(args.results).read_text())
    out_dir = ROOT / "benchmarks" / "results"
    data["command"] = args.command
    (out_dir / f"{args.name}.json").write_text(json.dumps(data, indent=1))
    shapes = data["manifest"]["shapes"]
    table_path = ROOT / "tvm_smartmem" / "tir" / "matmul_configs.json"
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    md = [f"# Weight layout of the GEMMs on the H100 ({data['machine']['cuda_device']})", "",
          "Each zoo weight GEMM compiled by the smartmem pipeline with the weight stored `KN` "
          "(as imported) or `NK` (reduction dimension contiguous, read through a folded "
          f"transpose); median of {data['protocol']['repeat']} x {data['protocol']['number']} "
          f"calls, every kernel checked against numpy. Commit `{data['manifest']['git_commit']}`.",
          ""]
    for target_name, times in data["times"].items():
        md += [f"## {target_name}", "", "| shape | FLOPs | KN (us) | NK (us) | NK speedup |",
               "|---|---|---|---|---|"]
        ratios = []
        for s in shapes:
            kn, nk = times.get(f"{s['name']}__kn", {}), times.get(f"{s['name']}__nk", {})
            if not (kn.get("ok") and nk.get("ok")):
                md.append(f"| {s['name']} | | {kn.get('failure', 'mismatch')} | "
                          f"{nk.get('failure', 'mismatch')} | |")
                continue
            ratios.append(kn["median_us"] / nk["median_us"])
            md.append(f"| {s['name']} {s['a']}x{s['b']} | {ms._flops(s):.2e} | "
                      f"{kn['median_us']:.1f} | {nk['median_us']:.1f} | {ratios[-1]:.2f}x |")
        if len(ratios) != len(shapes):
            md += ["", "not every shape ran correctly in both layouts: no choice recorded", ""]
            continue
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        layout = "NK" if geo > 1.0 else "KN"
        md += ["", f"Geomean NK over KN: **{geo:.2f}x** -> `{layout}`.", ""]
        entry = table.setdefault(target_name, {})
        entry["weight_layout"] = layout
        entry["weight_layout_measured"] = f"benchmarks/results/{args.name}.json"
        entry["weight_layout_nk_speedup"] = round(geo, 3)
    ms.write_report(out_dir / f"{args.name}.md", md, args.command, table_path, table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    r = sub.add_parser("report")
    r.add_argument("--results", required=True)
    r.add_argument("--name", default="weight_layout_h100")
    r.add_argument("--command", default="see the docstring of benchmarks/weight_layout_sweep.py")
    args = p.parse_args()
    {"prepare": prepare, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()

"""Sweep the knobs of the GEMM schedule on the zoo's matmul shapes, on the GPU machine.

The GEMMs are most of a transformer's time, and dlight's ``gpu.Matmul`` tiles them with fixed
knobs.  This script measures candidate knob settings and writes the winner per target into
``tvm_smartmem/tir/matmul_configs.json``, which :class:`tvm_smartmem.tir.matmul.TunedMatmul`
(the smartmem pipeline's GEMM rule) reads.

    python benchmarks/matmul_sweep.py prepare                  # here: schedule + build, bundle
    # device tool `run`, carry [".device/gemm"]:
    #   python3 benchmarks/matmul_sweep.py measure --bundle .device/gemm --out $OUT
    python benchmarks/matmul_sweep.py report --results <files_at>/gemm_results.json

Every candidate is checked against numpy before it is timed; the winner is the configuration
with the best geometric-mean speedup over dlight's own setting across all shapes (one setting
per target keeps the rule simple and avoids over-fitting one shape).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import platform
import shutil
import time
from pathlib import Path

import gpu_machine as gm

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = ROOT / ".device" / "gemm"
TARGETS = ("cuda", "opencl")
#: (name, A shape, B shape): the zoo's projections, FFNs and attention products (fp32)
SHAPES = [
    ("bert_proj", (1, 128, 768), (768, 768)),
    ("bert_ffn1", (1, 128, 768), (768, 3072)),
    ("bert_ffn2", (1, 128, 3072), (3072, 768)),
    ("gpt2_qkv", (1, 128, 768), (768, 2304)),
    ("deit_qkv", (1, 197, 384), (384, 1152)),
    ("deit_ffn2", (1, 197, 1536), (1536, 384)),
    ("attn_scores", (12, 128, 64), (12, 64, 128)),
    ("attn_values", (12, 128, 128), (12, 128, 64)),
]


def candidates() -> list[dict]:
    """Knob settings to try: thread blocks x micro tiles x vector widths x reduction steps."""
    out = []
    for (bx, by), (mx, my), vec, k in itertools.product(
            [(8, 16), (16, 16), (16, 8)], [(4, 4), (8, 4), (4, 8), (8, 8)], [2, 4],
            [8, 16]):
        if mx % vec or my % vec:
            continue
        out.append({"block_size_x": bx, "block_size_y": by, "vthread_x": 1, "vthread_y": 1,
                    "micro_size_x": mx, "micro_size_y": my, "micro_size_k": k,
                    "vector_size": vec, "unroll": 256, "use_shared": True,
                    "storage_align": True, "inner_x": False})
    return out


def _matmul_primfunc(a_shape, b_shape):
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType(a_shape, "float32"))
    b = relax.Var("b", relax.TensorType(b_shape, "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(a, b))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    return next(f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


def start_bundle(path: str, configs: list[dict], shapes: list) -> tuple[Path, dict]:
    """A fresh bundle directory and the manifest every GEMM sweep writes (this one,
    ``weight_layout_sweep.py``, ``texture_matmul_sweep.py``); ``measure`` reads it."""
    import tvm

    from tvm_smartmem.bench import git_commit

    bundle = Path(path)
    if bundle.exists():
        shutil.rmtree(bundle)
    (bundle / "models").mkdir(parents=True)
    manifest = {"created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "git_commit": git_commit(), "tvm": tvm.__version__, "configs": configs,
                "shapes": [{"name": n, "a": a, "b": b} for n, a, b in shapes], "libraries": {}}
    return bundle, manifest


def prepare(args: argparse.Namespace) -> None:
    import tvm
    from tvm.s_tir.dlight import gpu

    from tvm_smartmem import targets
    from tvm_smartmem.tir.matmul import TunedMatmul

    configs = candidates()
    bundle, manifest = start_bundle(args.bundle, configs, SHAPES)
    for target_name in TARGETS:
        tgt = targets.get(target_name)
        funcs, t0 = {}, time.perf_counter()
        for name, a_shape, b_shape in SHAPES:
            func = _matmul_primfunc(a_shape, b_shape)
            rules = [("default", gpu.Matmul())] + [
                (f"c{i}", TunedMatmul(gpu.Matmul.Config(**c))) for i, c in enumerate(configs)]
            for tag, rule in rules:
                try:
                    sch = rule.apply(func, tgt, False)
                except Exception as err:  # a knob setting this shape cannot take
                    print(f"  {target_name} {name} {tag}: not schedulable ({err})"[:200])
                    continue
                if sch is None:
                    continue
                symbol = f"{name}__{tag}"
                funcs[symbol] = sch.mod["main"].with_attr("global_symbol", symbol)
        lib = tvm.compile(tvm.IRModule(funcs), target=tgt)
        path = bundle / "models" / f"gemm-{target_name}.so"
        lib.export_library(str(path))
        manifest["libraries"][target_name] = {"library": path.name, "functions": sorted(funcs)}
        print(f"{target_name}: {len(funcs)} kernels built in {time.perf_counter() - t0:.0f} s",
              flush=True)
    gm.finish_bundle(bundle, manifest)


def sweep_session(args: argparse.Namespace) -> tuple[dict, Path, Path, dict]:
    """Stage 2 of a sweep on the GPU machine (this one, ``split_k_sweep.py``): the manifest,
    the unpacked libraries' folder, the output folder, and the results record to fill -- with
    CUDA's runtime (nvcc for its kernels) and the project's OpenCL runtime loaded."""
    import os

    import tvm
    from tvm_ffi.libinfo import load_lib_ctypes

    from tvm_smartmem.runtime import opencl

    models_dir = Path(os.environ["SMARTMEM_BUNDLE_MODELS"])
    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    load_lib_ctypes("tvm", "tvm_runtime_cuda", "RTLD_GLOBAL",
                    extra_lib_paths=[Path(tvm.__file__).resolve().parent / "lib"])
    gm._register_cuda_compiler()
    opencl.load()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"manifest": {k: v for k, v in manifest.items() if k != "libraries"},
               "machine": {"host": platform.node(), "cuda_device": tvm.cuda(0).device_name,
                           "opencl": opencl.describe().get("platform")},
               "protocol": {"repeat": args.repeat, "number": args.number}, "times": {}}
    return manifest, models_dir, out, results


def _measure_stage2(args: argparse.Namespace) -> None:
    import numpy as np
    import tvm

    from tvm_smartmem import numerics

    manifest, models_dir, out, results = sweep_session(args)
    shapes = {s["name"]: s for s in manifest["shapes"]}
    rng = np.random.default_rng(0)
    data = {n: (rng.standard_normal(s["a"]).astype("float32"),
                rng.standard_normal(s["b"]).astype("float32")) for n, s in shapes.items()}
    for target_name, entry in manifest["libraries"].items():
        dev = tvm.cuda(0) if target_name == "cuda" else tvm.opencl(0)
        t0 = time.perf_counter()
        lib = tvm.runtime.load_module(str(models_dir / entry["library"]))
        times = results["times"].setdefault(target_name, {})
        print(f"{target_name}: loaded in {time.perf_counter() - t0:.0f} s", flush=True)
        for symbol in entry["functions"]:
            shape = symbol.split("__")[0]
            a, b = data[shape]
            ref = np.matmul(a.astype("float64"), b.astype("float64")).astype("float32")
            # `__nk` kernels (weight_layout_sweep.py) take the weight stored transposed;
            # `__tex*` kernels (texture_matmul_sweep.py) take it packed into an RGBA image
            tag = symbol.split("__")[1]
            stored = np.ascontiguousarray(b.T) if tag == "nk" else b
            ta = tvm.runtime.tensor(a, dev)
            if tag.startswith("tex"):
                k, n = b.shape
                tb = tvm.runtime.empty((n, k // 4, 4), "float32", dev, mem_scope="global.texture")
                tb.copyfrom(np.ascontiguousarray(b.T.reshape(n, k // 4, 4)))
            else:
                tb = tvm.runtime.tensor(stored, dev)
            tc = tvm.runtime.tensor(np.zeros(ref.shape, "float32"), dev)
            try:
                lib[symbol](ta, tb, tc)
                ok, err = numerics.compare([tc.numpy()], [ref])
                timer = lib.time_evaluator(symbol, dev, number=args.number, repeat=args.repeat)
                med = float(np.median(timer(ta, tb, tc).results)) * 1e6
                times[symbol] = {"ok": bool(ok), "error": err, "median_us": med}
            except Exception as exc:  # record and go on
                times[symbol] = {"ok": False, "failure": str(exc)[:300]}
        (out / "gemm_results.json").write_text(json.dumps(results, indent=1))
        print(f"{target_name}: {len(times)} kernels timed", flush=True)
    print(f"wrote {out / 'gemm_results.json'}")


def measure(args: argparse.Namespace) -> None:
    if args.stage2:
        _measure_stage2(args)
        return
    gm.relaunch_stage2(__file__, args)


# -- report ------------------------------------------------------------------------------------


def _flops(shape: dict) -> float:
    a, b = shape["a"], shape["b"]
    batch = math.prod(a[:-2])
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def choose(times: dict, shapes: list[dict]) -> tuple[str | None, dict]:
    """The tag with the best geomean speedup over ``default`` on every shape (a tag that fails
    or mismatches on any shape is out), and its per-shape speedups."""
    tags = {s.split("__")[1] for s in times}
    best, best_score, best_rows = None, 0.0, {}
    for tag in sorted(tags - {"default"}):
        rows = {}
        for s in shapes:
            base, cand = times.get(f"{s['name']}__default"), times.get(f"{s['name']}__{tag}")
            if not base or not cand or not cand.get("ok") or not base.get("ok"):
                rows = None
                break
            rows[s["name"]] = base["median_us"] / cand["median_us"]
        if not rows:
            continue
        score = math.exp(sum(math.log(v) for v in rows.values()) / len(rows))
        if score > best_score:
            best, best_score, best_rows = tag, score, rows
    return best, best_rows


def report(args: argparse.Namespace) -> None:
    data = json.loads(Path(args.results).read_text())
    out_dir = ROOT / "benchmarks" / "results"
    stem = args.name
    data["command"] = args.command
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1))
    shapes, configs = data["manifest"]["shapes"], data["manifest"]["configs"]
    table_path = ROOT / "tvm_smartmem" / "tir" / "matmul_configs.json"
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    md = [f"# GEMM schedule sweep on the H100 ({data['machine']['cuda_device']})", "",
          f"{len(configs)} knob settings of the dlight GEMM schedule per target, on the zoo's "
          f"fp32 matmul shapes; median of {data['protocol']['repeat']} x "
          f"{data['protocol']['number']} calls, every kernel checked against numpy. Compiled "
          f"at commit `{data['manifest']['git_commit']}`.", ""]
    for target_name, times in data["times"].items():
        tag, rows = choose(times, shapes)
        md += [f"## {target_name}", ""]
        if tag is None:
            md.append("no candidate beat the default on every shape\n")
            continue
        config = configs[int(tag[1:])]
        md += ["| shape | FLOPs | dlight default (us) | chosen (us) | speedup | "
               "chosen TFLOP/s |", "|---|---|---|---|---|---|"]
        for s in shapes:
            base = times[f"{s['name']}__default"]["median_us"]
            ours = times[f"{s['name']}__{tag}"]["median_us"]
            md.append(f"| {s['name']} {s['a']}x{s['b']} | {_flops(s):.2e} | {base:.1f} | "
                      f"{ours:.1f} | {base / ours:.2f}x | {_flops(s) / ours / 1e6:.2f} |")
        geo = math.exp(sum(math.log(v) for v in rows.values()) / len(rows))
        md += ["", f"Chosen: `{tag}` = `{json.dumps(config)}`, geomean **{geo:.2f}x** over "
               "dlight's setting.", ""]
        table[target_name] = {"config": config, "measured": f"benchmarks/results/{stem}.json",
                              "geomean_speedup": round(geo, 3),
                              "device": data["machine"]["cuda_device"]}
    write_report(out_dir / f"{stem}.md", md, args.command, table_path, table)


def write_report(md_path: Path, md: list[str], command: str, table_path: Path,
                 table: dict) -> None:
    """The markdown (with the command that made it) and the updated knob table, both shown."""
    md = [*md, f"Reproduce: `{command}`", ""]
    md_path.write_text("\n".join(md))
    table_path.write_text(json.dumps(table, indent=2) + "\n")
    print("\n".join(md))
    print(f"wrote {table_path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    m = sub.add_parser("measure")
    m.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    m.add_argument("--out", default="gpu_out")
    m.add_argument("--site", default="/tmp/tvm_smartmem_site_gemm")
    m.add_argument("--repeat", type=int, default=5)
    m.add_argument("--number", type=int, default=20)
    m.add_argument("--stage2", action="store_true", help=argparse.SUPPRESS)
    r = sub.add_parser("report")
    r.add_argument("--results", required=True)
    r.add_argument("--name", default="matmul_sweep_h100")
    r.add_argument("--command", default="see the docstring of benchmarks/matmul_sweep.py")
    args = p.parse_args()
    {"prepare": prepare, "measure": measure, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()


"""Do texture-packed weights pay on this GPU, and with which GEMM knobs?  Measured on the device.

``PackWeightsToTexture`` stores matmul weights as RGBA images ``P[n, k // 4, k % 4]`` and
``TextureMatmul`` schedules the GEMMs that read them.  This script builds the zoo's weight GEMMs
three ways for NVIDIA OpenCL -- the smartmem buffer GEMM (``buffer``, what the buffer pipeline
runs), the texture GEMM with the current knobs (``texdefault``), and the texture GEMM with each
candidate setting of the knobs, staging the weight tile in local memory or reading texels
straight through the texture cache (``use_shared``) -- and times them with the GEMM sweep's
protocol (every kernel checked against numpy).  The best texture setting over the buffer GEMM
(geomean) is recorded as the ``opencl-texture`` entry of ``tvm_smartmem/tir/matmul_configs.json``
when it beats the current one; the report says whether textures beat buffers at all.

    python benchmarks/texture_matmul_sweep.py prepare              # here: build, bundle
    # device tool `run`, carry [".device/texgemm"]:
    #   python3 benchmarks/matmul_sweep.py measure --bundle .device/texgemm --out $OUT \\
    #       --site /tmp/tvm_smartmem_site_texgemm
    python benchmarks/texture_matmul_sweep.py report --results <files_at>/gemm_results.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import gpu_machine as gm
import matmul_sweep as ms
import weight_layout_sweep as wl

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = ROOT / ".device" / "texgemm"
SHAPES = wl.SHAPES


def candidates() -> list[dict]:
    """Thread blocks x micro tiles x reduction steps x (local-memory staging or not); the
    fetch is always 4 lanes wide (one texel)."""
    out = []
    for (bx, by), (mx, my), k, shared in itertools.product(
            [(8, 16), (16, 16), (16, 8)], [(4, 4), (8, 4), (4, 8), (8, 8)], [8, 16],
            [True, False]):
        out.append({"block_size_x": bx, "block_size_y": by, "vthread_x": 1, "vthread_y": 1,
                    "micro_size_x": mx, "micro_size_y": my, "micro_size_k": k,
                    "vector_size": 4, "unroll": 256, "use_shared": shared,
                    "storage_align": shared, "inner_x": False})
    return out


def _texture_gemm(a_shape, n: int, rule, target):
    import tvm

    from tvm_smartmem.tir.texture import LowerTextureAccess
    from tvm_smartmem.transform.texture import texture_matmul_primfunc

    func = texture_matmul_primfunc(list(a_shape), n, "float32")
    sch = rule.apply(func, target, False)
    if sch is None:
        raise RuntimeError("rule does not apply")
    mod = LowerTextureAccess()(tvm.IRModule({"main": sch.mod["main"]}))
    return mod["main"]


def prepare(args: argparse.Namespace) -> None:
    import tvm
    from tvm.s_tir.dlight import gpu

    from tvm_smartmem import targets
    from tvm_smartmem.tir.schedules import TextureMatmul

    configs = candidates()
    bundle, manifest = ms.start_bundle(args.bundle, configs, SHAPES)
    tgt = targets.get("opencl-texture")
    funcs, t0 = {}, time.perf_counter()
    for name, a_shape, b_shape in SHAPES:
        funcs[f"{name}__buffer"] = wl._gemm(a_shape, b_shape, "KN", targets.get("opencl"))
        rules = [("texdefault", TextureMatmul())] + [
            (f"tex{i}", TextureMatmul(gpu.Matmul.Config(**c))) for i, c in enumerate(configs)]
        for tag, rule in rules:
            try:
                with tgt:
                    func = _texture_gemm(a_shape, b_shape[1], rule, tgt)
            except Exception as err:  # a knob setting this shape cannot take
                print(f"  {name} {tag}: not schedulable ({err})"[:200])
                continue
            funcs[f"{name}__{tag}"] = func
    funcs = {s: f.with_attr("global_symbol", s) for s, f in funcs.items()}
    lib = tvm.compile(tvm.IRModule(funcs), target=tgt)
    path = bundle / "models" / "texgemm-opencl.so"
    lib.export_library(str(path))
    manifest["libraries"]["opencl"] = {"library": path.name, "functions": sorted(funcs)}
    print(f"opencl-texture: {len(funcs)} kernels built in {time.perf_counter() - t0:.0f} s",
          flush=True)
    gm.finish_bundle(bundle, manifest)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def report(args: argparse.Namespace) -> None:
    data = json.loads(Path(args.results).read_text())
    out_dir = ROOT / "benchmarks" / "results"
    data["command"] = args.command
    (out_dir / f"{args.name}.json").write_text(json.dumps(data, indent=1))
    shapes, configs = data["manifest"]["shapes"], data["manifest"]["configs"]
    times = data["times"]["opencl"]
    table_path = ROOT / "tvm_smartmem" / "tir" / "matmul_configs.json"
    table = json.loads(table_path.read_text()) if table_path.exists() else {}

    def over_buffer(tag: str) -> dict | None:
        rows = {}
        for s in shapes:
            base, cand = times.get(f"{s['name']}__buffer"), times.get(f"{s['name']}__{tag}")
            if not (base and cand and base.get("ok") and cand.get("ok")):
                return None
            rows[s["name"]] = base["median_us"] / cand["median_us"]
        return rows

    tags = sorted({k.split("__")[1] for k in times if k.split("__")[1].startswith("tex")})
    scored = {t: r for t in tags if (r := over_buffer(t))}
    best = max(scored, key=lambda t: _geomean(list(scored[t].values()))) if scored else None
    md = [f"# Texture-packed weight GEMMs on the H100 ({data['machine']['cuda_device']}, "
          "NVIDIA OpenCL)", "",
          f"The zoo's weight GEMMs: the smartmem buffer GEMM vs the texture GEMM (weight packed "
          f"`P[n, k/4, k%4]` in an RGBA image) with its current knobs and {len(configs)} "
          f"candidate settings; median of {data['protocol']['repeat']} x "
          f"{data['protocol']['number']} calls, every kernel checked against numpy. Commit "
          f"`{data['manifest']['git_commit']}`.", ""]
    if best is None:
        md += ["no texture setting ran correctly on every shape", ""]
    else:
        md += ["| shape | buffer (us) | texture, current knobs (us) | texture, best knobs (us) "
               "| best over buffer |", "|---|---|---|---|---|"]
        for s in shapes:
            buf = times[f"{s['name']}__buffer"]["median_us"]
            cur = times.get(f"{s['name']}__texdefault", {}).get("median_us", float("nan"))
            ours = times[f"{s['name']}__{best}"]["median_us"]
            md.append(f"| {s['name']} {s['a']}x{s['b']} | {buf:.1f} | {cur:.1f} | {ours:.1f} "
                      f"| {buf / ours:.2f}x |")
        geo = _geomean(list(scored[best].values()))
        current = _geomean(list(scored["texdefault"].values())) if "texdefault" in scored \
            else 0.0
        config = configs[int(best[3:])] if best != "texdefault" else None
        md += ["", f"Best texture setting `{best}` = `{json.dumps(config)}`: geomean "
               f"**{geo:.2f}x** over the buffer GEMM (current texture knobs: {current:.2f}x).",
               ""]
        entry = table.setdefault("opencl-texture", {})
        if config is not None and geo > current:
            entry["config"] = config
        # PackWeightsToTexture's measured policy: images only where they beat buffers
        entry.update({"texture_weights": "image" if geo > 1.0 else "buffer",
                      "texture_over_buffer": round(geo, 3),
                      "measured": f"benchmarks/results/{args.name}.json",
                      "device": data["machine"]["cuda_device"]})
        md += [f"Recorded for `PackWeightsToTexture` on this target: weights in "
               f"**{entry['texture_weights']}s** (`texture_weights` in "
               "`tvm_smartmem/tir/matmul_configs.json`).", ""]
    ms.write_report(out_dir / f"{args.name}.md", md, args.command, table_path, table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    r = sub.add_parser("report")
    r.add_argument("--results", required=True)
    r.add_argument("--name", default="texture_matmul_h100")
    r.add_argument("--command",
                   default="see the docstring of benchmarks/texture_matmul_sweep.py")
    args = p.parse_args()
    {"prepare": prepare, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()

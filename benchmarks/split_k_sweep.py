"""Measure split-K GEMMs (``SplitKMatmul``) on the GPU machine and choose the split policy.

A batch-1 transformer's GEMMs have a few hundred rows, so the GEMM schedule's 32 x 64 output
tiles give some of them fewer thread blocks than the GPU has multiprocessors.  This script times
each zoo GEMM shape (with its bias epilogue, as the models run it) whole and split into 2, 4, 8
and 16 reduction chunks, through the smartmem pipeline, and writes the policy that wins --
split until a GEMM reaches ``min_blocks`` thread blocks with chunks of at least ``min_chunk`` --
into the ``split_k`` key of each target's entry in ``tvm_smartmem/tir/matmul_configs.json``.

    python benchmarks/split_k_sweep.py prepare               # here: build, bundle
    # device tool `run`, carry [".device/splitk"]:
    #   python3 benchmarks/split_k_sweep.py measure --bundle .device/splitk --out $OUT
    python benchmarks/split_k_sweep.py report --results <files_at>/splitk_results.json \
        [--adopt cuda]   # only the targets whose choice also won on whole models

Every variant is checked against numpy before it is timed; a policy is scored by the geometric
mean of its speedup over the unsplit GEMM across all shapes (the shapes it leaves whole count
as 1.0x), so one policy per target serves every model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from pathlib import Path

import gpu_machine as gm
import matmul_sweep as ms

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = ROOT / ".device" / "splitk"
TARGETS = ("cuda", "opencl")
FACTORS = (1, 2, 4, 8, 16)
#: (name, M, K, N): the zoo's weight GEMMs at batch 1 (tokens x in-features x out-features)
SHAPES = [
    ("bert_proj", 128, 768, 768),
    ("bert_ffn1", 128, 768, 3072),
    ("bert_ffn2", 128, 3072, 768),
    ("gpt2_qkv", 128, 768, 2304),
    ("deit_qkv", 197, 384, 1152),
    ("deit_proj", 197, 384, 384),
    ("deit_ffn1", 197, 384, 1536),
    ("deit_ffn2", 197, 1536, 384),
    ("vit_proj", 197, 768, 768),
    ("vit_ffn2", 197, 3072, 768),
    ("llama_ffn2", 128, 1536, 512),
    ("levit_mlp", 196, 256, 512),
    ("swin_s1_qkv", 3136, 96, 288),
    ("swin_s4_ffn2", 49, 3072, 768),
]
#: candidate policies: blocks to reach x shortest chunk
MIN_BLOCKS = (66, 132, 198, 264, 396, 528, 792)
MIN_CHUNK = (64, 128, 192, 256, 384)


def _module(shapes: list, factors=FACTORS):
    """One Relax function per (shape, factor): ``x @ w + b``, split by hand as SplitKMatmul
    would (so the sweep compiles with the pass off and still gets each factor)."""
    from tvm import relax

    from tvm_smartmem.transform.split_k import split_matmul

    bb = relax.BlockBuilder()
    names = []
    for (name, m, k, n), s in itertools.product(shapes, factors):
        if k % (s * 16):
            continue
        x = relax.Var("x", relax.TensorType((1, m, k), "float32"))
        w = relax.Var("w", relax.TensorType((k, n), "float32"))
        b = relax.Var("b", relax.TensorType((n,), "float32"))
        fname = f"{name}__s{s}"
        with bb.function(fname, [x, w, b]):
            with bb.dataflow():
                y = relax.op.matmul(x, w) if s == 1 else split_matmul(x, w, s, "float32")
                out = bb.emit_output(relax.op.add(bb.emit(y), b))
            bb.emit_func_output(out)
        names.append(fname)
    return bb.get(), names


def prepare(args: argparse.Namespace) -> None:
    import tvm

    from tvm_smartmem import targets

    os.environ["TVM_SMARTMEM_SPLIT_K"] = "off"  # the splits are in the graph already
    bundle, manifest = ms.start_bundle(args.bundle, [], [])
    manifest["shapes"] = [{"name": n, "m": m, "k": k, "n": nn} for n, m, k, nn in SHAPES]
    for target_name in TARGETS:
        t0 = time.perf_counter()
        mod, names = _module(SHAPES)
        ex = tvm.compile(mod, target=targets.get(target_name), relax_pipeline="smartmem")
        path = bundle / "models" / f"splitk-{target_name}.so"
        ex.export_library(str(path))
        manifest["libraries"][target_name] = {"library": path.name, "functions": names}
        print(f"{target_name}: {len(names)} functions built in {time.perf_counter() - t0:.0f} s",
              flush=True)
    gm.finish_bundle(bundle, manifest)


def _measure_stage2(args: argparse.Namespace) -> None:
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from tvm_smartmem import numerics

    manifest, models_dir, out, results = ms.sweep_session(args)
    rng = np.random.default_rng(0)
    data = {}
    for s in manifest["shapes"]:
        x = rng.standard_normal((1, s["m"], s["k"])).astype("float32")
        w = (rng.standard_normal((s["k"], s["n"])) / math.sqrt(s["k"])).astype("float32")
        b = rng.standard_normal(s["n"]).astype("float32")
        ref = (x.astype("float64") @ w + b).astype("float32")
        data[s["name"]] = (x, w, b, ref)
    for target_name, entry in manifest["libraries"].items():
        dev = tvm.cuda(0) if target_name == "cuda" else tvm.opencl(0)
        t0 = time.perf_counter()
        vm = VirtualMachine(tvm.runtime.load_module(str(models_dir / entry["library"])), dev)
        times = results["times"].setdefault(target_name, {})
        print(f"{target_name}: loaded in {time.perf_counter() - t0:.0f} s", flush=True)
        for fname in entry["functions"]:
            x, w, b, ref = data[fname.split("__")[0]]
            args_dev = [tvm.runtime.tensor(a, dev) for a in (x, w, b)]
            try:
                got = vm[fname](*args_dev).numpy()
                ok, err = numerics.compare([got], [ref])
                timer = vm.time_evaluator(fname, dev, number=args.number, repeat=args.repeat)
                med = float(np.median(timer(*args_dev).results)) * 1e6
                times[fname] = {"ok": bool(ok), "error": err, "median_us": med}
            except Exception as exc:  # record and go on
                times[fname] = {"ok": False, "failure": str(exc)[:300]}
        (out / "splitk_results.json").write_text(json.dumps(results, indent=1))
        print(f"{target_name}: {len(times)} functions timed", flush=True)
    print(f"wrote {out / 'splitk_results.json'}")


def measure(args: argparse.Namespace) -> None:
    if args.stage2:
        _measure_stage2(args)
        return
    gm.relaunch_stage2(__file__, args)


# -- report ------------------------------------------------------------------------------------


def _policy_factor(tile, step, min_blocks, min_chunk, m, n, k) -> int:
    from tvm_smartmem.transform.split_k import SplitPolicy

    return SplitPolicy(tile, step, min_blocks, min_chunk).factor(m, n, k)


def choose(times: dict, shapes: list[dict], tile, step) -> tuple[dict, dict[str, int], float]:
    """The (min_blocks, min_chunk) whose factors give the best geomean over the unsplit GEMMs,
    the factor it picks per shape, and that geomean.  A factor that failed or mismatched on a
    shape rules out every policy that picks it there."""
    def t(name, s):
        r = times.get(f"{name}__s{s}")
        return r["median_us"] if r and r.get("ok") else None

    best = ({}, {}, 0.0)
    for blocks, chunk in itertools.product(MIN_BLOCKS, MIN_CHUNK):
        picks, logs = {}, []
        for s in shapes:
            f = _policy_factor(tile, step, blocks, chunk, s["m"], s["n"], s["k"])
            base, ours = t(s["name"], 1), t(s["name"], f)
            if base is None or ours is None:
                logs = None
                break
            picks[s["name"]] = f
            logs.append(math.log(base / ours))
        if logs is None:
            continue
        geo = math.exp(sum(logs) / len(logs))
        if geo > best[2] + 1e-9:
            best = ({"min_blocks": blocks, "min_chunk": chunk}, picks, geo)
    return best


def adopt_policy(entry: dict, chosen: dict, geo: float, measured: str, device: str) -> None:
    """Write a sweep's policy into a target's table entry -- or drop split-K there when no
    policy beat the whole GEMMs.  Per-shape scores miss what happens around a GEMM (LeViT's
    K = 256 GEMMs left whole by OpenCL's choice ran slower end to end, gpu_h100_b0ec827.md), so
    ``report --adopt`` names the targets whose choice was also confirmed on whole models."""
    if geo > 1.0:
        entry["split_k"] = {**chosen, "measured": measured, "geomean_speedup": round(geo, 3),
                            "device": device}
    else:
        entry.pop("split_k", None)


def report(args: argparse.Namespace) -> None:
    from tvm_smartmem import targets
    from tvm_smartmem.transform.split_k import gemm_tile

    data = json.loads(Path(args.results).read_text())
    unknown = set(filter(None, args.adopt.split(","))) - set(data["times"])
    if unknown:
        raise SystemExit(f"report --adopt: {', '.join(sorted(unknown))} not measured in "
                         f"{args.results} (measured: {', '.join(data['times'])})")
    out_dir = ROOT / "benchmarks" / "results"
    stem = args.name
    data["command"] = args.command
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1))
    shapes = data["manifest"]["shapes"]
    table_path = ROOT / "tvm_smartmem" / "tir" / "matmul_configs.json"
    table = json.loads(table_path.read_text())
    md = [f"# Split-K GEMMs on {data['machine']['cuda_device']}", "",
          "Each zoo GEMM shape (x @ w + bias, fp32, batch 1) through the smartmem pipeline, whole "
          "(s1) and with its reduction split in 2..16 chunks; median of "
          f"{data['protocol']['repeat']} x {data['protocol']['number']} calls of the compiled "
          f"function, each checked against numpy. Compiled at commit "
          f"`{data['manifest']['git_commit']}`.", ""]
    plot_rows = []
    for target_name, times in data["times"].items():
        tile, step = gemm_tile(targets.get(target_name))
        chosen, picks, geo = choose(times, shapes, tile, step)
        md += [f"## {target_name}", "",
               "| shape (M x K x N) | blocks whole | " + " | ".join(f"s{f} (us)" for f in FACTORS)
               + " | chosen | speedup |", "|---|---|" + "---|" * len(FACTORS) + "---|---|"]
        for s in shapes:
            blocks = math.ceil(s["m"] / tile[0]) * math.ceil(s["n"] / tile[1])
            cells = []
            for f in FACTORS:
                r = times.get(f"{s['name']}__s{f}")
                cells.append("-" if r is None else (f"{r['median_us']:.1f}" if r.get("ok")
                                                    else "FAIL"))
            f = picks.get(s["name"], 1)
            base, ours = (times[f"{s['name']}__s{x}"]["median_us"] for x in (1, f))
            md.append(f"| {s['name']} ({s['m']} x {s['k']} x {s['n']}) | {blocks} | "
                      + " | ".join(cells) + f" | s{f} | {base / ours:.2f}x |")
            plot_rows.append((f"{target_name}:{s['name']}", base / ours))
        md += ["", f"Chosen policy: `{json.dumps(chosen)}` (tile {list(tile)}, step "
               f"{step}), geomean **{geo:.2f}x** over the whole GEMMs.", ""]
        adopted = not args.adopt or target_name in args.adopt.split(",")
        if adopted:
            adopt_policy(table.setdefault(target_name, {}), chosen, geo,
                         f"benchmarks/results/{stem}.json", data["machine"]["cuda_device"])
        else:
            md += [f"Not adopted for {target_name} (`--adopt {args.adopt}`): the table keeps "
                   f"`{json.dumps(table.get(target_name, {}).get('split_k'))}`.", ""]
    _plot(plot_rows, out_dir / f"{stem}.png", data["machine"]["cuda_device"])
    md.append(f"Plot: `benchmarks/results/{stem}.png`")
    ms.write_report(out_dir / f"{stem}.md", md, args.command, table_path, table)


def _plot(rows: list[tuple[str, float]], path: Path, device: str) -> None:
    from tvm_smartmem.bench import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    ax.barh([r[0] for r in rows], [r[1] for r in rows], color="tab:blue")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of the chosen split over the whole GEMM")
    ax.set_title(f"Split-K GEMMs on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    m = sub.add_parser("measure")
    m.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    m.add_argument("--out", default="gpu_out")
    m.add_argument("--site", default="/tmp/tvm_smartmem_site_splitk")
    m.add_argument("--repeat", type=int, default=5)
    m.add_argument("--number", type=int, default=20)
    m.add_argument("--stage2", action="store_true", help=argparse.SUPPRESS)
    r = sub.add_parser("report")
    r.add_argument("--results", required=True)
    r.add_argument("--name", default="split_k_h200")
    r.add_argument("--command", default="see the docstring of benchmarks/split_k_sweep.py")
    r.add_argument("--adopt", default="",
                   help="write the chosen policy into the table only for these targets (a,b; "
                        "default: every target measured) -- after timing whole models with it")
    args = p.parse_args()
    {"prepare": prepare, "measure": measure, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()

"""Kernel and data-movement counts of the zoo: TVM's fused default vs the smartmem pipeline.

The figure of issues 4 and 5 (kernels after smartmem <= 0.7x / 0.5x of TVM's on transformer and
hybrid models, never more on a CNN; data-movement kernels <= 5%), with every model's smartmem
build checked against ONNX Runtime on this machine's CPU (``--check``).  Counts are read on the
module the pipeline compiles for ``--target`` (launches per inference, see
``tvm_smartmem/analysis/stats.py``); no GPU is needed.

    tvm-smartmem zoo                                   # export the models once
    python benchmarks/kernel_counts.py --target cuda --check
    python benchmarks/kernel_counts.py --models swin_tiny,bert_base --name kc_try
    python benchmarks/kernel_counts.py --target opencl --build   # also compile all the way

Writes ``benchmarks/results/<name>.{json,md,png}`` (default name ``kernel_counts_<target>``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: families whose kernel ratio the issues bound (the rest only must not get worse)
ATTENTION_FAMILIES = ("local-attention", "global-attention", "hybrid", "llm", "diffusion")


def _check_numerics(name: str) -> dict:
    """Compile the smartmem build for the CPU and compare it with ONNX Runtime."""
    import onnx
    import tvm

    from tvm_smartmem import frontend, models, numerics, targets, zoo
    from tvm_smartmem.measure import LocalRunner
    from tvm_smartmem.pipeline import smartmem_pipeline

    proto = onnx.load(str(zoo.model_path(name)))
    mod, params = frontend.from_onnx(proto)
    inputs = models.signature_inputs(frontend.input_signature(mod))
    ref = numerics.onnxruntime_reference(proto, inputs)
    llvm = targets.get("llvm")
    ex = tvm.compile(mod, llvm, relax_pipeline=smartmem_pipeline(llvm))
    outs = LocalRunner("cpu").outputs(ex, list(inputs.values()), params)
    ok, err = numerics.compare(outs, ref)
    return {"matches_onnxruntime": bool(ok), "max_error": float(err)}


def _check_build(mod, target) -> dict:
    """Compile the smartmem build for ``target`` all the way (CUDA keeps its source: no nvcc
    needed), so a kernel that schedules but does not lower is caught here rather than on the
    GPU machine -- the counts above stop at the scheduled kernels."""
    import tvm

    from tvm_smartmem.analysis.shared_memory import over_limit
    from tvm_smartmem.pipeline import smartmem_pipeline

    try:
        with target:
            ex = tvm.compile(mod, target, relax_pipeline=smartmem_pipeline(target))
    except Exception as exc:  # reported in the table: the counts of a model that fails are moot
        return {"builds": False, "build_error": f"{type(exc).__name__}: {str(exc)[-300:]}"}
    # the GPU driver refuses kernels whose shared arrays exceed the block's limit: a build the
    # device cannot load is a failed build (caught here, not minutes into a device call)
    limit = target.attrs.get("max_shared_memory_per_block")
    too_big = over_limit(ex, int(limit)) if limit is not None else {}
    if too_big:
        name, size = max(too_big.items(), key=lambda kv: kv[1])
        return {"builds": False, "build_error": f"{len(too_big)} kernel(s) over {int(limit)} "
                f"bytes of shared memory, e.g. {name}: {size} bytes"}
    return {"builds": True}


def measure(names: list[str], target_name: str, check: bool, build: bool = False) -> dict:
    from tvm_smartmem import frontend, targets, zoo
    from tvm_smartmem.analysis.stats import collect
    from tvm_smartmem.pipeline import baseline, smartmem_pipeline

    target = targets.get(target_name)
    rows: dict[str, dict] = {}
    for i, name in enumerate(names, 1):
        t0 = time.time()
        row: dict = {"family": zoo.MODELS[name].family}
        try:
            mod, _ = frontend.from_onnx(zoo.model_path(name))
            with target:
                row["baseline"] = collect(baseline(target)(mod)).summary()
                row["smartmem"] = collect(smartmem_pipeline(target)(mod)).summary()
            if build:
                row.update(_check_build(mod, target))
            if check:
                row.update(_check_numerics(name))
        except Exception as exc:  # one model failing must not lose the others; it is reported
            row["error"] = f"{type(exc).__name__}: {str(exc)[:800]}"
        rows[name] = row
        print(f"[{i}/{len(names)}] {name}: {_line(row)} ({time.time() - t0:.0f} s)", flush=True)
    return rows


def _line(row: dict) -> str:
    if "error" in row:
        return "error " + row["error"][:200]
    b, s = row["baseline"], row["smartmem"]
    num = "" if "matches_onnxruntime" not in row else (
        f", ORT {'ok' if row['matches_onnxruntime'] else 'MISMATCH'} {row['max_error']:.1e}")
    built = "" if "builds" not in row else (
        ", builds" if row["builds"] else f", BUILD FAILED {row['build_error'][-120:]}")
    return (f"kernels {b['kernels']} -> {s['kernels']}, data movement "
            f"{b['data_movement_kernels']} -> {s['data_movement_kernels']}{num}{built}")


def _ratio(row: dict, key: str) -> float | None:
    if "error" in row or not row["baseline"][key]:
        return None
    return row["smartmem"][key] / row["baseline"][key]


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def write(data: dict, name: str) -> Path:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    rows = data["models"]
    lines = ["| model | family | kernels TVM | kernels smartmem | ratio | data-movement TVM | "
             "data-movement smartmem | ORT check |", "|" + "---|" * 8]
    for model, row in rows.items():
        if "error" in row:
            lines.append(f"| {model} | {row['family']} | error: {row['error'][:80]} |||||")
            continue
        b, s = row["baseline"], row["smartmem"]
        check = "not run" if "matches_onnxruntime" not in row else (
            f"{'ok' if row['matches_onnxruntime'] else 'MISMATCH'} ({row['max_error']:.0e})")
        if "builds" in row:
            check += f"; {data['target']} build " + (
                "ok" if row["builds"] else f"FAILED: {row['build_error'][-60:]}")
        lines.append(f"| {model} | {row['family']} | {b['kernels']} | {s['kernels']} | "
                     f"{_ratio(row, 'kernels'):.2f} | {b['data_movement_kernels']} | "
                     f"{s['data_movement_kernels']} | {check} |")
    attn = [r for m, r in rows.items() if r["family"] in ATTENTION_FAMILIES
            and _ratio(r, "kernels") is not None]
    cnn = [r for r in rows.values() if r["family"] == "cnn" and _ratio(r, "kernels") is not None]
    dm_base = sum(r["baseline"]["data_movement_kernels"] for r in rows.values() if "error" not in r)
    dm_ours = sum(r["smartmem"]["data_movement_kernels"] for r in rows.values() if "error" not in r)
    def fmt(value: float | None) -> str:
        return "n/a (none in this run)" if value is None or math.isnan(value) else f"{value:.2f}"

    summary = [
        f"Transformer / hybrid / LLM / diffusion models: kernel ratio geomean "
        f"{fmt(_geomean([_ratio(r, 'kernels') for r in attn]))}, worst "
        f"{fmt(max((_ratio(r, 'kernels') for r in attn), default=None))}.",
        f"CNNs: worst kernel ratio "
        f"{fmt(max((_ratio(r, 'kernels') for r in cnn), default=None))}.",
        f"Data-movement kernels over the zoo: {dm_base} -> {dm_ours}.",
    ]
    switches = data.get("switches") or ""
    title = f"# Kernel counts, TVM default vs smartmem ({data['target']})" + (
        f", built with `{switches}`" if switches else "")
    md = [title, "",
          f"Commit `{data['git_commit']}`, TVM {data['tvm']}, {data['host']}. Counts are launches "
          "per inference on the module each pipeline compiles; the ORT check compiles the "
          "smartmem build for the CPU and compares its outputs with ONNX Runtime (fp32 "
          "tolerances of `tvm_smartmem/numerics.py`).", "", *lines, "", *summary, "",
          f"Reproduce: `{data['command']}`", f"Raw data: `benchmarks/results/{name}.json`", ""]
    (out / f"{name}.md").write_text("\n".join(md))
    _plot(rows, out / f"{name}.png", data["target"])
    print("\n".join(md))
    return out / f"{name}.md"


def _plot(rows: dict, path: Path, target: str) -> None:
    from tvm_smartmem.bench import pyplot

    plt = pyplot()
    if plt is None:
        return
    names = [n for n, r in rows.items() if "error" not in r]
    ratios = [_ratio(rows[n], "kernels") for n in names]
    colours = ["tab:gray" if rows[n]["family"] == "cnn" else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(2 + 0.6 * len(names), 4))
    ax.bar(range(len(names)), ratios, color=colours)
    for level, style in ((1.0, "-"), (0.7, "--"), (0.5, ":")):
        ax.axhline(level, color="black", linestyle=style, linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_ylabel("kernels smartmem / TVM default")
    ax.set_title(f"Kernel count ratio per model ({target}); grey = CNN, lines at 1, 0.7, 0.5")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="all", help="comma list of zoo models (default: all)")
    p.add_argument("--target", default="cuda", help="target whose pipeline is counted")
    p.add_argument("--check", action="store_true", help="also check numerics against ORT (CPU)")
    p.add_argument("--build", action="store_true",
                   help="also compile the smartmem build for the target all the way")
    p.add_argument("--name", default=None, help="results file stem")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    import tvm

    from tvm_smartmem import zoo
    from tvm_smartmem.bench import env_prefix, git_commit

    names = zoo.resolve(args.models)
    switches = env_prefix()
    data = {"target": args.target, "git_commit": git_commit(), "tvm": tvm.__version__,
            "host": platform.node(),
            "command": switches + "python benchmarks/kernel_counts.py " + " ".join(sys.argv[1:]),
            "switches": switches.strip(),
            "models": measure(names, args.target, args.check, args.build)}
    write(data, args.name or f"kernel_counts_{args.target}")


if __name__ == "__main__":
    main()

"""Which intermediate tensors of the zoo the texture pipeline puts into images, and why not.

``PackActivationsToTexture`` decides per tensor (see its module doc); this runs the smartmem
pipeline for ``opencl-texture`` on every exported zoo model (no device needed: the decision is
made at compile time) and reports, per model, the intermediates in images and in buffers (count
and bytes), the reasons for the buffers grouped by kind, and the bytes SmartMem's pooled copies
would take where readers disagree.  ``--check`` also runs the texture build on this machine's
OpenCL device (PoCL without a GPU) and compares it with ONNX Runtime -- slow on a CPU device,
so pick models.

    tvm-smartmem zoo                                        # export the models once
    python benchmarks/texture_activations.py
    python benchmarks/texture_activations.py --models bert_base,swin_tiny --check --name ta_check

Writes ``benchmarks/results/<name>.{json,md,png}`` (default name ``texture_activations``).

``--ratios RESULTS`` instead turns a GPU measurement into the cost model's input: the kernel
profiles of the ``smartmem-opencl`` and ``smartmem-opencl-texture`` builds of each model in a
``gpu_results.json`` (``gpu_machine.py measure --profile ...``; bundles record each kernel's
kind) give the image / buffer time ratio per kind of kernel (``cost.texture``), written to
``benchmarks/results/<name>.{json,md}``; ``--adopt`` also puts them into the
``opencl-texture`` entry of ``tvm_smartmem/tir/matmul_configs.json`` (``texture_time_ratio``),
which ``PackActivationsToTexture`` reads.

    python benchmarks/texture_activations.py --ratios <files_at>/x/gpu_results.json \
        --name texture_ratios_h100 --adopt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: reason kinds, by how the pass words them (first match wins)
KINDS = (
    ("attention", "an attention kernel"),
    ("producer rule", "producer kernel does not lower"),
    ("reader rule", "reader kernel does not lower"),
    ("readers disagree", "readers reduce over different axes"),
    ("not 4-aligned", "not a multiple of"),
    ("image too large", "exceeds the target's limits"),
    ("not a kernel reader", "read by something other than a kernel"),
    ("cost model", "cost model: images estimated"),
)


def kind_of(reason: str) -> str:
    return next((k for k, text in KINDS if text in reason), "other")


def _check(proto, mod, params, ex) -> dict:
    import tvm

    from tvm_smartmem import frontend, models, numerics
    from tvm_smartmem.measure import LocalRunner

    inputs = models.signature_inputs(frontend.input_signature(mod))
    ref = numerics.onnxruntime_reference(proto, inputs)
    before = dict(tvm.get_global_func("smartmem.opencl.allocator_stats")())
    outs = LocalRunner("opencl").outputs(ex, list(inputs.values()), params)
    after = dict(tvm.get_global_func("smartmem.opencl.allocator_stats")())
    ok, err = numerics.compare(outs, ref)
    return {"matches_onnxruntime": bool(ok), "max_error": float(err),
            "images_allocated": after["images_created"] - before["images_created"]}


def measure(names: list[str], check: bool) -> dict:
    import onnx
    import tvm

    from tvm_smartmem import frontend, targets, zoo
    from tvm_smartmem.pipeline import UP_TO_KERNELS, smartmem_pipeline
    from tvm_smartmem.transform.texture_activations import texture_activations_of

    target = targets.get("opencl-texture")
    rows: dict[str, dict] = {}
    for i, name in enumerate(names, 1):
        t0 = time.time()
        row: dict = {"family": zoo.MODELS[name].family}
        try:
            proto = onnx.load(str(zoo.model_path(name)))
            mod, params = frontend.from_onnx(proto)
            with target:
                kernels = smartmem_pipeline(target, phases=UP_TO_KERNELS)(mod)
            record = texture_activations_of(kernels["main"])
            rules: dict[str, int] = {}  # schedule rule of each kernel touching an image
            for _, func in kernels.functions_items():
                if isinstance(func, tvm.tirx.PrimFunc) and func.attrs and \
                        "smartmem.texture_buffers" in func.attrs:
                    rule = str(func.attrs.get("smartmem.schedule_rule", "none"))
                    rules[rule] = rules.get(rule, 0) + 1
            kinds: dict[str, int] = {}
            for why in record["kept"].values():
                kinds[kind_of(why)] = kinds.get(kind_of(why), 0) + 1
            row.update(images=len(record["images"]), kept=len(record["kept"]),
                       image_bytes=record["image_bytes"], kept_bytes=record["kept_bytes"],
                       copy_bytes=record["copy_bytes"], kept_by_kind=kinds,
                       texture_kernel_rules=rules,
                       record=record, compile_seconds=round(time.time() - t0, 1))
            if check:
                ex = tvm.compile(mod, target, relax_pipeline="smartmem")
                row.update(_check(proto, mod, params, ex))
        except Exception as exc:  # one model failing must not lose the others; it is reported
            row["error"] = f"{type(exc).__name__}: {str(exc)[:800]}"
        rows[name] = row
        print(f"[{i}/{len(names)}] {name}: {_line(row)} ({time.time() - t0:.0f} s)", flush=True)
    return rows


def _share(row: dict) -> float:
    total = row["image_bytes"] + row["kept_bytes"]
    return row["image_bytes"] / total if total else 0.0


def _line(row: dict) -> str:
    if "error" in row:
        return "error " + row["error"][:200]
    num = "" if "matches_onnxruntime" not in row else (
        f", ORT {'ok' if row['matches_onnxruntime'] else 'MISMATCH'} {row['max_error']:.1e}")
    return (f"{row['images']} in images, {row['kept']} in buffers "
            f"({100 * _share(row):.0f}% of intermediate bytes in images){num}")


def write(data: dict, name: str) -> Path:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    rows = data["models"]
    kinds = [k for k, _ in KINDS] + ["other"]
    used = [k for k in kinds if any(k in r.get("kept_by_kind", {}) for r in rows.values())]
    head = ["model", "family", "in images", "in buffers", "bytes in images",
            *[f"buffers: {k}" for k in used], "copy bytes", "PoCL vs ORT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, row in rows.items():
        if "error" in row:
            lines.append(f"| {model} | {row['family']} | error: {row['error'][:100]} |")
            continue
        check = "not run" if "matches_onnxruntime" not in row else (
            f"{'ok' if row['matches_onnxruntime'] else 'MISMATCH'} ({row['max_error']:.0e})")
        cells = [model, row["family"], str(row["images"]), str(row["kept"]),
                 f"{100 * _share(row):.0f}%",
                 *[str(row["kept_by_kind"].get(k, 0)) for k in used],
                 str(row["copy_bytes"]), check]
        lines.append("| " + " | ".join(cells) + " |")
    ok = [r for r in rows.values() if "error" not in r]
    images = sum(r["image_bytes"] for r in ok)
    total = images + sum(r["kept_bytes"] for r in ok)
    by_rule: dict[str, int] = {}
    for r in ok:
        for rule, n in r.get("texture_kernel_rules", {}).items():
            by_rule[rule] = by_rule.get(rule, 0) + n
    summary = [f"Over {len(ok)} models: {sum(r['images'] for r in ok)} intermediate tensors in "
               f"images, {sum(r['kept'] for r in ok)} in buffers; "
               f"{100 * images / total if total else 0:.0f}% of the intermediate bytes in images.",
               "", "Kernels touching an image, by the schedule rule that took them: " +
               ", ".join(f"{rule} {n}" for rule, n in sorted(by_rule.items(),
                                                            key=lambda kv: -kv[1])) + "."]
    md = [f"# Activations in texture memory over the zoo ({data['target']})", "",
          f"Commit `{data['git_commit']}`, TVM {data['tvm']}, {data['host']}, policy "
          f"`{data['policy']}`. Intermediates are the tensors one kernel writes and only other "
          "kernels read; 'bytes in images' is their share of those tensors' bytes.  The "
          "buffer columns count the reasons `PackActivationsToTexture` recorded (see its "
          "module doc); 'copy bytes' is what one copy per extra layout would take where "
          "readers reduce over different axes.  'PoCL vs ORT' runs the texture build on this "
          "machine's OpenCL device.", "", *lines, "", *summary, "",
          f"Reproduce: `{data['command']}`", f"Raw data: `benchmarks/results/{name}.json`", ""]
    (out / f"{name}.md").write_text("\n".join(md))
    _plot(rows, out / f"{name}.png")
    print("\n".join(md))
    return out / f"{name}.md"


def _plot(rows: dict, path: Path) -> None:
    from tvm_smartmem.bench import pyplot

    plt = pyplot()
    if plt is None:
        return
    names = [n for n, r in rows.items() if "error" not in r]
    share = [100 * _share(rows[n]) for n in names]
    fig, ax = plt.subplots(figsize=(2 + 0.6 * len(names), 4.2))
    ax.bar(range(len(names)), share, color="tab:green", label="bytes in images")
    ax.bar(range(len(names)), [100 - v for v in share], bottom=share, color="tab:gray",
           label="bytes in buffers")
    for x, n in enumerate(names):  # tensor counts on top: images / all intermediates
        ax.text(x, 101, f"{rows[n]['images']}/{rows[n]['images'] + rows[n]['kept']}",
                ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_ylim(0, 128)
    ax.set_ylabel("% of intermediate bytes")
    ax.set_title("Intermediates the texture pipeline puts into images (count: images / all)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def profile_ratios(results: dict) -> tuple[dict, list[str]]:
    """(per-kind ratios of :func:`cost.texture.ratios_from_profiles`, models used) from a
    ``gpu_results.json`` with kernel profiles of both OpenCL builds."""
    from tvm_smartmem.cost.texture import ratios_from_profiles

    pairs, used = [], []
    for name, model in results.get("models", {}).items():
        builds = model.get("builds", {})
        plain, tex = builds.get("smartmem-opencl", {}), builds.get("smartmem-opencl-texture", {})
        if "profile_us" in plain and "profile_us" in tex and tex.get("kernel_kinds"):
            pairs.append((plain["profile_us"], tex["profile_us"], tex["kernel_kinds"]))
            used.append(name)
    return ratios_from_profiles(pairs), used


def adopt_ratios(table: dict, ratios: dict, measured: str, device: str) -> dict:
    """``table`` with the measured ratios as the ``opencl-texture`` entry's
    ``texture_time_ratio`` (a per-device verdict that would override them is dropped)."""
    entry = dict(table.get("opencl-texture", {}))
    entry["texture_time_ratio"] = {kind: r["ratio"] for kind, r in ratios.items()}
    entry["ratios_measured"] = measured
    entry["device"] = device
    entry.pop("texture_activations", None)
    return {**table, "opencl-texture": entry}


def ratios_main(args: argparse.Namespace) -> None:
    results = json.loads(Path(args.ratios).read_text())
    ratios, used = profile_ratios(results)
    if not ratios:
        raise SystemExit(f"{args.ratios}: no model has kernel profiles of both smartmem-opencl "
                         "and smartmem-opencl-texture with kernel kinds (measure with --profile, "
                         "from a bundle prepared since kinds are recorded)")
    device = (results.get("machine", {}).get("cuda_device") or "the measured device")
    out = ROOT / "benchmarks" / "results"
    data = {"results": args.ratios, "models": used, "device": device, "ratios": ratios,
            "command": "python benchmarks/texture_activations.py " + " ".join(sys.argv[1:])}
    (out / f"{args.name}.json").write_text(json.dumps(data, indent=2))
    lines = [f"# Image / buffer kernel time per kind on {device}", "",
             f"From `{args.ratios}` ({', '.join(used)}): the kernels of the texture build paired "
             "by name with the buffer build's, time summed per kind.", "",
             "| kind | kernels | buffer (us) | texture (us) | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {r['kernels']} | {r['buffer_us']} | {r['texture_us']} | {r['ratio']} |"
              for k, r in ratios.items()]
    lines += ["", f"Reproduce: `{data['command']}`"]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.adopt:
        path = ROOT / "tvm_smartmem" / "tir" / "matmul_configs.json"
        table = adopt_ratios(json.loads(path.read_text()), ratios,
                             f"benchmarks/results/{args.name}.json", device)
        path.write_text(json.dumps(table, indent=2) + "\n")
        print(f"adopted into {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", help="a gpu_results.json with kernel profiles of both OpenCL "
                   "builds: write the per-kind image / buffer ratios instead (see module doc)")
    p.add_argument("--adopt", action="store_true",
                   help="with --ratios: put them into matmul_configs.json")
    p.add_argument("--models", default="all", help="comma list of zoo models (default: all)")
    p.add_argument("--check", action="store_true",
                   help="also run the texture build on the local OpenCL device against ORT")
    p.add_argument("--name", default="texture_activations", help="results file stem")
    args = p.parse_args(argv)
    if args.ratios:
        if args.name == "texture_activations":
            args.name = "texture_ratios"
        ratios_main(args)
        return
    warnings.simplefilter("ignore")
    # the placement is what this script reports: the shipped ratios for desktop OpenCL
    # (measured on the H100, all above one) would place nothing, so images unless told so
    os.environ.setdefault("TVM_SMARTMEM_TEXTURE_ACTIVATIONS", "always")
    import tvm

    from tvm_smartmem import zoo
    from tvm_smartmem.bench import git_commit

    data = {"target": "opencl-texture", "git_commit": git_commit(), "tvm": tvm.__version__,
            "host": platform.node(),
            "policy": os.environ["TVM_SMARTMEM_TEXTURE_ACTIVATIONS"],
            "command": "python benchmarks/texture_activations.py " + " ".join(sys.argv[1:]),
            "models": measure(zoo.resolve(args.models), args.check)}
    write(data, args.name)


if __name__ == "__main__":
    main()

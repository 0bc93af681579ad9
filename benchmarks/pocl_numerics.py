"""Zoo models through the smartmem OpenCL build on PoCL, checked against ONNX Runtime.

``kernel_counts.py --check`` compares the *CPU* build with ONNX Runtime; GPU-only kernels (the
``FusedAttention`` rule, the texture rules) are not in it.  This runs the OpenCL build -- the
GPU schedule rules, executed by PoCL on the CPU -- on the same random inputs and writes the
worst errors, so a zoo model the GPU machine did not measure is still checked.  No timing:
PoCL's times say nothing about a GPU.

    python benchmarks/pocl_numerics.py --models levit_128s,swin_hf,mobilevit_s,sd_text_encoder
    python benchmarks/pocl_numerics.py --models bert_base --shared 32768   # CUDA's budget

``--shared`` compiles for an OpenCL target with that much shared memory per block (PoCL's CPU
device has 1 MiB of local memory), so the schedules the rules pick for a larger GPU -- those
that only fit there, such as ``FusedAttention``'s staged V tile -- run on PoCL too.

Writes ``benchmarks/results/<name>.json`` (default ``pocl_numerics``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def check(name: str, seed: int = 11, shared: int | None = None) -> dict:
    import numpy as np
    import onnx
    import tvm

    from tvm_smartmem import frontend, models, numerics, targets, zoo
    from tvm_smartmem.analysis.stats import collect
    from tvm_smartmem.measure.runner import flatten_outputs, prepare_weights
    from tvm_smartmem.pipeline import UP_TO_KERNELS, smartmem_pipeline

    proto = onnx.load(str(zoo.model_path(name)))
    mod, params = frontend.from_onnx(proto)
    target = targets.get("opencl")
    if shared is not None:
        target = tvm.target.Target({**target.export(), "max_shared_memory_per_block": shared})
    with target:
        lowered = smartmem_pipeline(target, phases=UP_TO_KERNELS)(mod)
    rules: dict[str, int] = {}
    for _, f in lowered.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and \
                "smartmem.schedule_rule" in f.attrs:
            rule = str(f.attrs["smartmem.schedule_rule"])
            rules[rule] = rules.get(rule, 0) + 1
    start = time.time()
    ex = tvm.compile(mod, target, relax_pipeline=smartmem_pipeline(target))
    dev = tvm.opencl(0)
    vm = tvm.relax.VirtualMachine(ex, dev)
    inputs = models.random_inputs(proto, seed=seed)

    def up(arrays):
        return [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]

    outs = flatten_outputs(vm["main"](*up(inputs.values()), *prepare_weights(vm, up(params))))
    ok, worst = numerics.compare(outs, numerics.onnxruntime_reference(proto, inputs))
    return {"model": name, "ok": bool(ok), "max_scaled_error": float(worst),
            "kernels": collect(lowered).kernels, "rules": rules,
            "seconds": round(time.time() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True)
    p.add_argument("--name", default="pocl_numerics")
    p.add_argument("--shared", type=int, help="shared memory per block the target declares")
    args = p.parse_args(argv)
    from tvm_smartmem.bench import env_prefix, git_commit
    from tvm_smartmem.runtime import opencl

    names = [m for m in args.models.split(",") if m]
    rows = []
    for k, name in enumerate(names, 1):
        row = check(name, shared=args.shared)
        rows.append(row)
        print(f"[{k}/{len(names)}] {name}: {'ok' if row['ok'] else 'MISMATCH'} "
              f"(max scaled error {row['max_scaled_error']:.1e}, {row['kernels']} kernels, "
              f"FusedAttention {row['rules'].get('FusedAttention', 0)})", flush=True)
    out = ROOT / "benchmarks" / "results" / f"{args.name}.json"
    out.write_text(json.dumps({"git_commit": git_commit(), "device": opencl.describe(),
                               "command": env_prefix()
                               + "python benchmarks/pocl_numerics.py --models "
                               + args.models + (f" --shared {args.shared}" if args.shared else "")
                               + f" --name {args.name}", "models": rows}, indent=1, default=str))
    print(f"wrote {out}")
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Who is right about the VAE decoder: ONNX Runtime, TVM, or neither?

The zoo's VAE decoder (SD-1.5's, random weights, 64x64 latent -> 512x512 image) is the one
model whose TVM builds -- TVM's own default pipeline and ours -- miss ONNX Runtime by more than
the fp32 bound (1e-4, scale-normalised, ``tvm_smartmem.numerics``).  This script computes an
exact-enough reference, the same PyTorch module in **float64** (rebuilt with the zoo's seed, its
weights checked against the ONNX file's), and reports every fp32 build's error against it and
against ONNX Runtime:

    python benchmarks/vae_numerics.py                       # smartmem build (~25 min, 2 cores)
    python benchmarks/vae_numerics.py --pipelines baseline,smartmem

Writes ``benchmarks/results/vae_decoder_numerics.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx

from tvm_smartmem import frontend, numerics, zoo
from tvm_smartmem.bench import git_commit

NAME = "vae_decoder"


def torch_outputs(latent: np.ndarray, proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The zoo's module rebuilt with its seed, run in float32 and float64."""
    import torch
    from onnx import numpy_helper

    torch.manual_seed(0)
    module, _, _ = zoo.MODELS[NAME].build()
    module = module.eval()
    exported = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    state = module.state_dict()
    shared = [k for k in state if k in exported]
    if not shared or any(not np.array_equal(state[k].numpy(), exported[k]) for k in shared):
        raise RuntimeError("rebuilt module's weights differ from the exported ONNX file's")
    out = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            m = module.to(dtype)
            y = m(torch.from_numpy(latent).to(dtype))
            out[str(dtype).replace("torch.", "torch_")] = y.numpy()
    return out


def tvm_output(pipeline: str, mod, params, latent: np.ndarray) -> np.ndarray:
    import tvm

    from tvm_smartmem import targets
    from tvm_smartmem.measure import LocalRunner
    from tvm_smartmem.pipeline import baseline, smartmem_pipeline

    llvm = targets.get("llvm")
    make = baseline(llvm) if pipeline == "baseline" else smartmem_pipeline(llvm)
    ex = tvm.compile(mod, llvm, relax_pipeline=make)
    return LocalRunner("cpu").outputs(ex, [latent], params)[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipelines", default="smartmem", help="TVM builds to check (comma list)")
    args = p.parse_args(argv)
    proto = onnx.load(str(zoo.model_path(NAME)))
    mod, params = frontend.from_onnx(proto)
    (sig,) = frontend.input_signature(mod)
    latent = np.random.default_rng(0).standard_normal(sig["shape"]).astype("float32")
    t0 = time.time()
    outs = {"onnxruntime": numerics.onnxruntime_reference(proto, {sig["name"]: latent})[0]}
    outs.update(torch_outputs(latent, proto))
    print(f"references done in {time.time() - t0:.0f} s", flush=True)
    for pipeline in [s for s in args.pipelines.split(",") if s]:
        t1 = time.time()
        outs[f"tvm_{pipeline}"] = tvm_output(pipeline, mod, params, latent)
        print(f"tvm {pipeline} done in {time.time() - t1:.0f} s", flush=True)
    truth = outs["torch_float64"]
    errors = {name: {"vs_float64": numerics.max_error(out, truth),
                     "vs_onnxruntime": numerics.max_error(out, outs["onnxruntime"])}
              for name, out in outs.items() if name != "torch_float64"}
    result = {
        "model": NAME, "inputs": "latent ~ N(0, 1), numpy default_rng(0)",
        "error": "scale-normalised max error (tvm_smartmem.numerics.max_error)",
        "fp32_bound": numerics.tolerance("float32"),
        "reference_absmax": float(np.abs(truth).max()),
        "errors": errors,
        "seconds": round(time.time() - t0, 1), "git_commit": git_commit(),
        "command": "python benchmarks/vae_numerics.py --pipelines " + args.pipelines,
    }
    out = Path(__file__).resolve().parent / "results" / f"{NAME}_numerics.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(errors, indent=1), flush=True)


if __name__ == "__main__":
    main()

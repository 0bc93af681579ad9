"""TVM's *default* pipeline on the zoo's VAE decoder against ONNX Runtime (CPU), the control for
the smartmem build's error in kernel_counts_cuda.md.  ~25 minutes on 2 cores (untuned llvm).

    python benchmarks/vae_numerics.py   # -> benchmarks/results/vae_decoder_numerics.json
"""

import json
import time
from pathlib import Path

import numpy as np
import onnx
import tvm

from tvm_smartmem import frontend, numerics, targets, zoo
from tvm_smartmem.bench import git_commit
from tvm_smartmem.measure import LocalRunner
from tvm_smartmem.pipeline import baseline


def main() -> None:
    name = "vae_decoder"
    proto = onnx.load(str(zoo.model_path(name)))
    mod, params = frontend.from_onnx(proto)
    rng = np.random.default_rng(0)
    inputs = {}
    for sig in frontend.input_signature(mod):
        inputs[sig["name"]] = rng.standard_normal(sig["shape"]).astype(sig["dtype"])
    ref = numerics.onnxruntime_reference(proto, inputs)
    llvm = targets.get("llvm")
    t0 = time.time()
    ex = tvm.compile(mod, llvm, relax_pipeline=baseline(llvm))
    outs = LocalRunner("cpu").outputs(ex, list(inputs.values()), params)
    ok, err = numerics.compare(outs, ref)
    result = {"model": name, "pipeline": "baseline (TVM default), llvm",
              "matches_onnxruntime": bool(ok), "max_error": float(err),
              "seconds": round(time.time() - t0, 1),
              "reference_absmax": float(np.abs(ref[0]).max()),
              "git_commit": git_commit(),
              "command": "python benchmarks/vae_numerics.py"}
    out = Path(__file__).resolve().parent / "results" / "vae_decoder_numerics.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

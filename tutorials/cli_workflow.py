"""
.. _tutorial-cli-workflow:

The ``tvm-smartmem`` command line
=================================
``tvm-smartmem`` plays the role tvmc played for Relay: compile a model to a library, run and
time it on a device, compare TVM's default pipeline with smartmem, benchmark a set of models.
Each step below is one shell command; the tutorial runs them through ``subprocess`` so it can
check what they print.  In a terminal, type the line after ``$``.
"""

# %%
# A helper that runs one command
# ------------------------------
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def tvm_smartmem(*args: str) -> str:
    """Run ``tvm-smartmem ARGS`` (as ``python -m tvm_smartmem``), echo it, return stdout."""
    print("$ tvm-smartmem", " ".join(args))
    proc = subprocess.run([sys.executable, "-m", "tvm_smartmem", *args],
                          capture_output=True, text=True)
    print(proc.stdout[-2500:])
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


work = Path(tempfile.mkdtemp(prefix="tvm_smartmem_cli_"))

# %%
# What is there
# -------------
# ``targets`` lists the named targets, ``devices`` what this machine can run on.
tvm_smartmem("targets")
tvm_smartmem("devices")

# %%
# Statistics: TVM's default pipeline vs smartmem
# ----------------------------------------------
# ``report`` compiles a model with both pipelines and checks both against ONNX Runtime.
# ``builtin:NAME`` names the embedded models; any ``.onnx`` file works the same way, and
# ``--json`` gives one object with both columns.
tvm_smartmem("report", "builtin:swin_block")
stats = json.loads(tvm_smartmem("report", "builtin:swin_block", "--json", "--no-check"))
print({k: (v["kernels"], v["data_movement_kernels"]) for k, v in stats.items()})

# %%
# Compile, then run
# -----------------
# ``compile`` writes the library, its weights (``.params.npz``) and a description
# (``.json``); ``run`` loads them, feeds random inputs or an ``.npz`` file, and prints
# median / min / max over the repeats (``--profile`` adds a per-kernel table).
lib = work / "swin_block.so"
tvm_smartmem("compile", "builtin:swin_block", "--target", "llvm", "-o", str(lib))
tvm_smartmem("run", str(lib), "--device", "cpu", "--repeat", "3", "--number", "2")
inputs = work / "inputs.npz"
np.savez(inputs, x=np.random.default_rng(0).random((1, 64, 32), dtype=np.float32))
timing = json.loads(tvm_smartmem("run", str(lib), "--inputs", str(inputs), "--repeat", "2",
                                 "--json"))
print(f"median {timing['median_ms']:.3f} ms")

# %%
# Benchmark a set of models
# -------------------------
# ``bench`` runs models x targets x pipelines and writes JSON, a markdown table and a plot.
# Zoo models (``tvm-smartmem zoo`` exports them) are named directly, e.g.
# ``tvm-smartmem bench --models swin_t,bert_base,resnet50 --targets llvm --ablation``.
tvm_smartmem("bench", "--models", "builtin:small_cnn", "--repeat", "2", "--number", "1",
             "--out", str(work), "--name", "tutorial")
print(sorted(p.name for p in work.iterdir()))

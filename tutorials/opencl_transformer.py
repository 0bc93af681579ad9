"""
.. _tutorial-opencl-transformer:

Compiling an ONNX transformer for OpenCL and running it on the local device
===========================================================================
The PyPI TVM wheel generates OpenCL code but ships no OpenCL runtime; tvm-smartmem builds its
own on first use and registers it with TVM, so ``tvm.opencl(0)`` and
``relax.VirtualMachine(ex, tvm.opencl())`` work.  Without a GPU the device is PoCL (installed
with ``pyopencl[pocl]``); a vendor platform (NVIDIA, Qualcomm, ARM) is preferred when present.

This tutorial compiles a ViT-like encoder block for OpenCL with the smartmem pipeline, runs it
on the local OpenCL device, checks it against ONNX Runtime and times it, then compiles it again
for the ``opencl-texture`` target, where the matmul weights and the intermediate activations
live in image (2.5D texture) memory, packed by their reduction dimension into the RGBA lanes
of each texel.
"""

# %%
# The OpenCL device
# -----------------
# :func:`tvm_smartmem.runtime.opencl.describe` lists the platforms the runtime found (this is
# what ``tvm-smartmem devices`` prints).
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from tvm_smartmem import frontend, models, numerics, targets
from tvm_smartmem.measure import LocalRunner
from tvm_smartmem.pipeline import UP_TO_KERNELS, smartmem_pipeline
from tvm_smartmem.report import compare_pipelines
from tvm_smartmem.runtime import opencl
from tvm_smartmem.tir import knob_search
from tvm_smartmem.tir.matmul import load_table
from tvm_smartmem.transform.texture import texture_weights_of
from tvm_smartmem.transform.texture_activations import texture_activations_of

info = opencl.describe()
device = info["devices"][0]
print(f"platform: {info['platform']}, device: {device['name']}")
dev = tvm.opencl(0)
assert dev.exist

# %%
# Compile the transformer
# -----------------------
# ``targets.get("opencl")`` is a generic OpenCL GPU target with an LLVM host.  The registered
# ``"smartmem"`` pipeline folds the attention's head split / merge into the matmuls and fuses
# beyond TVM's rules; the statistics show the difference with TVM's default pipeline.
onnx_model = models.vit_block()
reports = compare_pipelines(onnx_model, "opencl", check=False)
for name, rep in reports.items():
    print(f"{name:9s} {rep.stats.kernels:3d} kernels, {rep.stats.data_movement_kernels} only "
          "move data")

mod, params = frontend.from_onnx(onnx_model)
ex = tvm.compile(mod, targets.get("opencl"), relax_pipeline="smartmem")

# %%
# Run it and check it
# -------------------
inputs = models.random_inputs(onnx_model, seed=1)
vm = relax.VirtualMachine(ex, dev)
# The pipeline moved weight-only work (the concatenated Q/K/V weight of the combined
# projections, transposed weights) into a load-time function: run it once per loaded model,
# then call ``main`` with the weights it returns.
weights = vm["main_transform_params"](*[tvm.runtime.tensor(p, dev) for p in params])
out = vm["main"](*[tvm.runtime.tensor(a, dev) for a in inputs.values()], *weights)
ok, err = numerics.compare([out.numpy()], numerics.onnxruntime_reference(onnx_model, inputs))
print(f"matches ONNX Runtime: {ok} (max scale-normalised error {err:.1e})")
assert ok

# %%
# Time it
# -------
# :class:`~tvm_smartmem.measure.LocalRunner` applies the project's one timing protocol:
# warm-up calls, then ``repeat`` x ``number`` timed calls, median / min / max.
result = LocalRunner("opencl", repeat=3, number=2, warmup=1).run(
    ex, list(inputs.values()), params)
print(result.summary())

# %%
# Texture (image2d) memory
# ------------------------
# TVM's texture scopes map an N-d tensor whose last dimension is 4 (the RGBA lanes of a texel)
# onto a 2D image: ``global.texture`` folds all but the last two other dimensions into the
# image height.  The runtime allocates real OpenCL images for these scopes and copies between
# host, buffers and images.
x = np.random.default_rng(0).random((2, 3, 5, 7, 4)).astype("float32")
image = tvm.runtime.empty(x.shape, "float32", dev, mem_scope="global.texture")
image.copyfrom(x)
print("image:", opencl.image_info(image))  # width 7, height 5, depth 2 * 3
np.testing.assert_array_equal(image.numpy(), x)

# %%
# Compile with textures
# ---------------------
# On a texture target the pipeline's ``PackWeightsToTexture`` stores every matmul weight
# ``W[k, n]`` as an image ``P[n, k // 4, k % 4]``: the reduction dimension in chunks of four
# across the RGBA lanes, one image row per output column.  Packing is weight-only work, so it
# runs once, in ``main_transform_params``; the GEMMs read whole texels (``read_imagef``) through
# the texture cache, and ``tir.texture.LowerTextureAccess`` lowers those accesses correctly
# (TVM's own Adreno path mis-compiles texture stores).  The function records which weights went
# to images and, for any that did not fit, why.
#
# Whether images pay depends on the GPU, so by default the pass follows a measurement: the
# shipped ``tvm_smartmem/tir/matmul_configs.json`` keeps weights in buffers on desktop OpenCL
# (texture GEMMs ran at 0.77x of buffer GEMMs on an H100,
# ``benchmarks/results/texture_matmul_h100.md``); on a mobile GPU, measure yours with
# ``benchmarks/texture_matmul_sweep.py``.  The same holds for the activations below (whole
# models with activations in images ran at 0.75x of the buffer builds on the H100,
# ``benchmarks/results/gpu_h100_b0ec827.md``).  Here we ask for images explicitly to see them.
os.environ["TVM_SMARTMEM_TEXTURE_WEIGHTS"] = "always"
os.environ["TVM_SMARTMEM_TEXTURE_ACTIVATIONS"] = "always"
texture_target = targets.get("opencl-texture")
kernels = smartmem_pipeline(texture_target, phases=UP_TO_KERNELS)(mod)
print("texture weights:", texture_weights_of(kernels["main"]))
ex_tex = tvm.compile(mod, texture_target, relax_pipeline="smartmem")

vm_tex = relax.VirtualMachine(ex_tex, dev)
weights_tex = vm_tex["main_transform_params"](*[tvm.runtime.tensor(p, dev) for p in params])
images = sum(opencl.image_info(w)["image"] for w in weights_tex)
print(f"{images} of the {len(weights_tex)} prepared weights are images")
assert images == texture_weights_of(kernels["main"])["packed"]
out_tex = vm_tex["main"](*[tvm.runtime.tensor(a, dev) for a in inputs.values()], *weights_tex)
ok, err = numerics.compare([out_tex.numpy()],
                           numerics.onnxruntime_reference(onnx_model, inputs))
print(f"texture build matches ONNX Runtime: {ok} (max scale-normalised error {err:.1e})")
assert ok

# %%
# Activations in images
# ---------------------
# The intermediate tensors go to images too (``PackActivationsToTexture``): after fusion, each
# tensor one kernel writes and other kernels read is packed along the axis its readers reduce
# over -- the hidden dimension a GEMM or a layernorm reads -- four values per texel, when every
# kernel touching it still schedules and lowers with the image; the others stay buffers, and
# the function says why (here: the attention kernel's inputs and output).
placement = texture_activations_of(kernels["main"])
print("activations in images:", placement["images"])
print("kept in buffers:", placement["kept"])
# %%
# The VM asks the runtime's allocator for those images (``DeviceAllocator.opencl``).  It pools
# them by extent: the first inference creates them, later ones reuse them.
stats = tvm.get_global_func("smartmem.opencl.allocator_stats")
before = dict(stats())
vm_tex["main"](*[tvm.runtime.tensor(a, dev) for a in inputs.values()], *weights_tex)
after = dict(stats())
print("images created by another inference:", after["images_created"] - before["images_created"],
      "reused:", after["images_reused"] - before["images_reused"])
assert after["images_created"] == before["images_created"]

# %%
# Buffers against textures, side by side: on a CPU OpenCL device (PoCL) only the ratio of two
# timings taken in one run means anything; on a GPU, see ``benchmarks/gpu_machine.py
# --targets opencl,opencl-texture`` (``benchmarks/results/gpu_texture_h100.md``).
runner = LocalRunner("opencl", repeat=3, number=2, warmup=1)
buf_ms = runner.run(ex, list(inputs.values()), params).median_ms
tex_ms = runner.run(ex_tex, list(inputs.values()), params).median_ms
print(f"buffers {buf_ms:.2f} ms, textures {tex_ms:.2f} ms (ratio {buf_ms / tex_ms:.2f}x)")

# %%
# Tuning the texture rules for this device
# ----------------------------------------
# The texture schedule rules have knobs (the GEMM's tiling, threads per block) whose best
# values depend on the GPU.  ``tvm-smartmem tune-schedules`` searches them with a small genetic
# algorithm, each candidate compiled by the pipeline, run on the device and checked against
# ONNX Runtime, and writes the winner into a table the rules read
# (``TVM_SMARTMEM_MATMUL_CONFIGS``).  The same search through the API, kept tiny here (two
# candidates) -- on PoCL the timings say little, on a phone or a GPU they are the point:
table = json.loads(json.dumps(load_table()))
workload = knob_search.Workload("vit_block", mod, params, list(inputs.values()),
                                numerics.onnxruntime_reference(onnx_model, inputs))
result = knob_search.genetic_search(
    knob_search.SPACE,
    lambda knobs: knob_search.model_score([workload], texture_target, runner, table, "opencl",
                                          knobs),
    population=2, generations=1, start=knob_search.start_point(table, "opencl"))
print(f"start {result.start_score:.2f} ms, best {result.best_score:.2f} ms:", result.best)
tuned = knob_search.write_entry(Path(tempfile.mkdtemp()) / "table.json", "opencl", result.best,
                                device="tutorial", measured="tutorial", speedup=result.speedup)
print("texture entry now:", tuned["opencl-texture"]["rules"])

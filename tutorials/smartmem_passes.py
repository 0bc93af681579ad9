"""
.. _tutorial-smartmem-passes:

Adding the smartmem passes to a ``tvm.transform.Sequential``
============================================================
The smartmem passes are ordinary Relax / TIR module passes.  This tutorial imports a BERT-like
ONNX layer, runs TVM's default fused lowering and the smartmem passes side by side as two
``tvm.transform.Sequential`` pipelines, and reads what each pass left behind with
:mod:`tvm_smartmem.analysis.stats` and the attributes the passes attach to ``main``.

Everything runs on the CPU in a few seconds; no download is needed.
"""

# %%
# Import the model
# ----------------
# ``builtin:bert_layer`` is a one-layer BERT encoder built with ``onnx.helper`` (sequence 32,
# hidden 64, 4 heads).  :func:`tvm_smartmem.frontend.from_onnx` returns the Relax module and
# its weights, kept out of the module as trailing arguments of ``main``.
import numpy as np
import tvm
from tvm import relax

from tvm_smartmem import frontend, models, numerics
from tvm_smartmem.analysis.classify import ClassifyOperators, classes_of
from tvm_smartmem.analysis.stats import collect
from tvm_smartmem.tir.index_simplify import SimplifyIndices
from tvm_smartmem.tir.inline_data_movement import InlineDataMovement
from tvm_smartmem.transform.eliminate_layout import EliminateLayoutTransforms, layout_plan
from tvm_smartmem.transform.fuse import FusePlan
from tvm_smartmem.transform.math_rewrite import MathPropertyRewrite, rewrites_of
from tvm_smartmem.transform.split_to_slices import SplitToSlices

onnx_model = models.bert_layer()
mod, params = frontend.from_onnx(onnx_model)
target = tvm.target.Target("llvm")
print(collect(mod).summary())

# %%
# TVM's default fused lowering
# ----------------------------
# Legalise every operator to TIR and let ``FuseOps`` group them by TVM's pattern rules.
# The statistics count kernels and the ones that only move data (transposes and reshapes that
# became copies).
tvm_default = tvm.transform.Sequential([
    relax.transform.LegalizeOps(),
    relax.transform.AnnotateTIROpPattern(),
    relax.transform.FoldConstant(),
    relax.transform.FuseOps(),
    relax.transform.FuseTIR(),
])
with target:
    baseline_mod = tvm_default(mod)
base = collect(baseline_mod)
print(f"TVM default: {base.kernels} kernels, {base.data_movement_kernels} only move data "
      f"({base.data_movement_bytes} bytes)")

# %%
# The smartmem passes
# -------------------
# The same lowering with the smartmem passes in their slots:
#
# * ``MathPropertyRewrite`` (DNNFusion): algebraic rewrites that remove FLOPs, e.g. the
#   ``/ sqrt(d)`` of the attention scores becomes a scale of the (smaller) queries;
# * ``ClassifyOperators``: each operator's mapping type and SmartMem layout quadrant;
# * ``EliminateLayoutTransforms`` (SmartMem): which layout operators fold into their producer or
#   consumer as an index map;
# * ``FusePlan`` (DNNFusion) replaces ``FuseOps`` and acts on those decisions;
# * ``InlineDataMovement`` and ``SimplifyIndices`` fold the data movement into the kernels'
#   loads and strength-reduce the ``//`` and ``%`` the index maps leave.
smartmem_passes = [
    relax.transform.DecomposeOpsForInference(),
    MathPropertyRewrite(),
    ClassifyOperators(),
    SplitToSlices(),
    relax.transform.LegalizeOps(),
    relax.transform.AnnotateTIROpPattern(),
    relax.transform.FoldConstant(),
    EliminateLayoutTransforms(),
    FusePlan(target),
    relax.transform.FuseTIR(),
    InlineDataMovement(),
    SimplifyIndices(),
]
with target:
    smartmem_mod = tvm.transform.Sequential(smartmem_passes)(mod)
ours = collect(smartmem_mod)
print(f"smartmem:    {ours.kernels} kernels, {ours.data_movement_kernels} only move data")
assert ours.kernels < base.kernels and ours.data_movement_kernels == 0

# %%
# What the passes recorded
# ------------------------
# Analysis results travel as attributes of ``main``: the rewrites and the FLOPs they remove,
# the operator classes, and the layout plan (binding -> action).
with target:
    classified = tvm.transform.Sequential([MathPropertyRewrite(), ClassifyOperators()])(mod)
counts, flops = rewrites_of(classified["main"])
print("rewrites:", counts, "FLOPs removed per inference:", flops)
for name, cls in list(classes_of(classified["main"]).items())[:6]:
    print(f"  {name:24s} {cls.mapping.name:14s} {cls.quadrant.value}")
with target:
    planned = tvm.transform.Sequential(smartmem_passes[:8])(mod)  # up to the layout plan
print("layout plan:", layout_plan(planned["main"]))

# %%
# Build and check against ONNX Runtime
# ------------------------------------
# The registered pipeline ``"smartmem"`` is the same passes plus TVM's VM lowering, so
# ``tvm.compile`` takes it by name.  Results must agree with ONNX Runtime.
ex = tvm.compile(mod, target, relax_pipeline="smartmem")
inputs = models.random_inputs(onnx_model, seed=0)
vm = relax.VirtualMachine(ex, tvm.cpu())
# weight-only work (e.g. the Q/K/V weights concatenated by CombineParallelMatmuls) was lifted
# into ``main_transform_params``: it runs once per loaded model, ``main`` takes its results
weights = vm["main_transform_params"](*[tvm.runtime.tensor(p) for p in params])
out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs.values()], *weights)
ok, err = numerics.compare([out.numpy()], numerics.onnxruntime_reference(onnx_model, inputs))
print(f"matches ONNX Runtime: {ok} (max scale-normalised error {err:.1e})")
assert ok and np.isfinite(out.numpy()).all()

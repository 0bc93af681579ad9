"""AllocateTextureTensors: a kernel output declared in a texture scope is allocated as an image.

``PackActivationsToTexture`` decides which intermediate tensors live in texture memory and
declares them so in the kernels (the PrimFunc parameter of the producer and of every consumer
is a buffer in ``global.texture``).  Relax itself still allocates every ``call_tir`` output in
plain ``global`` memory: after ``CallTIRRewrite`` each output is an
``R.builtin.alloc_tensor(shape, dtype, device, "global")`` passed to its kernel.  This pass
gives those allocations the scope the kernel declares, so that

* ``StaticPlanBlockMemory`` plans texture tensors in storage of their own scope (it pools
  storage per scope and dtype: an image is never planned into a buffer's storage), and
* the VM's allocator is asked for images (see ``TextureStorageViews`` and the OpenCL runtime's
  ``DeviceAllocator.opencl``).

It runs in the ``dataflow_lower`` phase right after ``CallTIRRewrite``, on every Relax function;
a function without texture-scoped kernel outputs is returned unchanged.  An output whose
scope the kernels disagree on (one writes an image, a reader expects a buffer) is a compiler
bug, reported as :class:`~tvm_smartmem.errors.TextureLoweringError` rather than left to fail on
the device.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from ..errors import TextureLoweringError
from ..tir.texture import TEXTURE_SCOPES, buffer_scope

ALLOC_OP = "relax.builtin.alloc_tensor"


def _param_scopes(mod: tvm.IRModule, callee) -> list[str] | None:
    """The memory scope of each parameter of the PrimFunc ``callee`` (None when it is not
    a PrimFunc of ``mod``)."""
    if not isinstance(callee, tvm.ir.GlobalVar) or callee not in mod.get_global_vars():
        return None
    func = mod[callee]
    if not isinstance(func, tirx.PrimFunc):
        return None
    return [buffer_scope(p) for p in func.params]


def texture_allocations(mod: tvm.IRModule, func: relax.Function) -> dict:
    """alloc variable -> texture scope, for every ``alloc_tensor`` whose tensor a kernel of
    ``mod`` reads or writes as a texture-scoped parameter; raises when kernels disagree."""
    allocs: dict = {}  # variable -> the alloc_tensor variable it is (CallTIRRewrite aliases)
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and \
                    v.op.name == ALLOC_OP:
                allocs[b.var] = b.var
            elif isinstance(v, relax.Var) and v in allocs:
                allocs[b.var] = allocs[v]
    wanted: dict = {}
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if not isinstance(v, relax.Call):
                continue
            scopes = _param_scopes(mod, v.op)
            if scopes is None or len(scopes) != len(v.args):
                continue
            for arg, scope in zip(v.args, scopes, strict=True):
                if arg not in allocs:
                    continue
                scope = scope if scope in TEXTURE_SCOPES else "global"
                root = allocs[arg]
                if wanted.setdefault(root, scope) != scope:
                    raise TextureLoweringError(
                        f"tensor '{arg.name}' is passed to kernels as both {wanted[root]} and "
                        f"{scope} memory (kernel '{v.op.name_hint}'): its producer and its "
                        "consumers must agree on texture placement")
    return {var: scope for var, scope in wanted.items() if scope in TEXTURE_SCOPES}


@relax.expr_functor.mutator
class _Rescope(relax.PyExprMutator):
    def __init__(self, scopes: dict, mod: tvm.IRModule):
        super().__init__(mod)
        self.scopes = scopes

    def visit_var_binding_(self, binding):
        scope = self.scopes.get(binding.var)
        if scope is None:
            super().visit_var_binding_(binding)
            return
        shape, dtype, device, _ = binding.value.args
        value = self.builder_.normalize(relax.op.builtin.alloc_tensor(shape, dtype, device, scope))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, value))


def AllocateTextureTensors() -> tvm.transform.Pass:
    """Allocate texture-scoped kernel outputs in their scope (see module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="AllocateTextureTensors")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = None
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            scopes = texture_allocations(mod, func)
            if not scopes:
                continue
            out = out or mod.clone()
            out[gv] = _Rescope(scopes, mod).visit_expr(func)
        return out or mod

    return _pass

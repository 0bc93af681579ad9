"""TextureStorageViews: tensors placed in texture-scoped storage are allocated as scoped views.

After memory planning a texture tensor is two VM calls: ``R.vm.alloc_storage(bytes, device,
dtype, "global.texture")`` for the (reusable) storage and ``R.vm.alloc_tensor(storage, offset,
shape, dtype, device)`` for the tensor in it.  The VM's ``vm.builtin.alloc_tensor`` makes a
*scoped* tensor -- the allocator's ``CreateView``, which for the OpenCL runtime is an image of
the tensor's extents -- only when it is given the scope as a fifth argument, and TVM's code
generator passes one only for modules that describe their memory with virtual devices (whose
other effects -- every unannotated tensor taking the module's default device scope -- we do
not want).  Here every ``R.vm.alloc_tensor`` whose storage was allocated in a texture scope
becomes that call with the storage's scope, so the tensor is an image; every other allocation
is left as it is.

Runs last in the ``finalize`` phase (after ``LowerRuntimeBuiltin`` made the ``R.vm`` calls); a
no-op for modules without texture-scoped storage.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..tir.texture import TEXTURE_SCOPES

STORAGE_OP = "relax.vm.alloc_storage"
TENSOR_OP = "relax.vm.alloc_tensor"
BUILTIN = "vm.builtin.alloc_tensor"


def _is_op(value, name: str) -> bool:
    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and \
        value.op.name == name


def _storage_scope(call: relax.Call) -> str | None:
    scope = call.args[3]
    return str(scope.value) if isinstance(scope, tvm.ir.StringImm) else None


@relax.expr_functor.mutator
class _ScopedViews(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.texture_storage: dict = {}

    def visit_var_binding_(self, binding):
        value = binding.value
        if _is_op(value, STORAGE_OP) and _storage_scope(value) in TEXTURE_SCOPES:
            self.texture_storage[binding.var] = _storage_scope(value)
        if _is_op(value, TENSOR_OP) and value.args[0] in self.texture_storage:
            storage, offset, shape, dtype = value.args[:4]
            scope = tvm.ir.StringImm(self.texture_storage[value.args[0]])
            call = relax.Call(relax.ExternFunc(BUILTIN),
                              [self.visit_expr(storage), offset, shape, dtype, scope],
                              ty_args=[binding.var.ty])
            self.builder_.emit_normalized(
                relax.VarBinding(binding.var, self.builder_.normalize(call)))
            return
        super().visit_var_binding_(binding)


def _has_texture_storage(func: relax.Function) -> bool:
    found: list = []

    def visit(expr):
        if _is_op(expr, STORAGE_OP) and _storage_scope(expr) in TEXTURE_SCOPES:
            found.append(expr)

    relax.analysis.post_order_visit(func.body, visit)
    return bool(found)


def TextureStorageViews() -> tvm.transform.Pass:
    """Allocate tensors of texture-scoped storage as scoped views (see module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="TextureStorageViews")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = None
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function) and _has_texture_storage(func):
                out = out or mod.clone()
                out[gv] = _ScopedViews(mod).visit_expr(func)
        return out or mod

    return _pass

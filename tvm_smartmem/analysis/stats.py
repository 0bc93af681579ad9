"""Statistics of an IRModule at any stage of compilation: the project's measuring stick.

SmartMem's claim is "fewer kernels, and no kernel that only moves data".  These counters make
that claim checkable on any module, whether it is

* **high level** (straight from a frontend: Relax operators such as ``relax.matmul``),
* **fused** (after ``FuseOps``: calls to Relax functions marked ``Primitive``),
* **legalized / fused TIR** (``R.call_tir`` to PrimFuncs), or
* **lowered** (after the Relax pipeline's finalisation: direct calls to PrimFuncs, allocations,
  ``vm.builtin.reshape`` views).

What is counted
---------------
``op_histogram``
    Relax operators called (``relax.matmul``: 6, ...), call plumbing (``call_tir``, allocations,
    ``vm.builtin.*``) excluded.
``layout_ops``
    The subset of the histogram that only changes layout: reshape, permute_dims,
    layout_transform, squeeze, expand_dims, flatten, pixel_shuffle (depth/space).
``kernels``
    Kernel launches: one per call site of a PrimFunc, of a fused ``Primitive`` function, or of an
    external library function (``call_dps_packed`` / an ``ExternFunc`` that is not a VM builtin).
``data_movement_kernels``
    Launches of kernels that only move data: every store writes a plain load, a cast of one, or a
    select between loads (constants allowed as a select's arm, e.g. padding), and at least one
    store reads memory.  A fused Relax function is one when everything it calls is.
``zero_copy_views``
    Layout changes that run without a kernel: ``vm.builtin.reshape``, ``R.memory.view`` and, in a
    module that has been legalized, the ``R.reshape`` calls ``RewriteDataflowReshape`` left.
``data_movement_bytes``
    Bytes read plus bytes written by the data-movement kernel launches (from the call sites'
    tensor shapes; launches with symbolic shapes are counted in ``unsized_data_movement``).
``load_time_kernels``
    Kernel launches of the load-time weight functions (``main_transform_params``, see
    ``transform.lift_weight_transforms``): they run once per loaded model, so they are counted
    apart and none of the per-inference counters above includes them.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable

import tvm
import tvm_ffi
from tvm import ir, relax, tirx

LAYOUT_OPS = frozenset(
    {
        "relax.reshape",
        "relax.permute_dims",
        "relax.layout_transform",
        "relax.squeeze",
        "relax.expand_dims",
        "relax.flatten",
        "relax.nn.pixel_shuffle",
    }
)

# Relax operators whose every output element is a copy of an input element: a fused group made
# only of these is a data-movement kernel even before it is lowered to TIR.
DATA_MOVEMENT_OPS = LAYOUT_OPS | {
    "relax.strided_slice",
    "relax.dynamic_strided_slice",
    "relax.concat",
    "relax.split",
    "relax.take",
    "relax.broadcast_to",
    "relax.tile",
    "relax.repeat",
    "relax.flip",
    "relax.astype",
    "relax.gather_elements",
    "relax.gather_nd",
    "relax.nn.pad",
    "relax.wrap_param",
}

_PLUMBING_PREFIXES = ("relax.vm.", "relax.memory.", "relax.builtin.")
_KERNEL_CALL_OPS = frozenset(
    {"relax.call_tir", "relax.call_tir_inplace", "relax.call_tir_with_grad"}
)
_VIEW_OPS = frozenset({"relax.memory.view"})
_PLUMBING_OPS = frozenset(
    {
        "relax.null_value",
        "relax.call_packed",
        "relax.call_pure_packed",
        "relax.shape_of",
        "relax.call_builtin_with_ctx",
        "relax.hint_on_device",
        "relax.to_vdevice",
        "relax.print",
        "relax.assert_op",
    }
)
# TIR intrinsics that select or reinterpret without computing ("prim." in 0.27, "tir." before).
_MOVE_INTRINSICS = frozenset({"reinterpret", "likely"})


@dataclasses.dataclass
class KernelStats:
    """One distinct kernel (PrimFunc, fused function or library call) and how often it runs."""

    name: str
    launches: int
    data_movement: bool
    kind: str  # "tir" | "fused" | "library"
    bytes_per_launch: int | None


@dataclasses.dataclass
class ModuleStats:
    """Counters of one IRModule; see the module docstring for the definitions."""

    stage: str
    op_histogram: dict[str, int]
    layout_ops: dict[str, int]
    kernels: int
    data_movement_kernels: int
    zero_copy_views: int
    data_movement_bytes: int
    unsized_data_movement: int
    kernel_table: list[KernelStats]
    load_time_kernels: int = 0

    @property
    def num_layout_ops(self) -> int:
        return sum(self.layout_ops.values())

    @property
    def distinct_kernels(self) -> int:
        return len(self.kernel_table)

    def summary(self) -> dict[str, int | str]:
        """The scalar counters, with keys that name what they count (JSON-friendly)."""
        return {
            "stage": self.stage,
            "relax_ops": sum(self.op_histogram.values()),
            "layout_ops": self.num_layout_ops,
            "kernels": self.kernels,
            "distinct_kernels": self.distinct_kernels,
            "data_movement_kernels": self.data_movement_kernels,
            "zero_copy_views": self.zero_copy_views,
            "data_movement_bytes": self.data_movement_bytes,
            "unsized_data_movement_kernels": self.unsized_data_movement,
            "load_time_kernels": self.load_time_kernels,
        }

    def to_dict(self) -> dict:
        out = dict(self.summary())
        out["op_histogram"] = dict(self.op_histogram)
        out["layout_op_histogram"] = dict(self.layout_ops)
        out["kernel_table"] = [dataclasses.asdict(k) for k in self.kernel_table]
        return out


# --------------------------------------------------------------------------------------------
# PrimFunc analysis
# --------------------------------------------------------------------------------------------


def _is_move_value(value, allow_const: bool) -> bool:
    """Does this stored value only copy memory (load, cast of a load, select of loads)?"""
    if isinstance(value, ir.TensorLoad):
        return True
    if isinstance(value, (tirx.IntImm, tirx.FloatImm)):
        return allow_const
    if isinstance(value, (tirx.Cast, tirx.Broadcast)):
        return _is_move_value(value.value, allow_const)
    if isinstance(value, tirx.Shuffle):
        return all(_is_move_value(v, allow_const) for v in value.vectors)
    if isinstance(value, tirx.Select):
        return _is_move_value(value.true_value, True) and _is_move_value(value.false_value, True)
    if isinstance(value, ir.Call) and isinstance(value.op, ir.Op):
        name = value.op.name.rsplit(".", 1)[-1]
        if name == "if_then_else":
            return _is_move_value(value.args[1], True) and _is_move_value(value.args[2], True)
        if name in _MOVE_INTRINSICS:
            return all(_is_move_value(a, allow_const) for a in value.args)
    return False


def _reads_memory(value) -> bool:
    found = []
    tvm_ffi.structural_walk(value, (ir.TensorLoad, found.append))
    return bool(found)


def is_data_movement_primfunc(func: tirx.PrimFunc) -> bool:
    """True when every store of ``func`` only copies data and at least one store reads memory.

    A kernel that only fills constants is *not* data movement (it moves nothing); a reduction is
    not (its update store computes).  Stores into local/shared staging buffers count like any
    other store, so a shared-memory tiled transpose is still data movement.
    """
    stores: list = []
    tvm_ffi.structural_walk(func.body, (tirx.BufferStore, stores.append))
    if not stores:
        return False
    if not all(_is_move_value(s.value, allow_const=False) or _is_const(s.value) for s in stores):
        return False
    return any(_reads_memory(s.value) for s in stores)


def _is_const(value) -> bool:
    if isinstance(value, (tirx.IntImm, tirx.FloatImm)):
        return True
    return isinstance(value, tirx.Broadcast) and _is_const(value.value)


# --------------------------------------------------------------------------------------------
# Relax call-site analysis
# --------------------------------------------------------------------------------------------


def tensor_bytes(ty) -> int | None:
    """Bytes of a tensor (or tuple of tensors) type; None when a dim is symbolic or unknown."""
    if isinstance(ty, relax.TupleType):
        sizes = [tensor_bytes(f) for f in ty.fields]
        return None if any(s is None for s in sizes) else sum(sizes)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    shape = getattr(ty.shape, "values", None)
    if shape is None:
        return None
    numel = 1
    for dim in shape:
        if not isinstance(dim, tirx.IntImm):
            return None
        numel *= int(dim.value)
    dtype = tvm.runtime.DataType(ty.dtype)
    return numel * ((dtype.bits * dtype.lanes + 7) // 8)


def _call_bytes(args: Iterable, out_ty) -> int | None:
    total = 0
    for a in args:
        if isinstance(a, relax.Tuple):
            b = _call_bytes(a.fields, None)
        elif isinstance(a.ty, (relax.TensorType, relax.TupleType)):
            b = tensor_bytes(a.ty)
        else:
            continue
        if b is None:
            return None
        total += b
    if out_ty is not None:
        b = tensor_bytes(out_ty)
        if b is None:
            return None
        total += b
    return total


def _op_name(call) -> str | None:
    return call.op.name if isinstance(call.op, ir.Op) else None


class _Collector:
    """Walks the Relax functions of a module and records kernels, ops and views."""

    def __init__(self, mod: tvm.IRModule):
        self.mod = mod
        self.ops: Counter = Counter()
        self.views = 0
        self.kernels: dict[str, KernelStats] = {}
        self.launch_bytes: list[tuple[str, int | None]] = []
        self._dm_cache: dict[str, bool] = {}

    # -- classification of callees ---------------------------------------------------------
    def _callee_is_data_movement(self, gv: ir.GlobalVar) -> bool:
        name = gv.name_hint
        if name not in self._dm_cache:
            func = self.mod[gv]
            if isinstance(func, tirx.PrimFunc):
                self._dm_cache[name] = is_data_movement_primfunc(func)
            else:
                self._dm_cache[name] = self._relax_func_is_data_movement(func)
        return self._dm_cache[name]

    def _relax_func_is_data_movement(self, func: relax.Function) -> bool:
        calls: list = []
        relax.analysis.post_order_visit(
            func.body, lambda e: calls.append(e) if isinstance(e, relax.Call) else None
        )
        if not calls:
            return False
        for call in calls:
            op = _op_name(call)
            if op in _KERNEL_CALL_OPS:
                if not self._callee_is_data_movement(call.args[0]):
                    return False
            elif op is None or op not in DATA_MOVEMENT_OPS:
                return False
        return True

    def _record_kernel(self, name: str, kind: str, dm: bool, nbytes: int | None) -> None:
        k = self.kernels.get(name)
        if k is None:
            k = self.kernels[name] = KernelStats(name, 0, dm, kind, nbytes)
        k.launches += 1
        self.launch_bytes.append((name, nbytes))

    # -- visiting -----------------------------------------------------------------------------
    def visit_function(self, func: relax.Function) -> None:
        relax.analysis.post_order_visit(
            func.body, lambda e: self._visit_call(e) if isinstance(e, relax.Call) else None
        )

    def _visit_call(self, call) -> None:
        op = call.op
        if isinstance(op, ir.Op):
            name = op.name
            if name in _KERNEL_CALL_OPS:
                gv = call.args[0]
                out_ty = call.ty_args[0] if call.ty_args else call.ty
                nbytes = _call_bytes(call.args[1].fields, out_ty)
                self._record_kernel(gv.name_hint, "tir", self._callee_is_data_movement(gv), nbytes)
            elif name == "relax.call_dps_packed":
                self._record_kernel(str(call.args[0].global_symbol), "library", False, None)
            elif name in _VIEW_OPS:
                self.views += 1
            elif name in _PLUMBING_OPS or name.startswith(_PLUMBING_PREFIXES):
                return
            else:
                self.ops[name] += 1
        elif isinstance(op, ir.GlobalVar) and op in self.mod.get_global_vars():
            callee = self.mod[op]
            if isinstance(callee, tirx.PrimFunc):
                self._record_kernel(
                    op.name_hint, "tir", self._callee_is_data_movement(op),
                    _call_bytes(call.args, None),
                )
            elif isinstance(callee, relax.Function) and _is_primitive(callee):
                self._record_kernel(
                    op.name_hint, "fused", self._callee_is_data_movement(op),
                    _call_bytes(call.args, call.ty),
                )
        elif isinstance(op, relax.ExternFunc):
            symbol = str(op.global_symbol)
            if symbol == "vm.builtin.reshape":
                self.views += 1
            elif not symbol.startswith("vm."):
                self._record_kernel(symbol, "library", False, None)


def _is_primitive(func: relax.Function) -> bool:
    return bool(func.attrs) and "Primitive" in func.attrs and bool(func.attrs["Primitive"])


def _stage(c: _Collector, legalized: bool) -> str:
    if not legalized:
        return "high-level"
    if any(k.kind == "fused" for k in c.kernels.values()):
        return "fused"
    lowered = any(
        isinstance(f, relax.Function) and not _is_primitive(f) and _has_vm_alloc(f)
        for _, f in c.mod.functions_items()
    )
    return "lowered" if lowered else "legalized"


def _has_vm_alloc(func: relax.Function) -> bool:
    allocs = ("relax.vm.alloc_storage", "relax.vm.alloc_tensor")
    found = []
    relax.analysis.post_order_visit(
        func.body,
        lambda e: found.append(e) if isinstance(e, relax.Call) and _op_name(e) in allocs else None,
    )
    return bool(found)


def collect(mod: tvm.IRModule) -> ModuleStats:
    """Count what ``mod`` holds as it is (it is not compiled or changed)."""
    from ..transform.lift_weight_transforms import is_load_time

    c = _Collector(mod)
    load = _Collector(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function) and not _is_primitive(func):
            (load if is_load_time(gv.name_hint) else c).visit_function(func)
    # Once every compute op has become a kernel, the reshapes still standing are views that the
    # VM executes without a kernel (RewriteDataflowReshape put them back on purpose).
    legalized = bool(c.kernels) and set(c.ops) <= {"relax.reshape"}
    if legalized:
        c.views += c.ops.get("relax.reshape", 0)
    dm_launches = [(n, b) for n, b in c.launch_bytes if c.kernels[n].data_movement]
    layout = {k: v for k, v in c.ops.items() if k in LAYOUT_OPS}
    return ModuleStats(
        stage=_stage(c, legalized),
        op_histogram=dict(sorted(c.ops.items())),
        layout_ops=dict(sorted(layout.items())),
        kernels=len(c.launch_bytes),
        data_movement_kernels=len(dm_launches),
        zero_copy_views=c.views,
        data_movement_bytes=sum(b for _, b in dm_launches if b is not None),
        unsized_data_movement=sum(1 for _, b in dm_launches if b is None),
        kernel_table=sorted(c.kernels.values(), key=lambda k: (-k.launches, k.name)),
        load_time_kernels=len(load.launch_bytes),
    )

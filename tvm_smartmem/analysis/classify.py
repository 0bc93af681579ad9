"""Operator classification: DNNFusion mapping types and SmartMem layout quadrants.

Two views of the same operator, both from the papers (``papers.md`` sections 1.1 and 2.1):

* **Mapping type** (DNNFusion, Table 2): how output elements depend on input elements.
  One-to-one (elementwise, also Concat / Slice / Split), one-to-many (broadcast, gather,
  resize), many-to-many (conv, matmul, reductions, softmax, norms), reorganize (reshape family:
  same element order, new shape) and shuffle (transpose family: elements permuted).  An operator
  with several inputs takes the most complex of its inputs' types; a broadcast input makes it
  one-to-many.
* **Quadrant** (SmartMem, Table 3): does the operator's result depend on its *input layout*
  (ILD) or not (ILI), and can its *output layout* be chosen (Var) or is it fixed by the operator
  (Fixed)?  Elementwise ops are ILI-Var only when their operands' layouts match (same shape);
  with broadcasting they are ILD-Var.

Plus the algebraic properties the rewriter (``transform.math_rewrite``) needs: associative,
commutative, distributive.

Anything not in the tables is **opaque**: never fused through, never rewritten, and listed in a
warning by :func:`ClassifyOperators`.  Two entry points:

* :func:`classify_call` for high-level Relax calls (before ``LegalizeOps``);
* :func:`classify_primfunc` for PrimFuncs (after it), from the TIR itself: op pattern, and for
  injective kernels an analysis of the index maps.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from collections.abc import Iterable

import numpy as np
import tvm
import tvm_ffi
from tvm import ir, relax, s_tir, tirx


class MappingType(enum.IntEnum):
    """DNNFusion mapping types, ordered by complexity (OtO < Reorg < Shuffle < OtM < MtM)."""

    ONE_TO_ONE = 0
    REORGANIZE = 1
    SHUFFLE = 2
    ONE_TO_MANY = 3
    MANY_TO_MANY = 4
    OPAQUE = 5

    @property
    def short(self) -> str:
        return {0: "OtO", 1: "Reorg", 2: "Shuffle", 3: "OtM", 4: "MtM", 5: "Opaque"}[self.value]


class Quadrant(enum.Enum):
    ILD_VAR = "ILD-Var"
    ILD_FIXED = "ILD-Fixed"
    ILI_VAR = "ILI-Var"
    ILI_FIXED = "ILI-Fixed"
    OPAQUE = "Opaque"

    @property
    def fixed(self) -> bool:
        return self in (Quadrant.ILD_FIXED, Quadrant.ILI_FIXED)


@dataclasses.dataclass(frozen=True)
class OpClass:
    """Classification of one operator instance."""

    mapping: MappingType
    quadrant: Quadrant
    associative: bool = False
    commutative: bool = False
    distributive: bool = False

    @property
    def opaque(self) -> bool:
        return self.mapping == MappingType.OPAQUE

    def __str__(self) -> str:
        flags = "".join(f for f, on in (("A", self.associative), ("C", self.commutative),
                                        ("D", self.distributive)) if on)
        return f"{self.mapping.short}/{self.quadrant.value}" + (f"/{flags}" if flags else "")

    @classmethod
    def parse(cls, text: str) -> OpClass:
        parts = str(text).split("/")
        mapping = next(m for m in MappingType if m.short == parts[0])
        quadrant = Quadrant(parts[1])
        flags = parts[2] if len(parts) > 2 else ""
        return cls(mapping, quadrant, "A" in flags, "C" in flags, "D" in flags)


OPAQUE = OpClass(MappingType.OPAQUE, Quadrant.OPAQUE)

# -- high-level Relax operators --------------------------------------------------------------

_UNARY = [
    "abs", "acos", "acosh", "asin", "asinh", "atan", "atanh", "ceil", "cos", "cosh", "erf",
    "exp", "floor", "isfinite", "isinf", "isnan", "log", "logical_not", "negative", "round",
    "rsqrt", "sigmoid", "sign", "sin", "sinh", "sqrt", "square", "tan", "tanh", "trunc",
    "bitwise_not", "astype", "clip", "nn.relu", "nn.gelu", "nn.gelu_tanh", "nn.silu",
    "nn.selu", "nn.leakyrelu", "nn.softplus", "nn.dropout", "wrap_param",
]
# binary elementwise: (name, associative, commutative, distributive)
_BINARY = [
    ("add", True, True, False), ("multiply", True, True, True), ("subtract", False, False, False),
    ("divide", False, False, True), ("maximum", True, True, False),
    ("minimum", True, True, False), ("power", False, False, False),
    ("floor_divide", False, False, False), ("floor_mod", False, False, False),
    ("mod", False, False, False), ("atan2", False, False, False),
    ("equal", False, True, False), ("not_equal", False, True, False),
    ("greater", False, False, False), ("greater_equal", False, False, False),
    ("less", False, False, False), ("less_equal", False, False, False),
    ("logical_and", True, True, False), ("logical_or", True, True, False),
    ("logical_xor", True, True, False), ("bitwise_and", True, True, False),
    ("bitwise_or", True, True, False), ("bitwise_xor", True, True, False),
    ("left_shift", False, False, False), ("right_shift", False, False, False),
    ("log_add_exp", True, True, False), ("where", False, False, False),
    ("nn.prelu", False, False, False), ("ewise_fma", False, False, False),
]
_MANY_TO_MANY = [
    "matmul", "einsum", "outer", "nn.conv1d", "nn.conv2d", "nn.conv3d", "nn.conv1d_transpose",
    "nn.conv2d_transpose", "nn.conv3d_transpose", "nn.max_pool1d", "nn.max_pool2d",
    "nn.max_pool3d", "nn.avg_pool1d", "nn.avg_pool2d", "nn.avg_pool3d",
    "nn.adaptive_avg_pool1d", "nn.adaptive_avg_pool2d", "nn.adaptive_avg_pool3d",
    "nn.softmax", "nn.log_softmax", "nn.layer_norm", "nn.group_norm", "nn.instance_norm",
    "nn.rms_norm", "nn.batch_norm", "sum", "mean", "max", "min", "prod", "variance", "std",
    "median", "argmax", "argmin", "cumsum", "cumprod", "sort", "argsort", "topk",
    "collapse_sum_like", "collapse_sum_to",
]
_REORGANIZE = ["reshape", "squeeze", "expand_dims", "flatten", "nn.batch_flatten"]
_SHUFFLE = ["permute_dims", "nn.pixel_shuffle", "layout_transform", "flip"]
_SLICE_LIKE = ["strided_slice", "dynamic_strided_slice", "split", "concat", "stack"]  # OtO
_GATHER_LIKE = [
    "take", "gather_elements", "gather_nd", "broadcast_to", "tile", "repeat", "image.resize2d",
    "image.resize3d", "nn.pad", "one_hot", "index_tensor",
]
_ASSOC = {"matmul"}  # (AB)C = A(BC)
_DISTRIB = {"matmul", "sum", "mean", "nn.conv2d", "nn.conv1d"}  # linear in each operand

_TABLE: dict[str, OpClass] = {}
for _n in _UNARY:
    _TABLE[_n] = OpClass(MappingType.ONE_TO_ONE, Quadrant.ILI_VAR)
for _n, _a, _c, _d in _BINARY:
    _TABLE[_n] = OpClass(MappingType.ONE_TO_ONE, Quadrant.ILI_VAR, _a, _c, _d)
for _n in _MANY_TO_MANY:
    # batch_norm in inference is per-channel affine: DNNFusion lists it one-to-one
    mt = MappingType.ONE_TO_ONE if _n == "nn.batch_norm" else MappingType.MANY_TO_MANY
    _TABLE[_n] = OpClass(mt, Quadrant.ILD_VAR, _n in _ASSOC, False, _n in _DISTRIB)
for _n in _REORGANIZE:
    _TABLE[_n] = OpClass(MappingType.REORGANIZE, Quadrant.ILD_FIXED)
for _n in _SHUFFLE:
    _TABLE[_n] = OpClass(MappingType.SHUFFLE, Quadrant.ILD_FIXED)
for _n in _SLICE_LIKE:
    _TABLE[_n] = OpClass(MappingType.ONE_TO_ONE, Quadrant.ILI_FIXED,
                         associative=_n == "concat")
for _n in _GATHER_LIKE:
    quadrant = Quadrant.ILD_VAR if _n.startswith("image.") else Quadrant.ILI_FIXED
    _TABLE[_n] = OpClass(MappingType.ONE_TO_MANY, quadrant)

#: Relax operator names (without the ``relax.`` prefix) this module classifies.
KNOWN_OPS = frozenset(_TABLE)

# operators that are plumbing, not computation: never classified, never reported
_IGNORED_PREFIXES = ("relax.vm.", "relax.memory.", "relax.builtin.", "relax.inspect.")
_IGNORED = frozenset({
    "relax.call_tir", "relax.call_tir_inplace", "relax.call_tir_with_grad",
    "relax.call_dps_packed", "relax.call_packed", "relax.call_pure_packed", "relax.null_value",
    "relax.shape_of", "relax.shape_to_tensor", "relax.tensor_to_shape", "relax.hint_on_device",
    "relax.to_vdevice", "relax.print", "relax.assert_op", "relax.make_closure",
    "relax.invoke_closure", "relax.invoke_pure_closure",
})


def is_plumbing(op_name: str) -> bool:
    return op_name in _IGNORED or op_name.startswith(_IGNORED_PREFIXES)


def _tensor_shape(expr) -> tuple | None:
    ty = getattr(expr, "ty", None)
    if isinstance(ty, relax.TensorType) and ty.shape is not None:
        values = getattr(ty.shape, "values", None)
        if values is not None:
            return tuple(int(d) if isinstance(d, tirx.IntImm) else str(d) for d in values)
    return None


def _tensor_args(call) -> list:
    out = []
    for a in call.args:
        if isinstance(a, relax.Tuple):
            out.extend(f for f in a.fields if isinstance(f.ty, relax.TensorType))
        elif isinstance(getattr(a, "ty", None), relax.TensorType):
            out.append(a)
    return out


def classify_call(call: relax.Call) -> OpClass:
    """Classify a high-level Relax operator call (unknown operators are :data:`OPAQUE`)."""
    if not isinstance(call.op, ir.Op):
        return OPAQUE
    name = call.op.name.removeprefix("relax.")
    base = _TABLE.get(name)
    if base is None:
        return OPAQUE
    if base.quadrant == Quadrant.ILI_VAR and base.mapping == MappingType.ONE_TO_ONE:
        shapes = [_tensor_shape(a) for a in _tensor_args(call)]
        out_shape = _tensor_shape(call)
        if len(shapes) > 1 and any(s != out_shape for s in shapes):
            # broadcasting: one input is read many times, and its layout must match the
            # output's for the indices to line up -> one-to-many, input-layout dependent
            return dataclasses.replace(base, mapping=MappingType.ONE_TO_MANY,
                                       quadrant=Quadrant.ILD_VAR)
    return base


def op_name(call) -> str | None:
    return call.op.name if isinstance(call, relax.Call) and isinstance(call.op, ir.Op) else None


# -- PrimFuncs -------------------------------------------------------------------------------


def prim_blocks(func: tirx.PrimFunc) -> list:
    """The blocks of ``func`` in program order, without the implicit root block."""
    found: list = []
    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, found.append))
    return [b for b in found if b.name_hint != "root"]


def _numel(buf) -> int | None:
    n = 1
    for d in buf.shape:
        if not isinstance(d, tirx.IntImm):
            return None
        n *= int(d.value)
    return n


def _flat(indices: Iterable[int], shape: Iterable[int]) -> int:
    flat = 0
    for i, d in zip(indices, shape, strict=True):
        flat = flat * d + i
    return flat


def _movement_kind(func: tirx.PrimFunc) -> MappingType:
    """Reorganize / shuffle / one-to-one (slice, concat) / one-to-many (gather, broadcast) for a
    kernel that only moves data, decided by evaluating its index maps at sample points."""
    params = [p.ty for p in func.params if isinstance(p.ty, tirx.buffer.BufferType)]
    if len(params) < 2:
        return MappingType.OPAQUE
    out, ins = params[-1], params[:-1]
    out_n = _numel(out)
    in_n = [_numel(b) for b in ins]
    if out_n is None or any(n is None for n in in_n):
        return MappingType.SHUFFLE  # symbolic: a layout op we cannot refine
    if any(str(b.dtype).startswith(("int", "uint")) and str(out.dtype) != str(b.dtype)
           for b in ins):
        return MappingType.ONE_TO_MANY  # reads an index tensor: gather
    if len(ins) > 1:
        return MappingType.ONE_TO_ONE  # concat / select between inputs
    if out_n > in_n[0]:
        return MappingType.ONE_TO_MANY  # broadcast, tile, pad
    if out_n < in_n[0]:
        return MappingType.ONE_TO_ONE  # slice
    blocks = prim_blocks(func)
    if len(blocks) != 1:
        return MappingType.SHUFFLE
    return _reorganize_or_shuffle(blocks[0], ins[0], out)


def _reorganize_or_shuffle(block, src, dst) -> MappingType:
    """Same element order in memory (reshape) or a permutation (transpose)?"""
    stores: list = []
    tvm_ffi.structural_walk(block.body, (tirx.BufferStore, stores.append))
    loads: list = []
    tvm_ffi.structural_walk(stores[0].value, (ir.TensorLoad, loads.append))
    if len(stores) != 1 or len(loads) != 1:
        return MappingType.SHUFFLE
    rng = np.random.default_rng(0)
    src_shape = [int(d) for d in src.shape]
    dst_shape = [int(d) for d in dst.shape]
    for _ in range(8):
        env = {iv.var: int(rng.integers(0, int(iv.dom.extent))) if isinstance(
            iv.dom.extent, tirx.IntImm) else 0 for iv in block.iter_vars}
        try:
            w = [_eval(e, env) for e in stores[0].indices]
            r = [_eval(e, env) for e in loads[0].indices]
        except (TypeError, KeyError, ValueError):
            return MappingType.SHUFFLE
        if _flat(w, dst_shape) != _flat(r, src_shape):
            return MappingType.SHUFFLE
    return MappingType.REORGANIZE


def _eval(expr, env: dict) -> int:
    """Evaluate an integer TIR index expression for concrete variable values."""
    from tvm.sym.analyzer import Analyzer

    analyzer = Analyzer()
    for var, value in env.items():
        analyzer.bind(var, tirx.const(value, str(getattr(var.ty, "dtype", "int64"))))
    result = analyzer.simplify(expr)
    if not isinstance(result, tirx.IntImm):
        raise ValueError("index did not evaluate to a constant")
    return int(result.value)


def classify_primfunc(func: tirx.PrimFunc) -> OpClass:
    """Classify a (legalised, possibly fused) PrimFunc from its TIR.

    Kernels that only move data are refined by their index maps (reshape, transpose, slice,
    gather...).  For the others TVM's op pattern says reduction / out-elementwise-fusable
    (many-to-many) or elementwise / broadcast / injective; an input smaller than the output
    means broadcasting (one-to-many, input-layout dependent) -- TVM marks broadcasting adds as
    plain elementwise, so the shapes decide, not the pattern.
    """
    from .stats import is_data_movement_primfunc

    pattern = int(func.attrs["op_pattern"]) if func.attrs and "op_pattern" in func.attrs else None
    if is_data_movement_primfunc(func):
        kind = _movement_kind(func)
        quadrant = {
            MappingType.REORGANIZE: Quadrant.ILD_FIXED,
            MappingType.SHUFFLE: Quadrant.ILD_FIXED,
            MappingType.ONE_TO_ONE: Quadrant.ILI_FIXED,
            MappingType.ONE_TO_MANY: Quadrant.ILI_FIXED,
        }.get(kind, Quadrant.OPAQUE)
        return OpClass(kind, quadrant)
    if pattern in (3, 4):
        return OpClass(MappingType.MANY_TO_MANY, Quadrant.ILD_VAR)
    if pattern in (0, 1, 2):
        buffers = [p.ty for p in func.params if isinstance(p.ty, tirx.buffer.BufferType)]
        sizes = [_numel(b) for b in buffers]
        if len(sizes) >= 2 and None not in sizes and min(sizes[:-1]) < sizes[-1]:
            return OpClass(MappingType.ONE_TO_MANY, Quadrant.ILD_VAR)
        return OpClass(MappingType.ONE_TO_ONE, Quadrant.ILI_VAR)
    return OPAQUE


def classify_binding(value, mod: tvm.IRModule) -> OpClass:
    """Classify the value of a binding: a high-level call, or a call_tir of a PrimFunc."""
    name = op_name(value)
    if name in ("relax.call_tir", "relax.call_tir_inplace"):
        callee = mod[value.args[0]]
        return classify_primfunc(callee) if isinstance(callee, tirx.PrimFunc) else OPAQUE
    if name is not None and not is_plumbing(name):
        return classify_call(value)
    return OPAQUE


# -- the pass --------------------------------------------------------------------------------

CLASSES_ATTR = "smartmem.op_classes"
OPAQUE_ATTR = "smartmem.opaque_ops"


def classify_function(func: relax.Function, mod: tvm.IRModule) -> tuple[dict[str, str], list[str]]:
    """(binding var name -> class string, names of unknown operators) for one function."""
    classes: dict[str, str] = {}
    unknown: set[str] = set()
    for block in func.body.blocks if isinstance(func.body, relax.SeqExpr) else []:
        for binding in block.bindings:
            value = binding.value
            name = op_name(value)
            if name is None and not (isinstance(value, relax.Call)
                                     and isinstance(value.op, ir.GlobalVar)):
                continue  # tuples, constants, vars
            if name is not None and is_plumbing(name) and name not in (
                "relax.call_tir", "relax.call_tir_inplace"
            ):
                continue
            cls = classify_binding(value, mod) if name else OPAQUE
            classes[binding.var.name] = str(cls)
            if cls.opaque:
                if name in ("relax.call_tir", "relax.call_tir_inplace"):
                    unknown.add(f"call_tir({value.args[0].name_hint})")
                else:
                    unknown.add(name or str(value.op.name_hint))
    return classes, sorted(unknown)


def ClassifyOperators() -> tvm.transform.Pass:
    """Annotate every Relax function with ``smartmem.op_classes`` (binding name -> mapping type /
    quadrant / properties) and ``smartmem.opaque_ops`` (operators it could not classify, which
    later passes treat as opaque).  Unknown operators are also reported in one warning."""

    @tvm.transform.module_pass(opt_level=0, name="ClassifyOperators")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = mod.clone()
        # PrimFuncs an importer emitted directly carry no op pattern yet; annotate a copy
        annotated = relax.transform.AnnotateTIROpPattern()(mod)
        all_unknown: set[str] = set()
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or (
                func.attrs and "Primitive" in func.attrs
            ):
                continue
            classes, unknown = classify_function(annotated[gv.name_hint], annotated)
            all_unknown.update(unknown)
            out[gv] = func.with_attrs({CLASSES_ATTR: classes, OPAQUE_ATTR: unknown})
        if all_unknown:
            warnings.warn(
                "tvm-smartmem: operators treated as opaque (not fused through, not rewritten): "
                + ", ".join(sorted(all_unknown)),
                stacklevel=2,
            )
        return out

    return _pass


def classes_of(func: relax.Function) -> dict[str, OpClass]:
    """The classification recorded on ``func`` by :func:`ClassifyOperators`."""
    if not func.attrs or CLASSES_ATTR not in func.attrs:
        return {}
    return {str(k): OpClass.parse(str(v)) for k, v in func.attrs[CLASSES_ATTR].items()}

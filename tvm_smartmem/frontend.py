"""Model importers: ONNX and ``torch.export`` to a Relax IRModule with the weights detached.

Both routes return ``(mod, params)``: ``mod["main"]`` takes the model inputs first and then one
argument per weight; ``params`` holds the weight arrays (numpy) in that order.  Weights stay out
of the module so that an exported library does not embed hundreds of megabytes, and so that a
runner can upload them once.

Why not ``tvm.relax.frontend.onnx.from_onnx(keep_params_in_input=True)`` directly?  It turns
*every* initializer into a function argument, including the int64 tensors that hold reshape
targets, slice bounds and gather indices.  Shape arithmetic on those (Swin's window partition,
``Concat`` of shape pieces) then fails with "Reshape expects the input tensor to have known
shape", and scalar constants (attention scale, GELU's 0.5) stop being constants that later
rewrites can fold.  Here only floating-point tensors with more than one element become
parameters; everything else is bound as a constant.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tvm import relax

from .errors import ModelLoadError, ShapeMismatchError, SmartMemError, UnsupportedOperatorError

Params = list[np.ndarray]

#: ONNX element types that hold weights (kept out of the module).
_WEIGHT_DTYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
     onnx.TensorProto.DOUBLE}
)

#: Attribute on ``main`` recording the original input names (ONNX names may be sanitised).
INPUT_NAMES_ATTR = "smartmem.input_names"


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------


def load_onnx(model: str | os.PathLike | bytes | onnx.ModelProto) -> onnx.ModelProto:
    """Load and validate an ONNX model, raising :class:`ModelLoadError` with a one-line reason."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray)):
        try:
            proto = onnx.load_from_string(bytes(model))
        except Exception as err:  # protobuf raises DecodeError and friends
            raise ModelLoadError(f"not a valid ONNX model: {_first_line(err)}") from None
    else:
        path = Path(model)
        if not path.exists():
            raise ModelLoadError(f"model file not found: {path}")
        if path.is_dir():
            raise ModelLoadError(f"model path is a directory, not an ONNX file: {path}")
        try:
            proto = onnx.load(str(path))
        except Exception as err:
            raise ModelLoadError(f"{path} is not a valid ONNX file: {_first_line(err)}") from None
    if not proto.graph.node:
        raise ModelLoadError("ONNX model has an empty graph (no nodes)")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        raise ModelLoadError(f"malformed ONNX model: {_first_line(err)}") from None
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    return proto


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def is_weight(init: onnx.TensorProto) -> bool:
    """Floating-point tensors with more than one element are weights; the rest are constants."""
    return init.data_type in _WEIGHT_DTYPES and int(np.prod(init.dims, dtype=np.int64)) > 1


#: Inputs that are attributes passed as tensors (a Resize's scales, a Pad's pads): constants
#: the output shape depends on, never weights, whatever their dtype and size.
_ATTRIBUTE_INPUTS = {"Resize": (1, 2, 3), "Upsample": (1,), "Pad": (1, 2, 3)}


def weight_names(graph: onnx.GraphProto) -> set[str]:
    """Initializers that are weights: :func:`is_weight`, and not read as an attribute-like
    input anywhere (UNet's upsampling ``Resize`` scales are four floats)."""
    attribute_like = {node.input[i] for node in _all_nodes(graph)
                      for i in _ATTRIBUTE_INPUTS.get(node.op_type, ())
                      if i < len(node.input) and node.input[i]}
    return {init.name for init in graph.initializer
            if is_weight(init) and init.name not in attribute_like}


def _check_operators(proto: onnx.ModelProto) -> None:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"Constant", "If"}
    bad = []
    for node in _all_nodes(proto.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            bad.append(node.op_type if node.domain in ("", "ai.onnx")
                       else f"{node.domain}.{node.op_type}")
    if bad:
        raise UnsupportedOperatorError.for_ops(bad)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def _model_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in proto.graph.initializer}
    return [vi for vi in proto.graph.input if vi.name not in inits]


def _check_shape_dict(proto: onnx.ModelProto, shape_dict: Mapping[str, Sequence] | None) -> None:
    if not shape_dict:
        return
    inputs = {vi.name: vi for vi in _model_inputs(proto)}
    for name, shape in shape_dict.items():
        if name not in inputs:
            raise ShapeMismatchError(
                f"shape_dict names '{name}', which is not a model input "
                f"(inputs: {', '.join(inputs) or 'none'})"
            )
        tt = inputs[name].type.tensor_type
        if tt.HasField("shape"):
            declared = tt.shape.dim
            if len(declared) != len(shape):
                raise ShapeMismatchError(
                    f"input '{name}' has rank {len(declared)} but shape_dict gives {list(shape)}"
                )
            for d, want in zip(declared, shape, strict=True):
                if isinstance(want, int) and d.dim_value > 0 and d.dim_value != want:
                    raise ShapeMismatchError(
                        f"input '{name}' is declared {_dims(declared)} but shape_dict gives "
                        f"{list(shape)}"
                    )


def _dims(dims) -> list:
    return [d.dim_value if d.dim_value > 0 else (d.dim_param or "?") for d in dims]


def _constants_as_nodes(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Copy of ``proto`` where non-weight initializers are ``Constant`` nodes.

    TVM's importer binds ``Constant`` nodes as ``relax.const`` even with
    ``keep_params_in_input=True``, which keeps shape arithmetic static.
    """
    out = _copy(proto)
    graph = out.graph
    weights, consts = [], []
    names = weight_names(graph)
    for init in graph.initializer:
        (weights if init.name in names else consts).append(init)
    const_names = {c.name for c in consts}
    const_nodes = [
        onnx.helper.make_node("Constant", [], [c.name], value=c) for c in consts
    ]
    kept_inputs = [vi for vi in graph.input if vi.name not in const_names]
    del graph.initializer[:]
    graph.initializer.extend(weights)
    del graph.input[:]
    graph.input.extend(kept_inputs)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(const_nodes + nodes)
    return out, [w.name for w in weights]


#: Operators that appear in shape arithmetic and are cheap to evaluate ahead of time.
_SHAPE_ARITH_OPS = frozenset(
    {"Shape", "Size", "Gather", "Div", "Mul", "Add", "Sub", "Mod", "Neg", "Abs", "Floor", "Ceil",
     "Concat", "Slice", "Unsqueeze", "Squeeze", "Cast", "Reshape", "Identity", "Equal", "Less",
     "Greater", "Not", "And", "Or", "Where", "Max", "Min", "ReduceProd", "ReduceSum", "Range",
     "ConstantOfShape", "Expand", "Tile", "Transpose", "Sqrt", "Constant"}
)
_MAX_FOLDED_ELEMENTS = 4096


def _apply_shape_dict(proto: onnx.ModelProto, shape_dict: Mapping[str, Sequence]) -> None:
    """Write ``shape_dict`` overrides into the graph inputs so that inference sees them."""
    for vi in proto.graph.input:
        if vi.name in shape_dict:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in shape_dict[vi.name]:
                dim = dims.add()
                if isinstance(d, str):
                    dim.dim_param = d
                else:
                    dim.dim_value = int(d)


def _static_shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # inference is a help, not a requirement
        inferred = proto
    g = inferred.graph
    out = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            out[vi.name] = [d.dim_value for d in tt.shape.dim]
    return out


def fold_shape_arithmetic(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate the graph's shape arithmetic ahead of time and bind the results as constants.

    Exporters compute reshape targets at run time (``Shape -> Gather -> Div -> Concat``, timm's
    ``x.view(B, H // ws, ws, W // ws, ws, C)``).  TVM's importer needs a static ``Shape`` for
    ``Reshape`` and rejects such graphs.  Wherever the input shapes are static, those chains are
    computable now: each node of :data:`_SHAPE_ARITH_OPS` whose inputs are all known and that
    derives from a shape or an integer constant is evaluated with ``onnx.reference`` and replaced
    by a ``Constant``.  Float weights never take part (they are not "shape-derived").
    """
    from onnx.reference import ReferenceEvaluator

    shapes = _static_shapes(proto)
    known: dict[str, np.ndarray] = {}
    derived: set[str] = set()
    names = weight_names(proto.graph)
    for init in proto.graph.initializer:
        if init.name not in names:
            known[init.name] = numpy_helper.to_array(init)
            if not np.issubdtype(known[init.name].dtype, np.floating):
                derived.add(init.name)
    folded: set[int] = set()
    for idx, node in enumerate(proto.graph.node):
        if node.op_type not in _SHAPE_ARITH_OPS or node.domain not in ("", "ai.onnx"):
            continue
        ins = [i for i in node.input if i]
        if node.op_type in ("Shape", "Size"):
            if ins[0] not in shapes:
                continue
            values = _eval_shape_node(node, shapes[ins[0]])
            from_shape = True
        elif all(i in known for i in ins):
            from_shape = node.op_type == "Constant" or any(i in derived for i in ins)
            if not from_shape:
                continue
            try:
                values = ReferenceEvaluator(node).run(None, {i: known[i] for i in ins})
            except Exception:
                continue
        else:
            continue
        if node.op_type == "Constant" and np.issubdtype(np.asarray(values[0]).dtype, np.floating):
            continue  # float Constant nodes are left to the importer
        if any(np.asarray(v).size > _MAX_FOLDED_ELEMENTS for v in values):
            continue
        for name, v in zip(node.output, values, strict=False):
            known[name] = np.asarray(v)
            if from_shape:
                derived.add(name)
        folded.add(idx)
    if not folded or all(proto.graph.node[i].op_type == "Constant" for i in folded):
        return proto

    kept = [n for i, n in enumerate(proto.graph.node) if i not in folded]
    needed = {i for n in kept for i in n.input} | {o.name for o in proto.graph.output}
    produced = {o for i in folded for o in proto.graph.node[i].output}
    consts = [
        onnx.helper.make_node("Constant", [], [name],
                              value=numpy_helper.from_array(known[name], name))
        for name in sorted(produced & needed)
    ]
    out = _copy(proto)
    del out.graph.node[:]
    out.graph.node.extend(consts + kept)
    return out


def _eval_shape_node(node: onnx.NodeProto, shape: list[int]) -> list[np.ndarray]:
    if node.op_type == "Size":
        return [np.array(int(np.prod(shape)), dtype=np.int64)]
    attrs = {a.name: a.i for a in node.attribute}
    rank = len(shape)
    start = attrs.get("start", 0)
    end = attrs.get("end", rank)
    return [np.array(shape[slice(start, end)], dtype=np.int64)]


def from_onnx(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    shape_dict: Mapping[str, Sequence[int | str]] | None = None,
    dtype_dict: Mapping[str, str] | None = None,
    *,
    keep_params_in_input: bool = True,
    opset: int | None = None,
) -> tuple[tvm.IRModule, Params]:
    """Import an ONNX model (path, bytes or ``ModelProto``) into Relax.

    Parameters
    ----------
    model
        The ONNX model.
    shape_dict
        Input name -> shape, overriding the declared shape; a string entry makes that dim
        symbolic (e.g. ``{"input_ids": ["batch", 128]}``).  Dims declared symbolic in the file
        (``dim_param``) stay symbolic unless overridden.
    dtype_dict
        Input name -> dtype override.
    keep_params_in_input
        True (default): weights become trailing arguments of ``main`` and are returned in
        ``params``.  False: weights are bound as constants and ``params`` is empty.
    opset
        Override the model's opset (rarely needed).

    Returns
    -------
    (mod, params)
        ``mod["main"]`` has attributes ``num_input`` and ``smartmem.input_names``.
    """
    proto = load_onnx(model)
    _check_operators(proto)
    _check_shape_dict(proto, shape_dict)
    input_names = [vi.name for vi in _model_inputs(proto)]
    if shape_dict:
        proto = _copy(proto)
        _apply_shape_dict(proto, shape_dict)
    proto = fold_shape_arithmetic(proto)

    shapes = None
    if shape_dict:
        shapes = {k: [tvm.tirx.Var(d, "int64") if isinstance(d, str) else int(d) for d in v]
                  for k, v in shape_dict.items()}
    if keep_params_in_input:
        proto, weight_names = _constants_as_nodes(proto)
    else:
        weight_names = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # renames and checker chatter; real errors raise
        try:
            from tvm.relax.frontend.onnx import from_onnx as tvm_from_onnx

            mod = tvm_from_onnx(
                proto,
                shape_dict=shapes,
                dtype_dict=dict(dtype_dict) if dtype_dict else "float32",
                opset=opset,
                keep_params_in_input=keep_params_in_input,
            )
        except SmartMemError:
            raise
        except tvm.error.OpNotImplemented as err:
            raise UnsupportedOperatorError.for_ops(_ops_from_message(str(err))) from None
        except Exception as err:
            raise ModelLoadError(f"ONNX import failed: {summarize_tvm_error(err)}") from None

    mod, detached = relax.frontend.detach_params(mod)
    params = [p.numpy() for p in detached.get("main", [])]
    if len(params) != len(weight_names):
        raise ModelLoadError(
            f"ONNX import produced {len(params)} parameters for {len(weight_names)} weights"
        )
    main = mod["main"].with_attr(INPUT_NAMES_ATTR, input_names)
    mod["main"] = main
    return mod, params


def _ops_from_message(msg: str) -> list[str]:
    tail = msg.split(":")[-1]
    return [t.strip() for t in tail.split(",") if t.strip()] or [msg.strip()]


def summarize_tvm_error(err: BaseException) -> str:
    """One line out of a TVM error: the message, without the C++ traceback around it."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("File ", "at ", "Traceback", "[bt]", "^"))]
    for ln in reversed(lines):
        m = re.match(r"^(?:\w+Error|InternalError|TVMError):\s*(.*)$", ln)
        if m and m.group(1):
            return m.group(1)[:400]
    return (lines[-1] if lines else type(err).__name__)[:400]


# --------------------------------------------------------------------------------------------
# torch.export
# --------------------------------------------------------------------------------------------


def from_exported_program(
    exported_program: Any, *, keep_params_in_input: bool = True
) -> tuple[tvm.IRModule, Params]:
    """Import a ``torch.export.ExportedProgram`` into Relax (the second, torch-native route).

    The ONNX route is the one benchmark figures use: this one gives 2-5x more reshape /
    permute_dims on the same architectures (see ``model-zoo.md``).
    """
    try:
        import torch
    except ImportError:
        raise SmartMemError(
            "the torch.export route needs PyTorch: pip install 'tvm-smartmem[zoo]'"
        ) from None
    if not isinstance(exported_program, torch.export.ExportedProgram):
        raise ModelLoadError(
            f"expected a torch.export.ExportedProgram, got {type(exported_program).__name__}"
        )
    from tvm.relax.frontend.torch import from_exported_program as tvm_from_ep

    try:
        mod = tvm_from_ep(exported_program, keep_params_as_input=keep_params_in_input)
    except Exception as err:
        msg = summarize_tvm_error(err)
        if "Unsupported function type" in msg or "not supported" in msg.lower():
            raise UnsupportedOperatorError.for_ops([msg], frontend="torch") from None
        raise ModelLoadError(f"torch.export import failed: {msg}") from None
    mod, detached = relax.frontend.detach_params(mod)
    params = [p.numpy() for p in detached.get("main", [])]
    main = mod["main"]
    num_input = len(main.params) - len(params)
    names = [p.name for p in main.params[:num_input]]
    mod["main"] = main.with_attrs({"num_input": num_input, INPUT_NAMES_ATTR: names})
    return mod, params


def from_torch(
    module: Any, example_args: tuple, *, dynamic_shapes: Any = None,
    keep_params_in_input: bool = True,
) -> tuple[tvm.IRModule, Params]:
    """``torch.export.export(module, example_args)`` then :func:`from_exported_program`."""
    import torch

    module = module.eval()
    with torch.no_grad():
        ep = torch.export.export(module, tuple(example_args), dynamic_shapes=dynamic_shapes)
    return from_exported_program(ep, keep_params_in_input=keep_params_in_input)


# --------------------------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------------------------


def input_signature(mod: tvm.IRModule) -> list[dict]:
    """``[{"name", "shape", "dtype"}]`` of ``main``'s model inputs; symbolic dims as strings."""
    main = mod["main"]
    num_input = int(main.attrs["num_input"]) if main.attrs and "num_input" in main.attrs \
        else len(main.params)
    names = list(main.attrs[INPUT_NAMES_ATTR]) if main.attrs and INPUT_NAMES_ATTR in main.attrs \
        else [p.name for p in main.params[:num_input]]
    sig = []
    for name, var in zip(names, main.params[:num_input], strict=False):
        ty = var.ty
        shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in ty.shape.values] \
            if ty.shape is not None else None
        sig.append({"name": str(name), "shape": shape, "dtype": str(ty.dtype)})
    return sig


def check_inputs(signature: list[dict], inputs: Sequence[np.ndarray]) -> None:
    """Raise :class:`ShapeMismatchError` when ``inputs`` do not fit ``signature``.

    Symbolic dims must be consistent: the same name binds the same size everywhere.
    """
    if len(inputs) != len(signature):
        raise ShapeMismatchError(
            f"model takes {len(signature)} input(s) "
            f"({', '.join(s['name'] for s in signature)}), got {len(inputs)}"
        )
    bound: dict[str, int] = {}
    for spec, arr in zip(signature, inputs, strict=True):
        arr = np.asarray(arr)
        if str(arr.dtype) != spec["dtype"]:
            raise ShapeMismatchError(
                f"input '{spec['name']}' must be {spec['dtype']}, got {arr.dtype}"
            )
        want = spec["shape"]
        if want is None:
            continue
        ok = len(want) == arr.ndim
        for d, n in zip(want, arr.shape, strict=True) if ok else ():
            if isinstance(d, int):
                ok &= d == n
            elif re.fullmatch(r"[A-Za-z_]\w*", d):
                ok &= bound.setdefault(d, n) == n
        if not ok:
            raise ShapeMismatchError(
                f"input '{spec['name']}' must have shape {want}, got {list(arr.shape)}"
            )

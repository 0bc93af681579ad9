"""LiftWeightTransforms: work that depends on the weights alone runs once, at load time.

Imported models keep their weights as parameters of ``main`` (after ``num_input`` inputs, see
``frontend``), so anything computed from weights only -- a transposed ONNX ``Gemm`` weight, the
concatenated Q/K/V weight of ``CombineParallelMatmuls``, a scale folded into a weight, position
embeddings gathered at constant positions -- would otherwise be recomputed at every inference.
TVM's ``LiftTransformParams`` moves those bindings into ``<func>_transform_params``, which takes
the original weights (one tuple) and returns the ones ``main`` now takes.  This pass applies it
to the functions that declare ``num_input`` (others have no weights to speak of) and records
how many bindings moved as ``smartmem.lifted_bindings`` and the weight memory before and after
(``smartmem.weight_bytes``: copies of a weight kept in two layouts show up there) on the
function.

Callers then run ``<func>_transform_params`` once per loaded model: ``tvm_smartmem.measure``'s
runners, the CLI and the benchmarks do (:func:`tvm_smartmem.measure.runner.prepare_weights`);
with the plain VM it is ``weights = vm["main_transform_params"](*params)``, then
``vm["main"](*inputs, *weights)``.  Its kernels are load-time work and are not counted in the
per-inference statistics (``analysis.stats`` reports them apart).
"""

from __future__ import annotations

import tvm
from tvm import relax

from .partition import TRANSFORM_SUFFIX, for_each_function

LIFTED_ATTR = "smartmem.lifted_bindings"
WEIGHT_BYTES_ATTR = "smartmem.weight_bytes"


def _weight_bytes(params) -> int:
    from ..analysis.stats import tensor_bytes

    return sum(tensor_bytes(p.ty) or 0 for p in params)


def _computed(func: relax.Function) -> int:
    """Bindings that compute something (not the tuple plumbing of the weight tuple)."""
    return sum(isinstance(b.value, relax.Call) for blk in func.body.blocks for b in blk.bindings)


def _flat_signature(func: relax.Function, names: list[str]) -> relax.Function:
    """``f(weights: Tuple)`` -> ``f(w0, w1, ...)``, named after the model's weights.

    One tensor per argument is what every caller can pass -- a tuple argument cannot cross
    TVM's RPC (a phone measured through the tracker), and named arguments are what a user of
    ``vm["main_transform_params"](*weights)`` expects to see."""
    (packed,) = func.params
    fields = packed.ty.fields
    params = [relax.Var(n, ty) for n, ty in zip(names, fields, strict=True)] \
        if len(names) == len(fields) else \
        [relax.Var(f"w{i}", ty) for i, ty in enumerate(fields)]
    unpack = relax.BindingBlock([relax.VarBinding(packed, relax.Tuple(params))])
    body = relax.SeqExpr([unpack, *func.body.blocks], func.body.body)
    flat = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
    return relax.transform.CanonicalizeBindings()(
        tvm.IRModule({"f": flat}))["f"]


def LiftWeightTransforms(func_name: str | None = None) -> tvm.transform.Pass:
    """Lift the weight-only bindings of each function with ``num_input`` (or of ``func_name``
    alone) into ``<name>_transform_params``."""

    @tvm.transform.module_pass(opt_level=0, name="LiftWeightTransforms")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return for_each_function(mod, func_name, lift_function)

    return _pass


def lift_function(mod: tvm.IRModule, func_name: str) -> tvm.IRModule:
    """``mod`` with ``func_name``'s weight-only bindings lifted (see the module doc)."""
    names = [gv.name_hint for gv in mod.get_global_vars()]
    if func_name + TRANSFORM_SUFFIX in names:
        return mod  # lifted already
    func = mod[func_name]
    if not isinstance(func, relax.Function) or not func.attrs or \
            "num_input" not in func.attrs:
        return mod
    # only this function: LiftTransformParams works on every function with num_input
    single = tvm.IRModule({mod.get_global_var(func_name): func})
    lifted = relax.transform.LiftTransformParams()(single)
    transform = lifted.get_global_var(func_name + TRANSFORM_SUFFIX)
    moved = _computed(lifted[transform])
    out = mod.clone()
    n_in = int(func.attrs["num_input"])
    # weight memory before / after: copies (a weight kept as it is for one reader and
    # re-laid for another) show up as growth
    sizes = {"before": _weight_bytes(func.params[n_in:]),
             "after": _weight_bytes(lifted[func_name].params[n_in:])}
    out[func_name] = lifted[func_name].with_attr(
        LIFTED_ATTR, tvm.tirx.IntImm("int64", moved)).with_attr(
        WEIGHT_BYTES_ATTR, {k: tvm.tirx.IntImm("int64", v) for k, v in sizes.items()})
    names = [p.name for p in func.params[int(func.attrs["num_input"]):]]
    out[transform] = _flat_signature(lifted[transform], names)
    return out


def transform_function(mod_or_names, func_name: str = "main") -> str | None:
    """The name of ``func_name``'s load-time weight function in a module, or None."""
    names = [gv.name_hint for gv in mod_or_names.get_global_vars()] \
        if isinstance(mod_or_names, tvm.IRModule) else list(mod_or_names)
    name = func_name + TRANSFORM_SUFFIX
    return name if name in names else None


def is_load_time(name: str) -> bool:
    """Whether a Relax function of a compiled module runs once per load, not per inference."""
    return name.endswith(TRANSFORM_SUFFIX)

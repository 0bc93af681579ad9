"""Operator classification (mapping types, quadrants, properties) and the ECG."""

from __future__ import annotations

import warnings

import pytest
import tvm
from tvm import relax, te, topi

from tvm_smartmem import frontend, models
from tvm_smartmem.analysis.classify import (
    OPAQUE,
    ClassifyOperators,
    MappingType,
    OpClass,
    Quadrant,
    classes_of,
    classify_call,
    classify_primfunc,
)
from tvm_smartmem.analysis.ecg import build_ecg

M, Q = MappingType, Quadrant
F32 = "float32"


def _var(shape, dtype=F32):
    return relax.Var("v", relax.TensorType(shape, dtype))


def _call(make):
    """Normalise a call so that it carries its output type, as in a real module."""
    bb = relax.BlockBuilder()
    with bb.function("f", []):
        value = bb.normalize(make())
        bb.emit_func_output(relax.Tuple([]))
    return value


x4 = _var((2, 8, 4, 4))
w = _var((2, 8, 4, 6))
vec = _var((4,))
idx = _var((3,), "int64")

HIGH_LEVEL = [
    ("add, same shapes", lambda: relax.op.add(x4, x4), "OtO/ILI-Var/AC"),
    ("add, broadcast", lambda: relax.op.add(x4, vec), "OtM/ILD-Var/AC"),
    ("multiply", lambda: relax.op.multiply(x4, x4), "OtO/ILI-Var/ACD"),
    ("exp", lambda: relax.op.exp(x4), "OtO/ILI-Var"),
    ("matmul", lambda: relax.op.matmul(x4, w), "MtM/ILD-Var/AD"),
    ("softmax", lambda: relax.op.nn.softmax(x4), "MtM/ILD-Var"),
    ("sum", lambda: relax.op.sum(x4, axis=[1]), "MtM/ILD-Var/D"),
    ("reshape", lambda: relax.op.reshape(x4, (2, 128)), "Reorg/ILD-Fixed"),
    ("expand_dims", lambda: relax.op.expand_dims(x4, 0), "Reorg/ILD-Fixed"),
    ("permute_dims", lambda: relax.op.permute_dims(x4, [0, 2, 1, 3]), "Shuffle/ILD-Fixed"),
    ("strided_slice", lambda: relax.op.strided_slice(x4, [1], [0], [4]), "OtO/ILI-Fixed"),
    ("concat", lambda: relax.op.concat([x4, x4], axis=1), "OtO/ILI-Fixed/A"),
    ("take", lambda: relax.op.take(vec, idx, axis=0), "OtM/ILI-Fixed"),
    ("broadcast_to", lambda: relax.op.broadcast_to(vec, (3, 4)), "OtM/ILI-Fixed"),
]


@pytest.mark.parametrize("name, make, expected", HIGH_LEVEL, ids=[h[0] for h in HIGH_LEVEL])
def test_high_level_operators(name, make, expected):
    assert str(classify_call(_call(make))) == expected


def test_unknown_operator_is_opaque():
    unique = _call(lambda: relax.op.unique(vec))
    assert classify_call(unique) == OPAQUE and OPAQUE.opaque


def _prim(fcompute, *shapes, dtype=F32):
    ins = [te.placeholder(s, dtype, name=f"a{i}") for i, s in enumerate(shapes)]
    return te.create_prim_func([*ins, fcompute(*ins)])


def _annotated(func) -> tvm.tirx.PrimFunc:
    mod = relax.transform.AnnotateTIROpPattern()(tvm.IRModule({"main": func}))
    return mod["main"]


PRIMFUNCS = [
    ("reshape", lambda: _prim(lambda a: topi.reshape(a, (8, 4)), (4, 8)), "Reorg/ILD-Fixed"),
    ("expand_dims", lambda: _prim(lambda a: topi.expand_dims(a, 0), (4, 8)), "Reorg/ILD-Fixed"),
    ("transpose", lambda: _prim(lambda a: topi.transpose(a, [1, 0]), (4, 8)),
     "Shuffle/ILD-Fixed"),
    ("slice", lambda: _prim(lambda a: topi.strided_slice(a, [1, 0], [3, 8]), (4, 8)),
     "OtO/ILI-Fixed"),
    ("concat", lambda: _prim(lambda a, b: topi.concatenate([a, b], 0), (4, 8), (2, 8)),
     "OtO/ILI-Fixed"),
    ("broadcast_to", lambda: _prim(lambda a: topi.broadcast_to(a, (4, 8)), (8,)),
     "OtM/ILI-Fixed"),
    ("elementwise add", lambda: _prim(topi.add, (4, 8), (4, 8)), "OtO/ILI-Var"),
    ("broadcast add", lambda: _prim(topi.add, (4, 8), (8,)), "OtM/ILD-Var"),
    ("matmul", lambda: _prim(topi.matmul, (4, 8), (8, 4)), "MtM/ILD-Var"),
    ("sum", lambda: _prim(lambda a: topi.sum(a, axis=1), (4, 8)), "MtM/ILD-Var"),
]


@pytest.mark.parametrize("name, make, expected", PRIMFUNCS, ids=[p[0] for p in PRIMFUNCS])
def test_legalised_primfuncs(name, make, expected):
    assert str(classify_primfunc(_annotated(make()))) == expected


def test_gather_kernel_is_one_to_many():
    a = te.placeholder((4, 8), F32, name="a")
    i = te.placeholder((3,), "int64", name="i")
    func = _annotated(te.create_prim_func([a, i, topi.take(a, i, axis=0)]))
    assert str(classify_primfunc(func)) == "OtM/ILI-Fixed"


def test_class_strings_round_trip():
    for m in MappingType:
        for q in Quadrant:
            for a in (False, True):
                c = OpClass(m, q, associative=a, commutative=not a, distributive=a)
                assert OpClass.parse(str(c)) == c


def test_pass_records_classes_and_warns_about_opaque_operators():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4,), F32))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.exp(x))
            b = bb.emit(relax.op.reshape(a, (2, 2)))
            u = bb.emit(relax.op.unique(x))
            out = bb.emit_output(relax.Tuple([b, u]))
        bb.emit_func_output(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = ClassifyOperators()(bb.get())
    assert any("relax.unique" in str(w.message) for w in caught)
    classes = classes_of(mod["main"])
    assert str(classes[a.name]) == "OtO/ILI-Var" and str(classes[b.name]) == "Reorg/ILD-Fixed"
    assert classes[u.name].opaque
    assert list(mod["main"].attrs["smartmem.opaque_ops"]) == ["relax.unique"]


def test_every_builtin_model_is_fully_classified():
    """The ONNX importer's operators for these graphs are all known (no opaque warnings)."""
    for name in models.BUILTIN:
        mod, _ = frontend.from_onnx(models.get(name))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an opaque-operator warning would fail here
            out = ClassifyOperators()(mod)
        assert list(out["main"].attrs["smartmem.opaque_ops"]) == [], name


def test_ecg_of_bert_layer():
    mod, _ = frontend.from_onnx(models.bert_layer())
    mod = ClassifyOperators()(mod)
    ecg = build_ecg(mod["main"], mod)
    assert len(ecg) == len(mod["main"].body.blocks[0].bindings)
    for node in ecg:
        for s in node.succs:
            assert node.index in ecg.nodes[s].preds
    kinds = [n.mapping for n in ecg if n.op == "relax.permute_dims"]
    assert kinds and all(k == M.SHUFFLE for k in kinds)
    matmuls = [n for n in ecg if n.op == "relax.matmul"]
    assert len(matmuls) == 8 and all(n.quadrant == Q.ILD_VAR for n in matmuls)
    # the intermediate-result size of the attention scores [1, 4, 32, 32] fp32
    scores = next(n for n in ecg if n.op == "relax.nn.softmax")
    assert scores.nbytes == 4 * 32 * 32 * 4
    assert sum(n.is_output for n in ecg) == 1

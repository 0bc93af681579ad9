"""The texture rules' knob search: the genetic search itself, the table the rules read their
knobs from, and ``tvm-smartmem tune-schedules`` on PoCL."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tvm
import tvm_ffi
from conftest import assert_matches
from tvm import te, tirx
from tvm.s_tir import dlight as dl

from tvm_smartmem import cli, targets
from tvm_smartmem.cost.db import ProfileDB
from tvm_smartmem.tir import knob_search as ks
from tvm_smartmem.tir.matmul import load_table
from tvm_smartmem.tir.schedules import TextureElementwise, rule_knob
from tvm_smartmem.tir.texture import LowerTextureAccess
from tvm_smartmem.transform.texture_activations import pack_param, packed_shape

TEXTURE = targets.get("opencl-texture")
SPACE = {"a.x": (1, 2, 3, 4, 5), "b.y": (10, 20, 30, 40), "c.z": (0, 1)}
OPTIMUM = {"a.x": 4, "b.y": 20, "c.z": 1}


def _bowl(c: dict) -> float:
    """A known landscape: distance (in value indices) from OPTIMUM, plus one."""
    return 1 + sum(abs(SPACE[k].index(c[k]) - SPACE[k].index(OPTIMUM[k])) for k in SPACE)


def test_the_search_finds_the_optimum_and_measures_each_candidate_once():
    calls: list[tuple] = []

    def evaluate(c):
        calls.append(tuple(sorted(c.items())))
        return _bowl(c)

    start = {"a.x": 1, "b.y": 40, "c.z": 0}
    result = ks.genetic_search(SPACE, evaluate, population=6, generations=8, seed=3,
                               start=start)
    assert result.best == OPTIMUM and result.best_score == 1
    assert len(calls) == len(set(calls)) == len(result.history) <= 6 * 8
    assert result.start == start and result.start_score == _bowl(start)
    assert result.speedup == _bowl(start)
    # the same seed is the same search
    again = ks.genetic_search(SPACE, _bowl, population=6, generations=8, seed=3, start=start)
    assert again.history == result.history


def test_candidates_that_fail_never_win_and_bad_settings_are_refused():
    def evaluate(c):  # the optimum's neighbourhood "does not build"
        return math.inf if c["c.z"] == 1 else _bowl(c)

    result = ks.genetic_search(SPACE, evaluate, population=4, generations=3, seed=0)
    assert math.isfinite(result.best_score) and result.best["c.z"] == 0
    with pytest.raises(ValueError, match="population"):
        ks.genetic_search(SPACE, _bowl, population=1)
    with pytest.raises(ValueError, match="disagree"):
        ks.genetic_search(SPACE, _bowl, start={"a.x": 1})


def test_a_candidate_table_round_trips_through_the_start_point():
    table = json.loads(json.dumps(load_table()))
    start = ks.start_point(table, "opencl")
    assert set(start) == set(ks.SPACE)
    assert start["TextureElementwise.threads"] == 256  # nothing measured yet: the default
    assert start["TextureMatmul.block_size_x"] == table["opencl"]["config"]["block_size_x"]
    knobs = {**start, "TextureElementwise.threads": 64, "TextureMatmul.unroll": 16}
    out = ks.candidate_table(table, "opencl", knobs)
    assert ks.start_point(out, "opencl") == knobs
    assert out["opencl"] == table["opencl"]  # the buffer entry is untouched
    assert out["opencl-texture"]["texture_weights"] == table["opencl-texture"]["texture_weights"]


def _thread_extents(func) -> set[int]:
    loops: list = []
    tvm_ffi.structural_walk(func.body, (tirx.For, loops.append))
    return {int(f.extent) for f in loops
            if f.thread_binding is not None and f.thread_binding.thread_tag == "threadIdx.x"}


def test_the_rules_take_their_knobs_from_the_table(monkeypatch):
    """A table's ``rules`` reach the rule (threads per block of the element-wise rule), the
    kernel still computes the same values on PoCL, and an unknown knob is named."""
    from tvm_smartmem.runtime import opencl

    dev = opencl.require_device()
    shape = (8, 256)
    x = te.placeholder(shape, "float32", name="x")
    func = pack_param(te.create_prim_func([x, te.compute(shape, lambda i, j: te.exp(x[i, j]),
                                                          name="y")]), 1, 1)
    table = json.loads(json.dumps(load_table()))
    start = ks.start_point(table, "opencl")
    extents = {}
    for threads in (64, 128):
        knobs = {**start, "TextureElementwise.threads": threads}
        with ks.using_table(ks.candidate_table(table, "opencl", knobs)):
            assert rule_knob(TEXTURE, "TextureElementwise", "threads") == threads
            mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            with TEXTURE:
                mod = LowerTextureAccess()(dl.ApplyDefaultSchedule(TextureElementwise())(mod))
            extents[threads] = _thread_extents(mod["main"])
            ex = tvm.compile(mod, TEXTURE)
        data = np.random.default_rng(0).standard_normal(shape).astype("float32")
        out = tvm.runtime.empty(packed_shape(list(shape), 1), "float32", dev,
                                mem_scope="global.texture")
        ex["main"](tvm.runtime.tensor(data, dev), out)
        got = np.moveaxis(out.numpy(), -1, 2).reshape(shape)
        assert_matches([got], [np.exp(data)])
    assert extents == {64: {64}, 128: {128}}
    assert rule_knob(TEXTURE, "TextureElementwise", "threads") == 256  # the table is back

    bad = json.loads(json.dumps(table))
    bad["opencl-texture"]["rules"] = {"TextureElementwise": {"blocks": 3}}
    with pytest.raises(ValueError, match=r"TextureElementwise\.blocks"), ks.using_table(bad):
        load_table()


def test_tune_schedules_on_pocl_writes_a_table_and_reuses_its_measurements(tmp_path, capsys):
    db, table, results = tmp_path / "p.sqlite", tmp_path / "t.json", tmp_path / "r.json"
    argv = ["tune-schedules", "builtin:small_cnn", "--population", "2", "--generations", "1",
            "--repeat", "1", "--number", "1", "--warmup", "0", "--db", str(db),
            "--out", str(table), "--results", str(results)]
    assert cli.main(argv) == 0
    doc = json.loads(results.read_text())
    assert len(doc["history"]) == 2 and doc["start"] == ks.start_point(load_table(), "opencl")
    assert math.isfinite(doc["best_ms"]) and doc["best_ms"] <= doc["start_ms"]
    written = json.loads(table.read_text())["opencl-texture"]
    assert ks.start_point({"opencl-texture": written, **{k: v for k, v in load_table().items()
                                                        if k != "opencl-texture"}},
                          "opencl") == doc["best"]
    assert written["rules_device"].startswith("opencl:")
    rows = ProfileDB(db)._conn.execute("SELECT COUNT(*) FROM schedule_knobs").fetchone()[0]
    assert rows == 2
    # a second search on the same device and model reads its measurements back
    assert cli.main(argv) == 0
    again = json.loads(results.read_text())
    assert again["history"] == doc["history"]
    assert ProfileDB(db)._conn.execute("SELECT COUNT(*) FROM schedule_knobs").fetchone()[0] == 2
    capsys.readouterr()
    assert cli.main(["tune-schedules", "--target", "llvm"]) == 2
    assert "texture" in capsys.readouterr().err
    assert cli.main(["tune-schedules", "--population", "1"]) == 2
    assert "--population 2 or more" in capsys.readouterr().err


def test_tune_schedules_names_a_bad_table_in_one_line(tmp_path, monkeypatch, capsys):
    bad = json.loads(json.dumps(load_table()))
    bad["opencl-texture"]["rules"] = {"TextureElementwise": {"blocks": 3}}
    (tmp_path / "t.json").write_text(json.dumps(bad))
    monkeypatch.setenv("TVM_SMARTMEM_MATMUL_CONFIGS", str(tmp_path / "t.json"))
    load_table.cache_clear()
    try:
        assert cli.main(["tune-schedules"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "TextureElementwise.blocks" in err
        assert "Traceback" not in err
    finally:
        monkeypatch.delenv("TVM_SMARTMEM_MATMUL_CONFIGS")
        load_table.cache_clear()

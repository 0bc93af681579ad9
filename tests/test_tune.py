"""``tvm-smartmem tune``: the planner's yellow questions are measured into the profile database,
and the pipeline then answers them from it -- with unchanged numerics."""

from __future__ import annotations

import re

from conftest import LLVM, assert_matches, run_vm

from tvm_smartmem import frontend, models, numerics
from tvm_smartmem.cost import CostLayer
from tvm_smartmem.cost.db import ProfileDB
from tvm_smartmem.cost.tune import PLAN_PHASES, extract, tune, yellow_candidates
from tvm_smartmem.measure import LocalRunner
from tvm_smartmem.pipeline import UP_TO_KERNELS, smartmem_pipeline

FAST = {"repeat": 1, "number": 2, "warmup": 0}


def test_tune_fills_the_database_and_the_pipeline_answers_from_it(tmp_path, monkeypatch):
    model = models.llm_block()
    mod, params = frontend.from_onnx(model)
    db = ProfileDB(tmp_path / "profile.sqlite")
    results = tune(mod, LLVM, LocalRunner("cpu", **FAST), db, rounds=3, log=lambda _: None)
    measured = [r for r in results if r.error is None]
    assert measured and len(db) == len(measured)
    assert all(r.fused_ms > 0 and r.parts_ms > 0 for r in measured)

    monkeypatch.setenv("TVM_SMARTMEM_PROFILE_DB", str(db.path))
    lowered = smartmem_pipeline(LLVM, phases=UP_TO_KERNELS)(mod)
    sources = {re.search(r"\((\w+)\)$", str(d)).group(1)
               for d in lowered["main"].attrs["smartmem.fusion_decisions"]}
    assert "measured" in sources
    import tvm

    ex = tvm.compile(mod, LLVM, relax_pipeline=smartmem_pipeline(LLVM))
    inputs = models.random_inputs(model, seed=2)
    assert_matches(run_vm(ex, list(inputs.values()), params=params),
                   numerics.onnxruntime_reference(model, inputs))


def test_a_measured_question_is_not_measured_again(tmp_path):
    mod, _ = frontend.from_onnx(models.bert_layer())
    db = ProfileDB(tmp_path / "p.sqlite")
    first = tune(mod, LLVM, LocalRunner("cpu", **FAST), db, rounds=1, limit=3,
                 log=lambda _: None)
    assert len(first) == 3 and len(db) == 3
    planned = smartmem_pipeline(LLVM, phases=PLAN_PHASES)(mod)
    open_questions = [c for c in yellow_candidates(planned, LLVM, CostLayer.of(db))
                      if db.lookup(c.key) is None]
    second = tune(mod, LLVM, LocalRunner("cpu", **FAST), db, rounds=1, log=lambda _: None)
    assert len(second) == len(open_questions)
    assert len(db) == 3 + sum(r.error is None for r in second)


def test_extracted_candidate_reads_its_inputs_and_returns_what_escapes():
    mod, _ = frontend.from_onnx(models.bert_layer())
    planned = smartmem_pipeline(LLVM, phases=PLAN_PHASES)(mod)
    cand = yellow_candidates(planned, LLVM, CostLayer())[0]
    sub, mapping = extract(planned, cand.producer + cand.consumer)
    main = sub["main"]
    assert len(main.body.blocks[0].bindings) >= len(cand.producer + cand.consumer)
    assert all(p.name for p in main.params) and main.params
    assert all(v in mapping for v in cand.producer + cand.consumer)


def test_cli_tune(cli, tmp_path):
    db = tmp_path / "cli.sqlite"
    code, out, err = cli("tune", "builtin:bert_layer", "--db", str(db), "--limit", "2",
                         "--rounds", "1", "--repeat", "1", "--number", "1", "--warmup", "0")
    assert code == 0, err
    assert "2 candidate(s) measured on cpu" in out and "1/2" in err and "2/2" in err
    assert len(ProfileDB(db)) == 2
    code, _, err = cli("tune", "builtin:bert_layer", "--target", "metal")
    assert code == 2 and "unknown target 'metal'" in err


def test_questions_of_every_function_are_asked_and_measured():
    """A module whose graph is not called ``main`` (an LLM's ``decode``, say) has its yellow
    questions asked and measured like ``main``'s; one asked in two functions counts once."""
    from tvm import IRModule

    from tvm_smartmem.cost.tune import measure_candidate

    mod, _ = frontend.from_onnx(models.bert_layer())
    decode = IRModule({"decode": mod["main"].with_attr("global_symbol", "decode")})
    planned = smartmem_pipeline(LLVM, phases=PLAN_PHASES)(decode)
    questions = yellow_candidates(planned, LLVM, CostLayer())
    as_main = yellow_candidates(smartmem_pipeline(LLVM, phases=PLAN_PHASES)(mod), LLVM,
                                CostLayer())
    assert questions and {c.func for c in questions} == {"decode"}
    assert [c.key for c in questions] == [c.key for c in as_main]
    m = measure_candidate(planned, questions[0], LLVM, LocalRunner("cpu", **FAST))
    assert m.error is None and m.fused_ms > 0 and m.parts_ms > 0
    both = mod.clone()
    both["decode"] = decode["decode"]
    twice = yellow_candidates(smartmem_pipeline(LLVM, phases=PLAN_PHASES)(both), LLVM,
                              CostLayer())
    assert [c.key for c in twice] == [c.key for c in as_main]

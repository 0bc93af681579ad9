"""The benchmark suite: rows, numerics, ablation, results files and the CLI."""

from __future__ import annotations

import json

import pytest
import tvm

from tvm_smartmem import bench, zoo
from tvm_smartmem.errors import SmartMemError
from tvm_smartmem.pipeline import ABLATION, SMARTMEM_PASSES, only_stages
from tvm_smartmem.report import pipeline_pass


@pytest.fixture(scope="module")
def suite():
    cfg = bench.BenchConfig(models=["builtin:bert_layer"], ablation=True, repeat=2, number=1,
                            warmup=1)
    lines: list[str] = []
    return bench.run_suite(cfg, log=lines.append), lines


def test_every_pipeline_of_the_ablation_matches_onnxruntime(suite):
    doc, lines = suite
    names = [r["pipeline"] for r in doc["results"]]
    assert names == ["baseline", *[f"smartmem:{s}" for s in ABLATION], "smartmem"]
    for row in doc["results"]:
        assert row["matches_onnxruntime"] is True, row
        assert row["latency"]["min_ms"] <= row["latency"]["median_ms"] <= row["latency"]["max_ms"]
    # progress: one line per compile, plus the peer
    assert sum(line.startswith("[") for line in lines) == len(names)
    assert any("ONNX Runtime" in line for line in lines)


def test_the_ablation_shows_where_the_kernels_go(suite):
    """On the BERT-like layer (known counts): TVM leaves 15 kernels, 4 of them pure data
    movement; fusion alone already removes them (the layout ops fold into the matmuls)."""
    doc, _ = suite
    rows = {r["pipeline"]: r for r in doc["results"]}
    assert (rows["baseline"]["kernels"], rows["baseline"]["data_movement_kernels"]) == (15, 4)
    assert rows["baseline"]["data_movement_bytes"] > 0
    for p in [f"smartmem:{s}" for s in ABLATION]:
        expected = 9 if "weights" in p else 11  # q / k / v: one GEMM with combined weights
        assert (rows[p]["kernels"], rows[p]["data_movement_kernels"]) == (expected, 0), p
    assert (rows["smartmem"]["kernels"], rows["smartmem"]["data_movement_kernels"]) == (9, 0)
    # the rewriting stage removes FLOPs (the 1/sqrt(d) scale moves onto the queries)
    assert rows["smartmem"]["flops_removed"] > 0
    assert rows["smartmem:fusion+layout+tir+rewrite"]["flops_removed"] > 0
    assert rows["smartmem:fusion+layout+tir"]["flops_removed"] == 0
    assert doc["peers"][0]["peer"] == "onnxruntime-cpu" and doc["peers"][0]["median_ms"] > 0


def test_results_files_record_machine_versions_and_command(suite, tmp_path):
    doc, _ = suite
    paths = bench.write_results(doc, tmp_path, "t", "tvm-smartmem bench --models x")
    data = json.loads(paths[0].read_text())
    assert data["machine"]["versions"]["tvm"] == tvm.__version__
    assert data["machine"]["git_commit"] and data["command"] == "tvm-smartmem bench --models x"
    text = paths[1].read_text()
    assert "| bert_layer | llvm | baseline | 15 | 4 |" in text
    assert "Reproduce: `tvm-smartmem bench --models x`" in text
    assert "Geomean speedup of smartmem over TVM's default on llvm" in text
    assert paths[2].stat().st_size > 1000  # a real PNG


def test_speedup_and_geomean():
    rows = [{"model": "m", "target": "llvm", "pipeline": "baseline",
             "latency": {"median_ms": 3.0}},
            {"model": "m", "target": "llvm", "pipeline": "smartmem",
             "latency": {"median_ms": 1.5}},
            {"model": "m", "target": "cuda", "pipeline": "smartmem", "latency": None}]
    assert bench.speedup(rows, "m", "llvm", "smartmem") == pytest.approx(2.0)
    assert bench.speedup(rows, "m", "cuda", "smartmem") is None
    assert bench.geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert bench.geomean([]) is None


def test_a_target_without_its_device_gets_statistics_and_a_reason(monkeypatch):
    """cuda on a machine without a GPU: compiled and counted, latency left empty with why."""
    from tvm_smartmem.errors import DeviceNotFoundError

    def no_device(*_a, **_k):
        raise DeviceNotFoundError("device cuda:0 not found: no CUDA GPU is visible")

    monkeypatch.setattr("tvm_smartmem.measure.LocalRunner", no_device)
    cfg = bench.BenchConfig(models=["builtin:small_cnn"], targets=["cuda"], peers=False)
    doc = bench.run_suite(cfg, log=lambda _line: None)
    for row in doc["results"]:
        assert row["kernels"] > 0 and row["latency"] is None
        assert "gpu_machine.py" in row["not_measured"]
    assert "Latency on cuda not measured here" in bench.markdown(doc, "cmd")


def test_stage_selection():
    assert set(only_stages("rewrite")) == set(SMARTMEM_PASSES) - {"MathPropertyRewrite",
                                                                 "RecogniseNormalization"}
    assert "FusePlan" not in only_stages("layout")  # layout decisions need the planner
    assert only_stages("fusion+layout+tir+rewrite+weights") == ("TunedMatmul",
                                                                 "LongRowReduction",
                                                                 "FusedAttention",
                                                                 "SplitKMatmul",
                                                                 "RowReductionWithSideOutputs",
                                                                 "NormalisedMatmul",
                                                                 "WindowReduction",
                                                                 "FuseSplitKReduction")
    assert only_stages("fusion+layout+tir+rewrite+weights+schedule") == ()
    with pytest.raises(ValueError, match="unknown stage"):
        only_stages("fusoin")
    with pytest.raises(SmartMemError, match="unknown pipeline 'fast'"):
        pipeline_pass("fast", tvm.target.Target("llvm"))
    with pytest.raises(SmartMemError, match="unknown stage"):
        pipeline_pass("smartmem:nope", tvm.target.Target("llvm"))


def test_zoo_aliases_and_missing_exports(tmp_path):
    assert zoo.resolve("swin_t,bert_base") == ["swin_tiny", "bert_base"]
    with pytest.raises(SmartMemError, match="not exported"):
        bench.load_model("resnet50", zoo_cache=str(tmp_path))


def test_cli_bench(cli, tmp_path):
    code, out, err = cli("bench", "--models", "builtin:small_cnn", "--repeat", "1",
                         "--number", "1", "--warmup", "0", "--out", str(tmp_path),
                         "--name", "cli")
    assert code == 0, err
    assert (tmp_path / "cli.json").exists() and (tmp_path / "cli.png").exists()
    assert "| small_cnn | llvm | smartmem |" in out
    code, _, err = cli("bench", "--models", "no_such_model", "--out", str(tmp_path))
    assert code == 2 and "unknown zoo model(s) no_such_model" in err
    code, _, err = cli("bench", "--models", "builtin:small_cnn", "--targets", "tpu",
                       "--out", str(tmp_path))
    assert code == 2 and "tpu" in err

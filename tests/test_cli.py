"""The CLI end to end, through a subprocess as a user runs it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tvm_smartmem import models


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """builtin:bert_layer compiled for llvm with the smartmem pipeline, once for the module."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("cli") / "bert.so"
    proc = subprocess.run(
        [sys.executable, "-m", "tvm_smartmem.cli", "compile", "builtin:bert_layer",
         "--target", "llvm", "-o", str(out), "--report"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_compile_writes_library_weights_and_description(compiled):
    out, stdout = compiled
    assert out.exists()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["pipeline"] == "smartmem" and meta["device"] == "cpu"
    assert meta["inputs"] == [{"name": "x", "shape": [1, 32, 64], "dtype": "float32"}]
    # smartmem: the 4 data-movement kernels are gone and q / k / v are one GEMM
    assert meta["stats"]["kernels"] == 9 and meta["stats"]["data_movement_kernels"] == 0
    assert meta["stats"]["load_time_kernels"] > 0  # the concatenated weights, built at load
    with np.load(out.with_suffix(".params.npz")) as params:
        assert len(params.files) == meta["num_params"] == 17
    assert "data_movement_kernels" in stdout and "kernels" in stdout


def test_run_prints_median_min_max(cli, compiled):
    out, _ = compiled
    code, stdout, stderr = cli("run", str(out), "--device", "cpu", "--repeat", "3",
                               "--number", "2")
    assert code == 0, stderr
    assert "median" in stdout and "min" in stdout and "max" in stdout
    code, stdout, _ = cli("run", str(out), "--repeat", "2", "--number", "1", "--json")
    result = json.loads(stdout)
    assert result["repeat"] == 2 and len(result["samples_ms"]) == 2
    assert result["min_ms"] <= result["median_ms"] <= result["max_ms"]


def test_run_with_inputs_file(cli, compiled, tmp_path):
    out, _ = compiled
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((1, 32, 64), np.float32))
    assert cli("run", str(out), "--inputs", str(good), "--repeat", "1")[0] == 0
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.ones((1, 16, 64), np.float32))
    code, _, stderr = cli("run", str(out), "--inputs", str(bad), "--repeat", "1")
    assert code == 2
    assert stderr.strip().splitlines() == [
        "error: input 'x' must have shape [1, 32, 64], got [1, 16, 64]"
    ]


def test_run_errors(cli, compiled, tmp_path):
    out, _ = compiled
    code, _, err = cli("run", str(out), "--device", "cuda")
    assert code == 2 and "compiled for llvm" in err
    code, _, err = cli("run", str(tmp_path / "missing.so"))
    assert code == 2 and "not found" in err
    code, _, err = cli("run", str(out), "--inputs", str(tmp_path / "nothing.npz"))
    assert code == 2 and "inputs file not found" in err


def test_report_json_on_a_swin_onnx_file(cli, tmp_path):
    path = tmp_path / "swin.onnx"
    onnx.save(models.swin_block(), path)
    code, stdout, stderr = cli("report", str(path), "--target", "llvm", "--json")
    assert code == 0, stderr
    data = json.loads(stdout)
    assert set(data) == {"baseline", "smartmem"}
    base = data["baseline"]
    assert (base["kernels"], base["data_movement_kernels"]) == (19, 7)
    assert base["matches_onnxruntime"] is True and data["smartmem"]["matches_onnxruntime"] is True
    assert base["max_error_vs_onnxruntime"] < 1e-4


def test_report_table(cli):
    code, stdout, stderr = cli("report", "builtin:bert_layer")
    assert code == 0, stderr
    assert "baseline" in stdout and "smartmem" in stdout
    assert "numerics vs ONNX Runtime: OK" in stdout
    row = next(line for line in stdout.splitlines() if line.startswith("data-movement kernels"))
    assert row.split()[-2:] == ["4", "0"]
    row = next(line for line in stdout.splitlines() if line.startswith("kernels (launches)"))
    assert row.split()[-2:] == ["15", "9"]  # q / k / v combined into one GEMM


@pytest.mark.parametrize(
    "args, message",
    [
        (["report", "builtin:bert_layer", "--target", "metal"], "unknown target 'metal'"),
        (["report", "missing.onnx"], "model file not found"),
        (["report", "builtin:resnet9000"], "unknown built-in model"),
        (["compile", "builtin:bert_layer", "-o", "x.so", "--shape", "x:1,3"], "rank 3"),
        (["compile", "builtin:bert_layer", "-o", "x.so", "--shape", "oops"], "--shape expects"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(cli, args, message):
    code, _, stderr = cli(*args)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr


def test_corrupt_and_unsupported_models(cli, tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"garbage" * 100)
    code, _, err = cli("report", str(corrupt))
    assert code == 2 and "not a valid ONNX" in err
    node = onnx.helper.make_node("Frobnicate", ["x"], ["y"], domain="com.acme")
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("com.acme", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    code, _, err = cli("compile", str(path), "-o", str(tmp_path / "c.so"))
    assert code == 2 and "unsupported ONNX operator(s): com.acme.Frobnicate" in err


def test_listings(cli):
    code, stdout, _ = cli("targets")
    assert code == 0 and "opencl-texture" in stdout and "adreno" in stdout
    code, stdout, _ = cli("devices")
    assert code == 0 and stdout.splitlines()[0].startswith("cpu") and "available" in stdout

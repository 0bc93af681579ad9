"""The zoo's export machinery (manifest, resumability, errors) on a small torch model.

The real architectures need the [zoo] extra (timm, transformers, diffusers); the machinery they
go through is the same and is tested here with torch alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tvm_smartmem import errors, frontend, numerics, zoo

torch = pytest.importorskip("torch", reason="the zoo needs torch (in the [test] extra)")
pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript ([test] extra)")


def _tiny():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 4))
    return model, (torch.randn(1, 3, 16, 16),), ["pixel_values"]


@pytest.fixture
def tiny_zoo(monkeypatch):
    monkeypatch.setitem(zoo.MODELS, "tiny_cnn", zoo.ZooModel("tiny_cnn", "cnn", "test", _tiny))
    return "tiny_cnn"


def test_export_writes_a_manifest_and_resumes(tiny_zoo, tmp_path):
    lines: list[str] = []
    entries = zoo.build_zoo(tiny_zoo, cache=tmp_path, log=lines.append)
    entry = entries[tiny_zoo]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest[tiny_zoo] == entry
    assert entry["inputs"] == [{"name": "pixel_values", "shape": [1, 3, 16, 16],
                                "dtype": "float32"}]
    assert entry["parameters"] == sum(p.numel() for p in _tiny()[0].parameters())
    assert entry["sha256"] == zoo._sha256(tmp_path / "tiny_cnn.onnx")
    assert {"torch", "onnx"} <= set(entry["versions"])
    assert "exporting" in lines[0] and "done" in lines[1]
    lines.clear()
    zoo.build_zoo(tiny_zoo, cache=tmp_path, log=lines.append)
    assert "cached" in lines[0]  # resumed, not exported again


def test_exported_model_matches_torch_and_imports(tiny_zoo, tmp_path):
    zoo.build_zoo(tiny_zoo, cache=tmp_path, log=lambda _: None)
    path = zoo.model_path(tiny_zoo, tmp_path)
    torch.manual_seed(0)
    module, (x,), _ = _tiny()  # same seed as the export: same weights
    with torch.no_grad():
        ref = module.eval()(x).numpy()
    import onnx

    outs = numerics.onnxruntime_reference(onnx.load(str(path)), {"pixel_values": x.numpy()})
    assert numerics.compare(outs, [ref])[0]
    _, params = frontend.from_onnx(path)
    assert len(params) == 4 and all(isinstance(p, np.ndarray) for p in params)


def test_unknown_models_and_missing_exports(tmp_path):
    with pytest.raises(errors.SmartMemError, match="unknown zoo model"):
        zoo.resolve("resnet50,not_a_model")
    with pytest.raises(errors.SmartMemError, match="not exported"):
        zoo.model_path("resnet50", tmp_path)
    assert len(zoo.names()) == 21 and "sd15_unet" in zoo.names(include_optional=True)

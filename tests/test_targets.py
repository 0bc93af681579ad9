"""Named targets."""

from __future__ import annotations

import pytest
import tvm

from tvm_smartmem import errors, targets


def test_known_targets():
    assert targets.names() == ["llvm", "cuda", "opencl", "opencl-texture", "adreno"]
    assert targets.get("llvm").kind.name == "llvm"
    cuda = targets.get("cuda")
    assert (cuda.kind.name, cuda.attrs["arch"], cuda.host.kind.name) == ("cuda", "sm_90", "llvm")
    assert targets.get("cuda", arch="sm_80").attrs["arch"] == "sm_80"
    assert "texture" not in targets.get("opencl").keys
    tex = targets.get("opencl-texture")
    assert "texture" in tex.keys and int(tex.attrs["texture_spatial_limit"]) == 16384
    assert int(targets.get("opencl-texture", spatial_limit=32768)
               .attrs["texture_spatial_limit"]) == 32768
    adreno = targets.get("adreno")
    assert "adreno" in adreno.keys and "aarch64" in str(adreno.host.attrs["mtriple"])


def test_devices():
    assert [targets.device_of(targets.get(n)) for n in targets.names()] == [
        "cpu", "cuda", "opencl", "opencl", "opencl"
    ]


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(errors.UnknownTargetError) as info:
        targets.get("metal-texture")
    msg = str(info.value)
    assert "metal-texture" in msg and all(n in msg for n in targets.names())


def test_bad_options_and_inputs():
    with pytest.raises(errors.UnknownTargetError, match="bad options"):
        targets.get("cuda", not_an_option=1)
    with pytest.raises(errors.UnknownTargetError):
        targets.resolve(42)
    assert targets.resolve({"kind": "llvm"}).kind.name == "llvm"
    t = tvm.target.Target("llvm")
    assert targets.resolve(t) is t


def test_texture_limits_from_the_local_device(dev, monkeypatch):
    """The local OpenCL device's own image limits (PoCL: 16384 x 16384, 2048 layers), and a
    clear error where there is no device to read them from."""
    from tvm_smartmem.runtime import opencl

    info = opencl.describe()["devices"][0]
    width, height, depth = info["image2d_max"]
    tex = targets.get("opencl-texture", device_limits=True)
    assert int(tex.attrs["texture_spatial_limit"]) == min(width, height)
    assert int(tex.attrs["texture_depth_limit"]) == depth
    monkeypatch.setattr(opencl, "describe", lambda: {"devices": []})
    with pytest.raises(errors.DeviceNotFoundError, match="no OpenCL device 0"):
        targets.get("opencl-texture", device_limits=True)

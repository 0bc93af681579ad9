"""Named compilation targets and the device each one runs on.

``tvm_smartmem.targets.get("opencl-texture")`` returns a :class:`tvm.target.Target`; the CLI's
``--target`` takes the same names.  Each entry also says which runtime device executes it, so
``tvm-smartmem run`` can refuse a CUDA library on an OpenCL device with a clear message.

| name | what | device |
|---|---|---|
| ``llvm`` | the host CPU | ``cpu`` |
| ``cuda`` | NVIDIA GPU, sm_90 (H100) unless ``arch`` is given | ``cuda`` |
| ``opencl`` | any OpenCL GPU, buffers only | ``opencl`` |
| ``opencl-texture`` | OpenCL GPU with image2d support (key ``texture``) | ``opencl`` |
| ``adreno`` | Qualcomm Adreno phone GPU (TVM's tag), aarch64 Android host | ``opencl`` |

The texture limits (``texture_spatial_limit``, ``texture_depth_limit``) are the conservative
mobile values; ``get("opencl-texture", device_limits=True)`` takes the local OpenCL device's
own (NVIDIA allows 32768-wide images), and ``spatial_limit=`` / ``depth_limit=`` set them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from tvm.target import Target

from .errors import SmartMemError, UnknownTargetError


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A named target: how to build it and which runtime device executes it."""

    name: str
    description: str
    device: str
    make: Callable[..., Target]


def _llvm(**opts: Any) -> Target:
    return Target({"kind": "llvm", **opts})


def _cuda(arch: str = "sm_90", **opts: Any) -> Target:
    opts.setdefault("max_shared_memory_per_block", 49152)
    return Target({"kind": "cuda", "arch": arch, **opts}, host=_llvm())


def _opencl(**opts: Any) -> Target:
    return Target({"kind": "opencl", **opts}, host=_llvm())


def device_image_limits(index: int = 0) -> tuple[int, int]:
    """(largest image width / height, largest image-array depth) of this machine's OpenCL
    device ``index``, as its driver reports them."""
    from .errors import DeviceNotFoundError
    from .runtime import opencl

    devices = opencl.describe().get("devices") or []
    if index >= len(devices):
        raise DeviceNotFoundError(f"no OpenCL device {index} to read image limits from "
                                  f"({len(devices)} found)")
    dev = devices[index]
    if not dev.get("image_support"):
        raise DeviceNotFoundError(f"OpenCL device '{dev['name']}' has no image support")
    width, height, depth = dev["image2d_max"]
    return min(width, height), depth


def _opencl_texture(spatial_limit: int = 16384, depth_limit: int = 2048,
                    device_limits: bool = False, **opts: Any) -> Target:
    if device_limits:  # the limits of the local device, for builds that run here
        spatial_limit, depth_limit = device_image_limits()
    return Target(
        {
            "kind": "opencl",
            "keys": ["opencl", "gpu", "texture"],
            "texture_spatial_limit": spatial_limit,
            "texture_depth_limit": depth_limit,
            **opts,
        },
        host=_llvm(),
    )


def _adreno(host_triple: str = "aarch64-linux-android", **opts: Any) -> Target:
    base = dict(Target("qcom/adreno-opencl-texture").export())
    base.pop("tag", None)
    base.update(opts)
    return Target(base, host=_llvm(mtriple=host_triple))


KNOWN: dict[str, TargetSpec] = {
    s.name: s
    for s in (
        TargetSpec("llvm", "host CPU (LLVM)", "cpu", _llvm),
        TargetSpec("cuda", "NVIDIA GPU through CUDA (default arch sm_90)", "cuda", _cuda),
        TargetSpec("opencl", "OpenCL GPU, buffer memory only", "opencl", _opencl),
        TargetSpec(
            "opencl-texture", "OpenCL GPU with image2d (2.5D texture) memory", "opencl",
            _opencl_texture,
        ),
        TargetSpec(
            "adreno", "Qualcomm Adreno (TVM tag qcom/adreno-opencl-texture), Android host",
            "opencl", _adreno,
        ),
    )
}


def names() -> list[str]:
    return list(KNOWN)


def spec(name: str) -> TargetSpec:
    if name not in KNOWN:
        raise UnknownTargetError(f"unknown target '{name}'; known targets: {', '.join(KNOWN)}")
    return KNOWN[name]


def get(name: str, **options: Any) -> Target:
    """The :class:`tvm.target.Target` for a known name; ``options`` go to its factory."""
    try:
        return spec(name).make(**options)
    except SmartMemError:  # unknown name, no device to read limits from: said as it is
        raise
    except Exception as err:
        raise UnknownTargetError(f"bad options for target '{name}': {err}") from None


def llvm(**o: Any) -> Target:
    return get("llvm", **o)


def cuda(**o: Any) -> Target:
    return get("cuda", **o)


def opencl(**o: Any) -> Target:
    return get("opencl", **o)


def opencl_texture(**o: Any) -> Target:
    return get("opencl-texture", **o)


def adreno(**o: Any) -> Target:
    return get("adreno", **o)


def resolve(target: str | Target | Mapping[str, Any]) -> Target:
    """Accept a known name, a ``Target`` or a TVM target dict; anything else is an error."""
    if isinstance(target, Target):
        return target
    if isinstance(target, Mapping):
        try:
            return Target(dict(target))
        except Exception as err:
            raise UnknownTargetError(f"invalid target {dict(target)}: {err}") from None
    if isinstance(target, str):
        return get(target)
    raise UnknownTargetError(f"a target must be a name, a dict or a Target, not {type(target)}")


def device_of(target: Target) -> str:
    """Runtime device kind (``cpu``, ``cuda``, ``opencl``...) that executes ``target``'s kernels."""
    kind = target.kind.name
    return {"llvm": "cpu", "c": "cpu"}.get(kind, kind)


def has_texture(target: Target) -> bool:
    return "texture" in target.keys

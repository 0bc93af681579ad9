"""Exceptions raised for user-level mistakes.

Every error a user can cause (a bad file, an unknown target, a wrong input shape, a missing
device) is raised as a subclass of :class:`SmartMemError` with a one-line message that names the
problem.  The CLI turns them into ``error: <message>`` and a non-zero exit status instead of a
traceback from deep inside TVM.
"""

from __future__ import annotations

import tvm_ffi


def _crosses_ffi(cls: type) -> type:
    """Register ``cls`` with tvm-ffi so that, raised inside a pass (a Python callback that TVM
    calls through C++), it reaches the caller as itself and not as a bare RuntimeError."""
    return tvm_ffi.register_error(f"SmartMem.{cls.__name__}", cls)


@_crosses_ffi
class SmartMemError(Exception):
    """Base class of every error this package raises on purpose."""


@_crosses_ffi
class SwitchError(SmartMemError, ValueError):
    """A pipeline switch (``TVM_SMARTMEM_*`` environment variable) has a value it does not
    take."""


@_crosses_ffi
class ModelLoadError(SmartMemError):
    """The model file is missing, unreadable or not a valid model."""


@_crosses_ffi
class UnsupportedOperatorError(SmartMemError):
    """The model uses operators that the frontend cannot import."""

    @classmethod
    def for_ops(cls, ops: list[str], frontend: str = "ONNX") -> UnsupportedOperatorError:
        names = sorted(set(ops))
        err = cls(f"unsupported {frontend} operator(s): {', '.join(names)}")
        err.ops = names
        return err


@_crosses_ffi
class ShapeMismatchError(SmartMemError):
    """An input's shape or dtype does not match what the model declares."""


@_crosses_ffi
class UnknownTargetError(SmartMemError):
    """A target name that :mod:`tvm_smartmem.targets` does not know."""


@_crosses_ffi
class DeviceNotFoundError(SmartMemError):
    """The requested device does not exist on this machine (or the runtime lacks it)."""


@_crosses_ffi
class CompilationError(SmartMemError):
    """TVM failed to compile a module; the message keeps TVM's first line."""


@_crosses_ffi
class OpenCLError(SmartMemError):
    """An OpenCL runtime failure (no platform, kernel build failure, bad argument)."""


@_crosses_ffi
class TextureLoweringError(CompilationError):
    """A kernel's texture (image2d) accesses cannot be lowered correctly: a store that would not
    write whole RGBA texels, a texture buffer whose last axis is not 4 lanes, a dynamic shape."""

"""tvm-smartmem: SmartMem / DNNFusion layout and fusion optimisations as an Apache TVM plugin.

Submodules are imported on first use so that ``import tvm`` (which loads this package through
its ``tvm.backends`` entry point) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    "analysis", "cli", "errors", "frontend", "measure", "models", "pipeline", "report", "targets",
    "transform",
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])

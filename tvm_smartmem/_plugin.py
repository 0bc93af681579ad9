"""Entry point that ``import tvm`` calls (group ``tvm.backends``, see setup.py).

It must stay cheap and must not fail loudly: TVM turns an exception here into a warning on every
``import tvm``.  It registers the ``smartmem`` Relax pipeline, so that
``tvm.compile(mod, target, relax_pipeline="smartmem")`` works without importing this package, and
loads the OpenCL runtime (building it once into the cache the first time), so that
``tvm.opencl(0)`` and ``relax.VirtualMachine(ex, tvm.opencl())`` just work.
"""

from __future__ import annotations

import warnings


def _autoload() -> None:
    from . import pipeline

    # ``import tvm_smartmem.pipeline`` before ``tvm`` runs this hook from inside that module's
    # own ``import tvm``: the module is half-built (no ``register`` yet) and registers itself
    # when it finishes (its last line), so there is nothing to do here then
    if hasattr(pipeline, "register"):
        pipeline.register()
    from .runtime import opencl

    try:
        opencl.load()
    except Exception as err:  # a broken OpenCL set-up must not break `import tvm`
        warnings.warn(f"tvm-smartmem: OpenCL runtime not loaded: {err}", stacklevel=2)

"""Entry point that ``import tvm`` calls (group ``tvm.backends``, see setup.py).

It must stay cheap and must not fail loudly: TVM turns an exception here into a warning on every
``import tvm``.  It registers the ``smartmem`` Relax pipeline so that
``tvm.compile(mod, target, relax_pipeline="smartmem")`` works without importing this package.
"""

from __future__ import annotations


def _autoload() -> None:
    from . import pipeline

    pipeline.register()

"""Pipeline switches: the ``TVM_SMARTMEM_*`` environment variables the passes read at compile time.

A switch is read where it is used (so a results file's reproduce command, which sets it, builds
the same thing), and a value it does not take is a clear error naming the variable -- never a
silent fallback to the default.  :func:`applied` sets some for a while, for builds that compare
a knob's settings in one process (``gpu_machine.py prepare --variants``, the knob search).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator, Mapping

from .errors import SwitchError


def integer(name: str, default: int, valid: Collection[int] | None = None,
            expected: str = "an integer") -> int:
    """The switch ``name`` as an integer (``default`` when unset); ``valid`` limits it
    (``expected`` says how, in the error)."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or (valid is not None and number not in valid):
        raise SwitchError(f"{name}={value!r}: expected {expected}")
    return number


def on_off(name: str, default: str = "off") -> bool:
    """Is the switch ``name`` (``on`` / ``off``) on?"""
    value = os.environ.get(name, default).strip().lower()
    if value not in ("on", "off"):
        raise SwitchError(f"{name}={value!r}: expected on or off")
    return value == "on"


def choice(name: str, default: str, choices: Collection[str]) -> str:
    """The switch ``name`` (lower case; ``default`` when unset), one of ``choices``."""
    value = os.environ.get(name, default).strip().lower()
    if value not in choices:
        raise SwitchError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


@contextlib.contextmanager
def applied(settings: Mapping[str, str]) -> Iterator[None]:
    """The environment with ``settings`` for the duration, as before afterwards (a variable
    that was unset is unset again); the GEMM knob table, cached by path, is re-read on both
    sides, since ``TVM_SMARTMEM_MATMUL_CONFIGS`` may be among them."""
    from .tir.matmul import load_table

    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    load_table.cache_clear()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        load_table.cache_clear()

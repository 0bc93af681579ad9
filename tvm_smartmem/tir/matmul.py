"""TunedMatmul: dlight's GEMM rule with its knobs set per target from measurements.

dlight's ``gpu.Matmul`` tiles a matmul (and batched matmul, with any fused prologue / epilogue)
by a fixed :class:`~tvm.s_tir.dlight.gpu.Matmul.Config`: thread-block shape, per-thread micro
tile, reduction step, vector width, unrolling.  Its CUDA setting and its generic OpenCL one
(8 x 8 threads of 4 x 4 outputs, scalar loads) were not chosen for a desktop GPU, and the GEMMs
are most of a transformer's time.  This rule is the same schedule with the knobs read from
``matmul_configs.json`` (shipped with the package): per target kind, the configuration that won
``benchmarks/matmul_sweep.py`` on the zoo's GEMM shapes, with the file it was measured in.
Targets without an entry (Adreno, Metal, ...) keep dlight's own choice.

``TVM_SMARTMEM_MATMUL_CONFIGS=/path.json`` points at another table (a sweep on your device).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

from tvm.s_tir.dlight import gpu
from tvm.target import Target

TABLE = Path(__file__).resolve().parent / "matmul_configs.json"
ENV = "TVM_SMARTMEM_MATMUL_CONFIGS"
#: ``on``: a GEMM whose grid would not give every multiprocessor a thread block gets smaller
#: micro tiles (see :meth:`TunedMatmul.apply`); the default is :data:`SMALL_GRID_DEFAULT`.
SMALL_GRID_ENV = "TVM_SMARTMEM_SMALL_GRID_TILES"
#: Multiprocessors to fill when the table entry does not say (the H100's 132).
SMALL_GRID_BLOCKS = 132
#: Target kinds where the small-grid tiles are on by default: measured on the H100 (CUDA,
#: ``benchmarks/results/gpu_h100_pending_4a365a0.md``) at 1.035x end to end on DeiT-S, at par
#: on BERT-base and GPT-2; OpenCL keeps dlight's tiles until measured.
SMALL_GRID_DEFAULT = {"cuda": "on"}
KNOBS = tuple(f.name for f in dataclasses.fields(gpu.Matmul.Config))
#: The knobs of the other texture rules (``tir/schedules.py``) and their defaults; a texture
#: target's entry (key ``<kind>-texture``) holds measured values under ``rules``, written by
#: the knob search (``tir/knob_search.py``), as its ``config`` holds ``TextureMatmul``'s.
RULE_KNOBS: dict[str, dict[str, int]] = {
    "TextureElementwise": {"threads": 256},
    "TextureRowReduction": {"max_threads": 256},
    "TextureFallback": {"threads": 64},
}


@functools.lru_cache(maxsize=4)
def load_table(path: str | None = None) -> dict[str, dict]:
    """target key -> {"config": {knob: value}, "measured": results file}; {} when absent."""
    file = Path(path or os.environ.get(ENV) or TABLE)
    if not file.exists():
        return {}
    table = json.loads(file.read_text())
    for key, entry in table.items():
        unknown = set(entry.get("config", {})) - set(KNOBS)
        if unknown:
            raise ValueError(f"{file}: unknown matmul knob(s) {sorted(unknown)} for '{key}'; "
                             f"knobs: {', '.join(KNOBS)}")
        rules = entry.get("rules", {})
        unknown = {f"{r}.{k}" for r, ks in rules.items() for k in ks
                   if k not in RULE_KNOBS.get(r, {})}
        if unknown:
            raise ValueError(f"{file}: unknown texture rule knob(s) {sorted(unknown)} for "
                             f"'{key}'; knobs: " + ", ".join(
                                 f"{r}.{k}" for r, ks in RULE_KNOBS.items() for k in ks))
    return table


def texture_key(key: str) -> str:
    """The table key of a texture target's own entry (``opencl`` -> ``opencl-texture``): its
    texture GEMM ``config``, the other texture rules' ``rules`` and the texture policies."""
    return f"{key}-texture"


def target_key(target: Target) -> str | None:
    """The table key of a target: ``cuda``, ``opencl``; None for targets dlight tunes itself
    (a mobile OpenCL target -- Adreno, Android host -- keeps dlight's mobile setting)."""
    kind = target.kind.name
    if kind == "opencl" and ("android" in str(target.host) or "adreno" in str(target.attrs)):
        return None
    return kind if kind in ("cuda", "opencl") else None


class TunedMatmul(gpu.Matmul):
    """``gpu.Matmul`` with measured knobs (see the module doc); ``config`` overrides the table
    (the sweep uses it to try candidates)."""

    def __init__(self, config: gpu.Matmul.Config | None = None, table: str | None = None):
        super().__init__()
        self.config = config
        self.table = table

    def apply(self, func, target, tunable):
        """dlight's schedule with the table's knobs; with the small-grid tiles on (CUDA, or
        ``TVM_SMARTMEM_SMALL_GRID_TILES=on``) a GEMM that would launch fewer thread blocks
        than the GPU has multiprocessors (the batched GEMMs of a split attention: DeiT-S's PV,
        42 blocks of 32 x 64 outputs, 1.3 resident warps a multiprocessor) is scheduled again
        with each thread's micro tile halved along both axes, a quarter of the outputs a
        block, until it fills them or the micro tile is one output."""
        sch = super().apply(func, target, tunable)
        if sch is None or self.config is not None or not small_grid_tiles(target):
            return sch
        config = self.get_configs(target)
        want = small_grid_blocks(target)
        blocks = _blocks(sch)
        while blocks is not None and blocks < want and \
                (config.micro_size_x > 1 or config.micro_size_y > 1):
            config = _halved(config)
            smaller = TunedMatmul(config, self.table).apply(func, target, tunable)
            if smaller is None:
                break
            sch, blocks = smaller, _blocks(smaller)
        return sch

    def get_configs(self, target: Target) -> gpu.Matmul.Config:
        if self.config is not None:
            return self.config
        key = target_key(target)
        entry = load_table(self.table).get(key) if key else None
        if entry is None:
            return super().get_configs(target)
        return gpu.Matmul.Config(**entry["config"])


def _halved(config: gpu.Matmul.Config) -> gpu.Matmul.Config:
    """``config`` with each thread's micro tile halved along both axes (at least one output)."""
    return dataclasses.replace(config, micro_size_x=max(1, config.micro_size_x // 2),
                               micro_size_y=max(1, config.micro_size_y // 2))


def small_grid_tiles(target: Target | None = None) -> bool:
    """Are the small-grid tiles on for ``target`` (``TVM_SMARTMEM_SMALL_GRID_TILES``, else
    :data:`SMALL_GRID_DEFAULT` of its kind)?"""
    from .. import switches

    kind = target.kind.name if target is not None else None
    return switches.on_off(SMALL_GRID_ENV, SMALL_GRID_DEFAULT.get(kind, "off"))


def small_grid_blocks(target: Target) -> int:
    """Thread blocks a GEMM should launch at least: the table entry's ``small_grid_blocks``
    (its device's multiprocessors), else :data:`SMALL_GRID_BLOCKS`."""
    key = target_key(target)
    entry = load_table().get(key, {}) if key else {}
    return int(entry.get("small_grid_blocks", SMALL_GRID_BLOCKS))


def _blocks(sch) -> int | None:
    """Thread blocks of a scheduled GEMM's (first) kernel; None where symbolic."""
    from ..analysis.thread_extents import kernel_launch_sizes

    sizes = kernel_launch_sizes(sch.mod["main"])
    return sizes[0][1] if sizes and sizes[0] is not None else None

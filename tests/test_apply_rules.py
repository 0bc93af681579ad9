"""ApplyScheduleRules / apply_rules: a reduction that only dlight's Fallback rule takes is
reported, not left to be found by timing the model."""

from __future__ import annotations

import logging

from tvm.s_tir import dlight as dl
from tvm.script import tirx as T

from tvm_smartmem import targets
from tvm_smartmem.tir.schedule import apply_rules, has_reduction

CUDA = targets.get("cuda")
LOGGER = "tvm_smartmem.tir.schedule"


@T.prim_func(private=True, s_tir=True)
def _row_sum(x: T.Buffer((64, 96), "float32"), y: T.Buffer((64,), "float32")):
    for i, k in T.grid(64, 96):
        with T.sblock("sum"):
            vi, vk = T.axis.remap("SR", [i, k])
            with T.init():
                y[vi] = T.float32(0)
            y[vi] = y[vi] + x[vi, vk]


@T.prim_func(private=True, s_tir=True)
def _scale(x: T.Buffer((64, 96), "float32"), y: T.Buffer((64, 96), "float32")):
    for i, j in T.grid(64, 96):
        with T.sblock("scale"):
            vi, vj = T.axis.remap("SS", [i, j])
            y[vi, vj] = x[vi, vj] * T.float32(2)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_a_reduction_on_the_fallback_rule_is_reported(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with CUDA:
        _, rule = apply_rules(_row_sum, CUDA, [dl.gpu.Fallback()], "row_sum")
    assert rule == "Fallback"
    assert len(_warnings(caplog)) == 1 and _warnings(caplog)[0].startswith("row_sum: ")


def test_a_reduction_rule_or_an_elementwise_fallback_is_not(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with CUDA:
        _, rule = apply_rules(_row_sum, CUDA, [dl.gpu.Reduction(), dl.gpu.Fallback()], "s")
        assert rule == "Reduction"
        _, rule = apply_rules(_scale, CUDA, [dl.gpu.Fallback()], "scale")
        assert rule == "Fallback"
    assert _warnings(caplog) == []
    assert has_reduction(_row_sum) and not has_reduction(_scale)

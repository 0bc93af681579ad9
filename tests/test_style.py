"""The code base stays ruff-clean (configuration: .ruff.toml at the top level)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the [test] extra)")
    paths = [p for p in ("tvm_smartmem", "tests", "benchmarks", "tutorials") if (ROOT / p).is_dir()]
    proc = subprocess.run(
        [ruff, "check", "--no-cache", *paths],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

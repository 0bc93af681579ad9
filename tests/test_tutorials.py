"""Every tutorial runs as written, and its notebook is generated from the current source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
SOURCES = sorted(p.name for p in TUTORIALS.glob("*.py") if p.name != "make_notebooks.py")


def test_the_four_tutorials_are_there():
    assert SOURCES == ["cli_workflow.py", "opencl_transformer.py", "rpc_measure.py",
                       "smartmem_passes.py"]


@pytest.mark.parametrize("name", SOURCES)
def test_tutorial_runs(name, tmp_path):
    proc = subprocess.run([sys.executable, str(TUTORIALS / name)], capture_output=True,
                          text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_notebooks_match_their_sources():
    proc = subprocess.run([sys.executable, str(TUTORIALS / "make_notebooks.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_notebook_cells_are_the_source_code():
    sys.path.insert(0, str(TUTORIALS))
    try:
        from make_notebooks import to_notebook
    finally:
        sys.path.pop(0)
    src = (TUTORIALS / "smartmem_passes.py").read_text()
    nb = to_notebook(src)
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "FusePlan(target)" in code and '"""' not in code
    kinds = [c["cell_type"] for c in nb["cells"]]
    assert kinds[0] == "markdown" and "code" in kinds
    assert "".join(nb["cells"][0]["source"]).startswith("# Adding the smartmem passes")

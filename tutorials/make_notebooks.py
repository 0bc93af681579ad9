"""Write each tutorial's Jupyter notebook from its ``.py`` source (the source is the truth).

    python tutorials/make_notebooks.py          # rewrite every tutorials/*.ipynb
    python tutorials/make_notebooks.py --check  # exit 1 when a notebook is out of date

The sources follow the sphinx-gallery layout TVM's tutorials use: a reST docstring, then cells
separated by ``# %%`` whose leading comment lines are prose.  Prose becomes markdown cells
(reST section underlines become markdown headings), code becomes code cells.  The tests run
every tutorial source and ``--check`` so neither the code nor the notebooks rot.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEPARATOR = "# %%"


def sources() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name)


def _inline(line: str) -> str:
    return re.sub(r":(?:func|class|mod|ref):`~?([^`]+)`", r"`\1`", line).replace("``", "`")


def rst_to_markdown(text: str) -> str:
    """The few reST constructs the tutorials use: titles, labels, notes, literals."""
    lines = text.strip("\n").splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if re.fullmatch(r"\.\. _[\w-]+:", line.strip()):
            i += 1
            continue
        if line.strip() and re.fullmatch(r"([=\-~])\1+", nxt.strip()):
            out.append(("# " if nxt.strip()[0] == "=" else "## ") + _inline(line.strip()))
            i += 2
            continue
        if line.strip() == ".. note::":
            out.append("**Note:**")
            i += 1
            continue
        out.append(_inline(line))
        i += 1
    return "\n".join(out).strip("\n")


def _cell(kind: str, text: str) -> dict:
    cell = {"cell_type": kind, "metadata": {}, "source": text.splitlines(keepends=True)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def to_notebook(source: str) -> dict:
    """The notebook (nbformat 4) of one tutorial source."""
    module = ast.parse(source)
    doc = ast.get_docstring(module, clean=False) or ""
    body = source.split(SEPARATOR)
    cells = [_cell("markdown", rst_to_markdown(doc))] if doc else []
    for chunk in body[1:]:
        lines = chunk.strip("\n").splitlines()
        prose: list[str] = []
        while lines and lines[0].startswith("#"):
            prose.append(lines.pop(0)[1:].removeprefix(" "))
        if prose:
            cells.append(_cell("markdown", rst_to_markdown("\n".join(prose))))
        code = "\n".join(lines).strip("\n")
        if code:
            cells.append(_cell("code", code))
    return {"cells": cells, "metadata": {"kernelspec": {
        "display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}}, "nbformat": 4, "nbformat_minor": 5}


def render(path: Path) -> str:
    return json.dumps(to_notebook(path.read_text()), indent=1) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for src in sources():
        nb = src.with_suffix(".ipynb")
        text = render(src)
        if "--check" in argv:
            if not nb.exists() or nb.read_text() != text:
                stale.append(nb.name)
        else:
            nb.write_text(text)
            print(f"wrote {nb.relative_to(HERE.parent)}")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python tutorials/make_notebooks.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

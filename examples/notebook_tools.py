"""What the notebook scripts share: cells to a notebook, running it, the command line.

Each ``make_*.py`` here holds one notebook as a list of cells, so changes to it are
reviewable; the .ipynb beside it is that script's output, committed with its outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """``[("md" | "code", source), ...]`` -> a Python 3 notebook."""
    nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src)
                             for kind, src in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 600, cwd: Path = HERE
            ) -> nbformat.NotebookNode:
    """Runs every cell in a fresh kernel started in ``cwd`` (raises on the first error)."""
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def build_parser(out: Path, doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--execute", action="store_true", help="run it and save the outputs")
    ap.add_argument("--out", type=Path, default=out)
    return ap


def main(cells: list[tuple[str, str]], out: Path, doc: str, argv=None) -> int:
    args = build_parser(out, doc).parse_args(argv)
    nb = build(cells)
    if args.execute:
        execute(nb)
    nbformat.write(nb, args.out)
    print(f"wrote {args.out}")
    return 0

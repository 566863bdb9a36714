"""Shared by the notebook tests: build a notebook from its script, run it, read its plots."""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELL_TIMEOUT_S = 300
PNG = b"\x89PNG\r\n\x1a\n"


def maker(name):
    spec = importlib.util.spec_from_file_location(
        f"make_{name}", ROOT / "examples" / f"make_{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pngs(nb) -> list[bytes]:
    return [base64.b64decode(o.data["image/png"]) for c in nb.cells if c.cell_type == "code"
            for o in c.outputs if "image/png" in o.get("data", {})]


def check_committed(name: str, plots: int) -> None:
    """The committed .ipynb is its script's output, saved executed, in order, without
    errors, with its plots."""
    import nbformat

    committed = nbformat.read(ROOT / "examples" / f"{name}.ipynb", as_version=4)
    built = maker(name).build()
    assert [(c.cell_type, c.source) for c in committed.cells] == \
        [(c.cell_type, c.source) for c in built.cells]
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert len(pngs(committed)) == plots


def run_and_check(name: str, plots: int, texts: list[str]) -> None:
    """Runs the notebook top to bottom in a fresh kernel from the repository root; its
    outputs hold ``texts`` and ``plots`` non-empty PNG pictures."""
    import nbclient

    nb = maker(name).build()
    nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors  # nbclient raises on the first error; belt and braces
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                   for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for t in texts:
        assert t in text
    got = pngs(nb)
    assert len(got) == plots
    for png in got:
        assert png.startswith(PNG) and len(png) > 5_000
